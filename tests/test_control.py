"""The control protocol's dispatcher and verbs, on real pools and a real scoreboard, without a
socket or a master process: each request's shape is checked, and each verb acts through
`sizing.Sizing`, the one place targets and stress mode change."""

from poolmgr import control
from poolmgr.board import Board
from poolmgr.pools import Pool
from poolmgr.sizing import Sizing


class Log(list):
    """The master's log, as lines."""

    def info(self, fmt, *args):
        self.append(fmt % args)

    warning = info


class Master:
    """The part of the master the verbs may use (control.Controlled)."""

    def __init__(self):
        self.stopping = ""
        self.pools = {"smtp": Pool("smtp", 2, 6, None), "scanner": Pool("scanner", 2, 4, None)}
        self.board = Board(slots=4)
        self.log = Log()
        self.sizing = Sizing(self.pools, self.board, True, self.log)

    def status(self):
        class Fake:
            def to_json(self):
                return {"fields": "of the status"}
        return Fake()


def ask(master, *args, cmd="ctl"):
    return control.answer({"cmd": cmd, "args": list(args)}, master)


def test_requests_of_the_wrong_shape_get_the_usage_not_an_exception():
    master = Master()
    for request in ({"cmd": "ctl"}, {"cmd": "ctl", "args": "smtp"},
                    {"cmd": "ctl", "args": ["smtp"]}, {"cmd": "ctl", "args": ["smtp", 3]},
                    {"cmd": "ctl", "args": ["nosuch", "1"]}, {"cmd": "ctl", "args": [1, 2]},
                    {"cmd": "ctl", "args": ["__init__", "x"]}):
        assert control.answer(request, master) == {"ok": False, "message": control.CTL_USAGE}
    assert control.answer({"cmd": "reboot"}, master) == {
        "ok": False, "message": "unknown command 'reboot'"}
    assert (master.pools["smtp"].target, master.pools["scanner"].target) == (2, 2)


def test_status_is_the_masters_record_as_json():
    assert ask(Master(), cmd="status") == {"ok": True, "status": {"fields": "of the status"}}


def test_resizes_go_through_the_sizing_rule():
    master = Master()
    assert ask(master, "smtp", "+2") == {"ok": True, "message": "smtp pool 2 -> 4 workers"}
    assert ask(master, "scanner", "5")["ok"] is False  # above scanner.max_workers
    answer = ask(master, "scanner", "+2")
    assert answer["ok"] and answer["message"] == "scanner pool 2 -> 4 workers"
    assert ask(master, "smtp", "3")["ok"] is False  # fewer SMTP than scanner workers
    assert (master.pools["smtp"].target, master.pools["scanner"].target) == (4, 4)
    master.stopping = "graceful"
    assert ask(master, "smtp", "6") == {"ok": False, "message": "refused: poolmgr is stopping"}
    assert master.log[0] == "resize (ctl): smtp pool 2 -> 4 workers"
    assert master.log[-1] == "resize (ctl): refused: poolmgr is stopping"


def test_stress_and_autoscale_switch_and_say_so():
    master = Master()
    assert ask(master, "stress", "on") == {"ok": True, "message": "stress mode on"}
    assert master.log == ["stress mode on (ctl)"]
    assert master.board.slot(0).stress() is True
    assert ask(master, "stress", "on")["message"] == "stress mode on (unchanged)"
    assert ask(master, "stress", "maybe") == {"ok": False, "message": control.CTL_USAGE}
    master.pools["smtp"].target = 5  # as a storm left it
    assert ask(master, "autoscale", "off") == {"ok": True, "message": "autoscale off"}
    assert master.pools["smtp"].target == 2  # back to its floor
    assert master.sizing.stress.on is True  # set by ctl, not by the autoscaler: kept


def test_the_autoscaler_leaves_a_sysadmins_stress_mode_alone():
    """Stress mode switched on by ctl stays on while the autoscaler, calm, never asked for it
    (it switches stress mode only when its own wish changes)."""
    from poolmgr import autoscale, config
    from poolmgr.pools import PoolView
    from poolmgr.status import AnvilStatus, ClusterStatus, MasterView, StressStatus

    master = Master()
    assert ask(master, "stress", "on")["ok"]
    cfg = config.load(None).autoscale
    sizing = master.sizing

    def view():
        pools = {kind: PoolView(p.target, p.floor, p.ceiling, False, {}, [])
                 for kind, p in master.pools.items()}
        return MasterView(1000.0, 0.0, "", 1, "", pools, 1000, (0, 128), 128,
                          {"window": 300.0, "ratio": 0.0, "legit": 0, "nuisance": 0,
                           "by_reason": {}}, sizing.scaler, sizing.stress, AnvilStatus(0, 0),
                          ClusterStatus(), [])

    sizing.tick(view, cfg)
    assert sizing.scaler.last is not None and sizing.scaler.state.phase == autoscale.CALM
    assert sizing.stress == StressStatus(True, "ctl", sizing.stress.since)
    assert master.board.slot(0).stress() is True
