"""The typed status records: what the master sends is what every reader gets back."""

from poolmgr.status import (AnvilStatus, AutoscaleStatus, Decision, MasterStatus,
                            NuisanceStatus, NuisanceTotal, PoolStatus, Status, StormStatus,
                            StressStatus, WorkerStatus)
from poolmgr.top import frame


def sample() -> Status:
    worker = WorkerStatus(41, 1, 1, "running", 3.5, 12, 0, 0.4, 50_000_000)
    smtp = PoolStatus(2, 0, 2, 2, 6, 12, 4000, 0, 100_000_000, False,
                      {"connections": 30, "legit": 3, "nuisance_pregreet": 2}, [worker],
                      {"suspect": 4, "transaction": 1, "other": 7})
    scanner = PoolStatus(2, 0, 2, 2, 4, 0, 2, 1, 90_000_000, False, {"scanned": 3}, [])
    return Status("0.1.0", MasterStatus(40, 12.0, "/etc/poolmgr.toml", 1, "running", 30_000_000),
                  {"smtp": smtp, "scanner": scanner},
                  NuisanceStatus(300.0, 0.4, 3, 2, {"pregreet": 2},
                                 NuisanceTotal(3, {"pregreet": 2})),
                  StressStatus(), StormStatus(False, "calm", 1.0),
                  AutoscaleStatus(True, "calm", 1.0, decisions=[Decision(2.0, "storm begins")]),
                  AnvilStatus(3, 5))


def test_json_round_trip():
    status = sample()
    data = status.to_json()
    assert data["pools"]["smtp"]["worker_list"][0]["pid"] == 41
    assert data["autoscale"]["decisions"] == [{"time": 2.0, "decision": "storm begins"}]
    assert Status.from_json(data) == status


def test_readers_accept_fields_they_do_not_know_yet():
    data = sample().to_json()
    data["pools"]["smtp"]["newer_field"] = 1
    data["federation"] = {"state": "ok"}
    assert Status.from_json(data) == sample()


def test_top_reads_the_records():
    lines = frame(sample())
    assert any(line.startswith("smtp") and "4000" not in line and "12" in line for line in lines)
    assert lines[-1].endswith("storm begins")


# -- the master's typed view: status and the autoscaler's snapshot, built without a master

from collections import Counter  # noqa: E402

from poolmgr import autoscale  # noqa: E402
from poolmgr.pools import DRAINING, PoolView, Worker, WorkerView  # noqa: E402
from poolmgr.status import ClusterStatus, MasterView, collect, snapshot, summary  # noqa: E402


def board(sessions=0, busy=0, suspect=0, transacting=0, heartbeat=99.0, **counters):
    return {"sessions": sessions, "busy": busy, "suspect": suspect,
            "transacting": transacting, "heartbeat": heartbeat, "counters": counters}


def view(now=100.0, mark=None, **overrides) -> MasterView:
    smtp = PoolView(3, 2, 6, False, Counter(legit=5, nuisance_pregreet=1, handoffs=10), [
        WorkerView(Worker(11, "smtp", 1, 1, 0, started=90.0), board(
            300, suspect=200, transacting=2, handoffs=30, handoff_wait_ms=3000,
            handoff_queue_us=500_000)),
        WorkerView(Worker(12, "smtp", 2, 1, 1, started=95.0), board(100, handoffs=20)),
        WorkerView(Worker(13, "smtp", 3, 1, 2, started=50.0, state=DRAINING), board(5)),
    ])
    scanner = PoolView(2, 2, 4, True, Counter(), [
        WorkerView(Worker(21, "scanner", 1, 1, 3, started=90.0), board(busy=1, verdict_clean=4)),
        WorkerView(Worker(22, "scanner", 2, 1, 4, started=90.0), board()),
    ])
    scaler = autoscale.Autoscaler(True, phase_since=1000.0)
    if mark is not None:
        scaler.mark = mark
    fields = dict(now=now, started=0.0, config="/etc/poolmgr/poolmgr.toml", generation=2,
                  stopping="", pools={"smtp": smtp, "scanner": scanner}, per_worker=1000,
                  accept_queue=(7, 128), listen_backlog=128,
                  nuisance={"window": 300.0, "ratio": 0.5, "legit": 30, "nuisance": 30,
                            "by_reason": {"pregreet": 30}},
                  autoscaler=scaler, stress=StressStatus(), anvil=AnvilStatus(4, 9),
                  cluster=ClusterStatus(), checks=["builtin"])
    fields.update(overrides)
    return MasterView(**fields)


def test_status_is_assembled_from_the_view_alone():
    status = collect(view())
    smtp = status.pools["smtp"]
    assert (smtp.workers, smtp.draining, smtp.target, smtp.sessions) == (2, 1, 3, 405)
    assert smtp.slots == 2 * 1000
    assert smtp.sessions_by_state == {"suspect": 200, "transaction": 2, "other": 203}
    assert smtp.counters["handoffs"] == 10 + 30 + 20  # exited workers' totals + live slots
    assert [w.pid for w in smtp.worker_list] == [13, 11, 12]  # by state, then number
    assert status.pools["scanner"].throttled is True
    assert status.scanner.verdicts["clean"] == 4
    assert status.nuisance.total.by_reason == {"pregreet": 1}
    assert status.master.generation == 2 and status.master.state == "running"
    assert status.autoscale.backlog_max == 128 and status.anvil.connections == 9
    assert Status.from_json(status.to_json()) == status


def test_the_snapshot_takes_differences_from_the_last_mark():
    first, mark = snapshot(view(now=100.0))
    assert (first.sessions, first.slots, first.accept_queue) == (400, 2000, 7)
    assert first.growth == 0.0 and first.handoff_queue == 0.0  # no interval yet
    assert first.handoff_wait == 0.05  # 3000 ms over all 60 hand-offs so far
    assert first.nuisance_ratio == 0.5  # the window's ratio (60 closed sessions)
    assert first.scanner_busy == 1
    assert mark == autoscale.Mark(60, 3000, 400, 100.0, 500_000)
    later, _ = snapshot(view(now=102.0, mark=autoscale.Mark(50, 1000, 300, 100.0, 0)))
    assert later.growth == 50.0  # (400 - 300) sessions in 2 s
    assert later.handoff_wait == 0.2  # 2000 ms over 10 hand-offs
    assert later.handoff_queue == 0.25  # 0.5 s of queueing over 2 s


def test_summary_names_running_over_target_and_the_phase():
    assert summary(view()) == "smtp 2/3 workers, scanner 2/2, calm"
    stopping = view(stopping="graceful", stress=StressStatus(True, "ctl", 5.0))
    assert summary(stopping) == "smtp 2/3 workers, scanner 2/2, calm, stress mode, " \
        "stopping (graceful)"


def test_the_autoscaler_keeps_its_state_and_decisions_in_its_record():
    scaler = autoscale.Autoscaler(True)
    cfg = __import__("poolmgr.config", fromlist=["load"]).load(None).autoscale
    snap, mark = snapshot(view())
    hot = autoscale.Snapshot(**{**snap.__dict__, "sessions": 1900, "slots": 2000,
                                "nuisance_ratio": 0.9})
    smtp, scanner, decisions = scaler.run(hot, mark, cfg, wall=1234.5)
    assert scaler.state.phase == autoscale.STORM and scaler.phase_since == 1234.5
    assert smtp > hot.smtp and scaler.mark == mark and scaler.last == hot
    assert scaler.decision_count == len(decisions) == len(scaler.decisions)
    assert scaler.decisions[0] == {"time": 1234.5, "decision": decisions[0]}
    assert not scaler.due(hot.now + cfg.interval / 2, cfg.interval)
    assert scaler.switch(False, now=5.0, wall=99.0) is True
    assert scaler.state == autoscale.State(since=5.0) and scaler.phase_since == 99.0
    assert not scaler.due(10_000.0, cfg.interval)
    assert scaler.switch(False, now=6.0, wall=100.0) is False


def scanner_only_view() -> MasterView:
    """No SMTP pool (its ceiling 0): Postfix feeds the scanner pool, feeder_maxproc 3."""
    scanner = PoolView(3, 2, 3, False, Counter(connections=7, scanned=7, verdict_clean=7), [
        WorkerView(Worker(21, "scanner", 1, 1, 3, started=90.0), board(busy=1)),
        WorkerView(Worker(22, "scanner", 2, 1, 4, started=90.0), board()),
        WorkerView(Worker(23, "scanner", 3, 1, 5, started=90.0), board()),
    ])
    return view(pools={"smtp": PoolView(0, 0, 0, False, Counter(), []), "scanner": scanner},
                accept_queue=(0, 128), nuisance={"window": 300.0, "ratio": 0.0, "legit": 0,
                                                 "nuisance": 0, "by_reason": {}},
                feeder_maxproc=3)


def test_without_an_smtp_pool_status_top_and_metrics_show_it_absent():
    from poolmgr.cli import format_status
    from poolmgr.metrics import StatusCollector

    status = Status.from_json(collect(scanner_only_view()).to_json())
    smtp = status.pools["smtp"]
    assert (smtp.workers, smtp.target, smtp.ceiling, smtp.slots, smtp.sessions) == (0,) * 5
    assert status.scanner.scanner_only and status.scanner.feeder_maxproc == 3
    assert status.pools["scanner"].workers == 3 and status.pools["scanner"].busy == 1
    assert summary(scanner_only_view()) == "no smtp pool, scanner 3/3, calm"
    text = format_status(status).splitlines()
    assert any(line.split()[:2] == ["smtp", "none"] and "scanner-only" in line for line in text)
    assert "messages: scanned 7; connections from the feeder 7; feeder_maxproc 3" in text
    shown = frame(status, status)
    assert any(line.split()[:2] == ["smtp", "none"] and "feeder_maxproc 3" in line
               for line in shown)
    assert any(line.startswith("scanner") and "3+0" in line for line in shown)
    collector = StatusCollector()
    collector.publish(status, 0)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in collector.collect() for s in family.samples}
    assert samples[("poolmgr_pool_workers", (("pool", "smtp"),))] == 0
    assert samples[("poolmgr_pool_ceiling", (("pool", "smtp"),))] == 0
    assert samples[("poolmgr_pool_workers", (("pool", "scanner"),))] == 3
    assert samples[("poolmgr_smtp_slots", ())] == 0 and samples[("poolmgr_scanner_busy", ())] == 1


def test_without_an_smtp_pool_the_snapshot_is_calm_and_sized_by_the_scanner_pool():
    snap, _ = snapshot(scanner_only_view())
    assert (snap.smtp, snap.smtp_ceiling, snap.slots, snap.pressure) == (0, 0, 0, 0.0)
    assert snap.bounds.scanner_only and snap.scanner_busy == 1
