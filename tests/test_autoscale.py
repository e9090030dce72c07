"""The autoscaler as a pure function, over synthetic traces and random event sequences."""

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from poolmgr import config
from poolmgr.autoscale import CALM, RETREAT, STORM, Snapshot, State, check_rules, decide
from poolmgr.pools import Pool, bounds_of, broken, resize

CFG = config.from_dict({"autoscale": {"cooldown": "5s", "min_worker_lifetime": "2s",
                                      "scanner_grow_after": "3s",
                                      "scanner_shrink_after": "10s"}}).autoscale
PER_WORKER = 100


class Run:
    """Feeds snapshots one interval (1s) apart and applies the targets, as the master does."""

    def __init__(self, smtp=2, scanner=2, smtp_ceiling=8, scanner_ceiling=4, cfg=CFG):
        self.cfg = cfg
        self.now = 0.0
        self.state = State()
        self.smtp, self.scanner = smtp, scanner
        self.smtp_floor, self.scanner_floor = smtp, scanner
        self.smtp_ceiling, self.scanner_ceiling = smtp_ceiling, scanner_ceiling
        self.log: list[str] = []
        self.sizes: list[tuple[int, int, str]] = []

    def step(self, sessions=0, backlog=0, nuisance=0.0, busy=0, wait=0.0, queue=0.0):
        self.now += 1
        snap = Snapshot(self.now, self.smtp, self.scanner, self.smtp_floor, self.smtp_ceiling,
                        self.scanner_floor, self.scanner_ceiling, sessions=sessions,
                        slots=self.smtp * PER_WORKER, accept_queue=backlog, listen_backlog=100,
                        nuisance_ratio=nuisance, scanner_busy=min(busy, self.scanner),
                        handoff_wait=wait, handoff_queue=queue)
        self.smtp, self.scanner, self.state, decisions = decide(snap, self.state, self.cfg)
        broken = check_rules(snap, self.smtp, self.scanner, self.state.phase, self.cfg)
        assert broken == [], (self.now, broken, decisions)
        self.log += decisions
        self.sizes.append((self.smtp, self.scanner, self.state.phase))
        return decisions

    def storm(self, seconds, occupancy=0.95, nuisance=0.9, backlog=0):
        for _ in range(seconds):
            self.step(sessions=int(occupancy * self.smtp * PER_WORKER), nuisance=nuisance,
                      backlog=backlog)


def test_calm_stays_put():
    run = Run()
    for _ in range(30):
        run.step(sessions=40, nuisance=0.1, busy=1)
    assert run.sizes[-1] == (2, 2, CALM) and run.log == []


def test_sudden_storm_grows_one_worker_per_interval_then_retreats_to_the_floor():
    run = Run()
    run.storm(3)
    assert [s[0] for s in run.sizes] == [3, 4, 5]
    assert run.log[0].startswith("storm begins: occupancy 0.95")
    assert run.log[1] == "smtp 2 -> 3: occupancy 0.95, backlog 0/100, nuisance 0.90"
    for _ in range(4):  # quiet, but not yet for the cooldown (5s)
        run.step(sessions=10, nuisance=0.9)
    assert run.sizes[-1] == (5, 2, STORM)
    for _ in range(2):
        run.step(sessions=10, nuisance=0.9)
    assert run.state.phase == RETREAT
    for _ in range(10):
        run.step(sessions=10, nuisance=0.2)
    # One worker per interval, oldest first (the master picks), down to the floor.
    assert [s[0] for s in run.sizes[7:]] == [5, 4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    assert run.sizes[-1] == (2, 2, CALM)
    assert "calm: smtp pool back at 2" in run.log


def test_no_worker_is_retired_sooner_than_min_worker_lifetime_after_growth():
    cfg = config.from_dict({"autoscale": {"cooldown": "0s", "min_worker_lifetime": "3s"}})
    run = Run(cfg=cfg.autoscale)
    run.storm(1)
    for _ in range(4):
        run.step(sessions=0, nuisance=0.9)
    assert [s[0] for s in run.sizes] == [3, 3, 3, 2, 2]


def test_high_occupancy_without_nuisance_is_not_a_storm():
    run = Run()
    for _ in range(10):
        run.step(sessions=190, nuisance=0.1)
    assert run.sizes[-1] == (2, 2, CALM)


def test_storm_past_the_ceiling_switches_stress_mode_and_gives_it_back():
    run = Run(smtp_ceiling=4)
    run.storm(6)
    assert run.sizes[-1] == (4, 2, STORM)
    assert any(d.startswith("stress mode on") for d in run.log) and run.state.stress
    run.storm(3)  # plateau at the ceiling: no more growth, stress stays
    assert run.sizes[-1][0] == 4 and run.state.stress
    run.step(sessions=20, nuisance=0.9)
    assert not run.state.stress and run.log[-1].startswith("stress mode off")


def test_a_growing_accept_queue_doubles_the_step():
    run = Run()
    for backlog in (10, 30, 60):
        run.step(sessions=95 * run.smtp, backlog=backlog, nuisance=0.9)
    assert [s[0] for s in run.sizes] == [3, 5, 7]


def test_accept_queue_alone_is_pressure():
    run = Run()
    run.step(sessions=0, backlog=90, nuisance=1.0)
    assert run.state.phase == STORM and run.smtp == 3


def test_slow_decay_waits_for_the_cooldown():
    run = Run()
    run.storm(4)
    for occupancy in (0.7, 0.6, 0.5, 0.4, 0.35, 0.32):  # falling, but above the exit mark
        run.step(sessions=int(occupancy * run.smtp * PER_WORKER), nuisance=0.9)
    assert run.state.phase == STORM and run.smtp == 6


def test_flapping_around_the_thresholds_does_not_flap_the_pool():
    run = Run()
    run.storm(2)
    for n in range(20):  # alternately hot and quiet: never quiet for the cooldown
        hot = n % 2 == 0
        run.step(sessions=int((0.9 if hot else 0.1) * run.smtp * PER_WORKER), nuisance=0.9)
    shrinks = sum(1 for a, b in zip(run.sizes, run.sizes[1:]) if b[0] < a[0])
    assert shrinks == 0 and run.state.phase == STORM


def test_scanner_grows_with_legitimate_load_and_shrinks_slowly():
    run = Run()
    for _ in range(4):  # every scanner busy for scanner_grow_after (3s), no nuisance
        run.step(sessions=20, busy=2)
    assert run.sizes[-1] == (3, 3, CALM)
    assert run.log == ["smtp 2 -> 3: to keep scanner <= smtp",
                       "scanner 2 -> 3: busy 2/2, 0.0 hand-offs waiting, hand-off wait 0.00s"]
    for _ in range(3):
        run.step(sessions=20, busy=3)
    assert run.sizes[-1][:2] == (4, 4)
    for _ in range(9):
        run.step(sessions=5)
    assert run.sizes[-1][1] == 4  # idle, but not yet for scanner_shrink_after (10s)
    for _ in range(40):
        run.step(sessions=5)
    assert run.sizes[-1] == (2, 2, CALM)


def test_slow_hand_offs_grow_the_scanner_pool():
    run = Run()
    for _ in range(4):
        run.step(sessions=10, busy=0, wait=5.0)
    assert run.scanner == 3 and run.smtp == 3


def test_hand_offs_waiting_for_a_scanner_grow_the_scanner_pool():
    """Quick hand-offs that queue at the SMTP workers' gates: the sampled busy count misses
    a scanner between two messages, the queue does not."""
    run = Run()
    for _ in range(4):
        run.step(sessions=20, busy=1, wait=0.02, queue=6.5)
    assert run.scanner == 3 and run.smtp == 3
    assert run.log[-1] == "scanner 2 -> 3: busy 1/2, 6.5 hand-offs waiting, hand-off wait 0.02s"
    run = Run()
    for _ in range(10):
        run.step(sessions=20, busy=1, wait=0.02, queue=0.3)  # 1.3 of 2: under busy_high
    assert run.scanner == 2


def test_manual_floor_during_a_storm_is_kept():
    run = Run()
    run.storm(2)
    run.smtp_floor = run.smtp = 6  # the sysadmin: poolmgr ctl smtp 6
    run.storm(1)
    assert run.smtp == 7
    for _ in range(30):
        run.step(sessions=10, nuisance=0.5)
    assert run.sizes[-1] == (6, 2, CALM)  # back to the sysadmin's floor, not below


def test_scanner_floor_above_calm_ratio_keeps_smtp_floor():
    run = Run(smtp=5, scanner=2)
    for _ in range(5):
        run.step(sessions=10)
    assert run.sizes[-1] == (5, 2, CALM)  # the floor says otherwise than calm_ratio


def sizes_of(pools: dict[str, Pool]) -> tuple[int, int, int, int]:
    return (pools["smtp"].floor, pools["smtp"].target, pools["scanner"].floor,
            pools["scanner"].target)


events = st.lists(st.tuples(
    st.floats(0, 1.2),                  # occupancy
    st.integers(0, 120),                # accept queue
    st.floats(0, 1),                    # nuisance
    st.integers(0, 8),                  # busy scanners
    st.floats(0, 5),                    # hand-off wait
    st.sampled_from(["", "smtp+", "smtp-", "scanner+", "scanner-"]),  # a sysadmin's resize
), min_size=1, max_size=120)


@settings(max_examples=150, deadline=None)
@given(events, st.integers(1, 4), st.integers(4, 12))
def test_rules_hold_after_every_step(trace, scanner_floor, smtp_ceiling):
    run = Run(smtp=max(2, scanner_floor), scanner=scanner_floor, smtp_ceiling=smtp_ceiling,
              scanner_ceiling=min(smtp_ceiling, 6))
    for occupancy, backlog, nuisance, busy, wait, manual in trace:
        if manual:  # a sysadmin's resize, through pools.resize as ctl and TTIN/TTOU do
            pools = {"smtp": Pool("smtp", run.smtp_floor, run.smtp_ceiling, None),
                     "scanner": Pool("scanner", run.scanner_floor, run.scanner_ceiling, None)}
            pools["smtp"].target, pools["scanner"].target = run.smtp, run.scanner
            before = sizes_of(pools)
            done, said = resize(pools, manual[:-1], manual[-1] + "1")
            run.smtp_floor, run.smtp = pools["smtp"].floor, pools["smtp"].target
            run.scanner_floor, run.scanner = pools["scanner"].floor, pools["scanner"].target
            # Straight after the resize, before any decide(): the rule holds, and so does the
            # calm limit while calm (the resize moved the floor the limit allows for).
            calm = CFG.calm_ratio if run.state.phase == CALM else 0.0
            assert broken(run.smtp, run.scanner, bounds_of(pools), calm) == [], (manual, said)
            assert run.smtp <= run.smtp_ceiling and run.scanner <= run.scanner_ceiling
            if not done:
                assert sizes_of(pools) == before, (manual, said)  # a refusal changes nothing
        run.step(sessions=int(occupancy * run.smtp * PER_WORKER), backlog=backlog,
                 nuisance=nuisance, busy=busy, wait=wait)  # step() asserts check_rules


def test_rules_are_checked():
    snap = Snapshot(0, 4, 2, 2, 8, 1, 4)
    assert check_rules(snap, 9, 2, STORM, CFG) == ["smtp 9 outside [2, 8]"]
    assert check_rules(snap, 2, 3, STORM, CFG) == ["scanner 3 > smtp 2"]
    assert check_rules(snap, 6, 2, CALM, CFG) == ["calm with smtp 6 > 2 x scanner 2"]
    assert check_rules(replace(snap, smtp_floor=6), 6, 2, CALM, CFG) == []


def test_a_flood_is_met_ahead_of_time_several_workers_at_once_whatever_the_nuisance():
    """1,000 silent connections a second into 2 workers of 5,000 slots (the bench's flood):
    the pool grows before its slots run out, by as many workers as the lead time needs,
    though no session has looked like nuisance yet; a sudden wave gets several at once."""
    run, per_worker, sessions, grown = Run(smtp=2, smtp_ceiling=8), 5000, 0, []
    for _ in range(25):
        sessions += 1000
        run.now += 1
        snap = Snapshot(run.now, run.smtp, run.scanner, 2, 8, 2, 4, sessions=sessions,
                        slots=run.smtp * per_worker, nuisance_ratio=0.0, growth=1000,
                        per_worker=per_worker)
        before = run.smtp
        run.smtp, run.scanner, run.state, _ = decide(snap, run.state, CFG)
        grown.append(run.smtp - before)
        assert sessions <= before * per_worker  # never full: nothing waits for a worker
    assert run.state.phase == STORM and run.smtp >= 6 and max(grown) == 1
    snap = Snapshot(run.now + 1, 2, 2, 2, 8, 2, 4, sessions=2000, slots=2 * per_worker,
                    growth=1000, per_worker=per_worker)
    assert decide(snap, State(), CFG)[0] == 3  # (2,000 + 10,000) / 5,000 -> 2.4
    assert decide(replace(snap, growth=3000), State(), CFG)[0] == 7  # (2,000 + 30,000) / 5,000


def test_the_same_arrivals_into_a_roomy_pool_change_nothing():
    run = Run(smtp=2, smtp_ceiling=8)
    for i in range(20):
        run.now += 1
        snap = Snapshot(run.now, run.smtp, run.scanner, 2, 8, 2, 4, sessions=50,
                        slots=run.smtp * 20000, growth=100, per_worker=20000)
        run.smtp, run.scanner, run.state, decisions = decide(snap, run.state, CFG)
        assert decisions == []
    assert (run.smtp, run.state.phase) == (2, CALM)


def test_without_an_smtp_pool_only_the_scanner_pool_is_sized():
    """Scanner-only mode (smtp ceiling 0): no storm from an SMTP pool that has no sessions,
    the scanner pool grows with its busyness up to its ceiling (the feeder's maxproc) and
    shrinks when idle; the SMTP pool stays at 0 and the rules hold at every step."""
    run = Run(smtp=0, scanner=2, smtp_ceiling=0, scanner_ceiling=3)
    for _ in range(12):
        run.step(busy=run.scanner, wait=2.0, queue=1.0)
    assert run.sizes[-1] == (0, 3, CALM)
    assert all(smtp == 0 and phase == CALM for smtp, _, phase in run.sizes)
    assert not any(d.startswith("smtp") or "storm" in d for d in run.log), run.log
    for _ in range(60):
        run.step()
    assert run.sizes[-1] == (0, 2, CALM)  # back to its floor


@settings(max_examples=100, deadline=None)
@given(events, st.integers(1, 4), st.integers(0, 4))
def test_without_an_smtp_pool_the_rules_hold_after_every_step(trace, scanner_floor, room):
    """Scanner-only mode under any trace and any sysadmin's resizes: the SMTP pool stays at 0
    (its resizes are refused and change nothing), the scanner pool within its floor and the
    feeder's cap, and no storm."""
    feeder = scanner_floor + room
    run = Run(smtp=0, scanner=scanner_floor, smtp_ceiling=0, scanner_ceiling=feeder)
    for occupancy, backlog, nuisance, busy, wait, manual in trace:
        if manual:
            pools = {"smtp": Pool("smtp", 0, 0, None),
                     "scanner": Pool("scanner", run.scanner_floor, feeder, None)}
            pools["scanner"].target = run.scanner
            done, said = resize(pools, manual[:-1], manual[-1] + "1")
            assert not (done and manual.startswith("smtp")), said
            assert pools["smtp"].target == pools["smtp"].floor == 0
            run.scanner_floor, run.scanner = pools["scanner"].floor, pools["scanner"].target
        run.step(sessions=0, backlog=backlog, nuisance=nuisance, busy=busy, wait=wait)
        assert run.smtp == 0 and run.scanner_floor <= run.scanner <= feeder
        assert run.state.phase == CALM
