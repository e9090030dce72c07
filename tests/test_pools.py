"""The one sizing rule (`fit`) and the manual resizes that go through it: scanner workers
never outnumber SMTP workers, each pool within its floor and ceiling."""

from hypothesis import given
from hypothesis import strategies as st

from poolmgr.pools import Bounds, Pool, bounds_of, broken, calm_size, fit, resize


def pools(smtp=2, scanner=2, smtp_max=8, scanner_max=4):
    return {"smtp": Pool("smtp", smtp, smtp_max, None),
            "scanner": Pool("scanner", scanner, scanner_max, None)}


def test_absolute_and_relative():
    p = pools()
    assert resize(p, "smtp", "+2") == (True, "smtp pool 2 -> 4 workers")
    assert resize(p, "smtp", "3")[0] and p["smtp"].target == 3 and p["smtp"].floor == 3
    assert resize(p, "smtp", "-1")[0] and p["smtp"].target == 2


def test_smtp_below_scanner_is_refused():
    p = pools(smtp=2, scanner=2)
    done, message = resize(p, "smtp", "-1")
    assert not done and "fewer than the 2 scanner workers" in message
    assert p["smtp"].target == 2


def test_scanner_raise_raises_smtp_with_it():
    p = pools(smtp=2, scanner=2)
    done, message = resize(p, "scanner", "+1")
    assert done and "smtp pool raised 2 -> 3" in message
    assert p["smtp"].target == 3 and p["scanner"].target == 3


def test_ceilings_and_floors():
    p = pools(smtp=2, scanner=1, smtp_max=3, scanner_max=4)
    assert not resize(p, "smtp", "4")[0]
    assert not resize(p, "scanner", "4")[0]  # would need 4 SMTP workers, ceiling is 3
    assert not resize(p, "scanner", "0")[0]
    assert not resize(p, "smtp", "x")[0]
    assert not resize(p, "mailman", "1")[0]
    assert p["smtp"].target == 2 and p["scanner"].target == 1


def test_startup_failures_back_off():
    from poolmgr.pools import Worker
    pool = Pool("scanner", 1, 2, None)
    worker = Worker(1, "scanner", 1, 1, 0, started=100.0)
    delays = [pool.note_exit(worker, 1, 100.5) for _ in range(4)]
    assert delays == sorted(delays) and delays[0] > 0 and delays[-1] > delays[0]
    assert pool.note_exit(worker, 0, 100.5) == 0 and pool.failures == 0


def test_fit_is_the_one_rule():
    b = Bounds(smtp_floor=2, smtp_ceiling=8, scanner_floor=1, scanner_ceiling=4)
    assert fit(2, 2, b) == (2, 2)
    assert fit(2, 3, b) == (3, 3)      # the SMTP pool rises to the scanner pool
    assert fit(1, 0, b) == (2, 1)      # floors
    assert fit(9, 9, b) == (8, 4)      # ceilings
    assert fit(2, 6, Bounds(2, 3, 1, 6)) == (3, 3)  # the scanner ceiling is the SMTP ceiling
    assert calm_size(3, b) == 3 and calm_size(1, b) == 2
    assert broken(2, 3, b) == ["scanner 3 > smtp 2"]
    assert broken(6, 2, b, calm_ratio=2) == ["calm with smtp 6 > 2 x scanner 2"]
    assert broken(9, 0, b) == ["smtp 9 outside [2, 8]", "scanner 0 outside [1, 4]"]


@given(st.integers(1, 6), st.integers(0, 10), st.integers(1, 6), st.integers(0, 10),
       st.integers(0, 20), st.integers(0, 20))
def test_whatever_is_asked_fit_keeps_the_rule(smtp_floor, smtp_room, scanner_floor,
                                             scanner_room, smtp, scanner):
    smtp_ceiling = max(smtp_floor, scanner_floor) + smtp_room
    b = Bounds(smtp_floor, smtp_ceiling, scanner_floor,
               min(scanner_floor + scanner_room, smtp_ceiling))
    fitted = fit(smtp, scanner, b)
    assert broken(*fitted, b) == []
    assert fit(*fitted, b) == fitted  # settled: fitting again changes nothing
    if broken(smtp, scanner, b) == []:
        assert fitted == (smtp, scanner)  # sizes that keep the rule are left alone


@given(st.integers(1, 4), st.integers(0, 6), st.integers(0, 6),
       st.lists(st.tuples(st.sampled_from(["smtp", "scanner"]),
                          st.sampled_from(["+", "-", ""]), st.integers(0, 12)), max_size=40))
def test_the_rule_holds_straight_after_every_manual_resize(floor, smtp_room, scanner_room,
                                                          requests):
    """ctl and TTIN/TTOU resize with nothing after them: the rule must hold at once, not only
    after the autoscaler's next step; a refused resize changes nothing; a done one gives the
    pool what was asked."""
    p = pools(smtp=floor, scanner=floor, smtp_max=floor + smtp_room,
              scanner_max=floor + min(scanner_room, smtp_room))
    for kind, sign, amount in requests:
        before = {k: (pool.floor, pool.target) for k, pool in p.items()}
        asked = before[kind][1] + amount if sign == "+" else \
            before[kind][1] - amount if sign == "-" else amount
        done, message = resize(p, kind, f"{sign}{amount}")
        smtp, scanner = p["smtp"], p["scanner"]
        assert broken(smtp.target, scanner.target, bounds_of(p)) == [], message
        assert smtp.target <= floor + smtp_room and scanner.target <= scanner.ceiling
        assert all(pool.floor == pool.target for pool in p.values())  # manual sizes are floors
        if done:
            assert p[kind].target == asked, message
        else:
            assert {k: (pool.floor, pool.target) for k, pool in p.items()} == before, message


# -- scanner-only mode: no SMTP pool (its ceiling 0); Postfix's content_filter feeds the
# scanner pool, whose ceiling the feeder's maxproc caps (configured_bounds).

from poolmgr.pools import configured_bounds  # noqa: E402


def test_without_an_smtp_pool_the_scanner_pool_is_sized_alone():
    b = configured_bounds(2, 0, 2, 6, feeder_maxproc=4)
    assert b == Bounds(0, 0, 2, 4) and b.scanner_only
    assert fit(0, 9, b) == (0, 4)      # capped by the feeder, and no SMTP pool rises with it
    assert fit(3, 1, b) == (0, 2)      # the SMTP pool stays at 0; the scanner floor holds
    assert calm_size(4, b) == 0
    assert broken(0, 4, b, calm_ratio=2) == []
    assert broken(1, 2, b) == ["smtp 1 outside [0, 0]"]


def test_the_feeder_caps_the_scanner_pool_beside_an_smtp_pool_too():
    assert configured_bounds(2, 8, 3, 6, feeder_maxproc=2) == Bounds(2, 8, 2, 2)
    assert configured_bounds(2, 8, 2, 4) == Bounds(2, 8, 2, 4)  # 0: no feeder given


def test_resizes_without_an_smtp_pool():
    p = {"smtp": Pool("smtp", 0, 0, None), "scanner": Pool("scanner", 2, 4, None)}
    p["smtp"].set_limits(2, 0)  # a reload's floor cannot raise a pool that does not exist
    assert (p["smtp"].floor, p["smtp"].target) == (0, 0)
    done, message = resize(p, "smtp", "+1")
    assert not done and message.startswith("refused: no smtp pool (scanner-only mode")
    assert resize(p, "scanner", "+2") == (True, "scanner pool 2 -> 4 workers")
    assert p["smtp"].target == 0  # no SMTP pool raised with it
    done, message = resize(p, "scanner", "5")
    assert not done and "ceiling 4 (scanner.max_workers or scanner.feeder_maxproc)" in message
    assert resize(p, "scanner", "-3") == (True, "scanner pool 4 -> 1 workers")
