"""The sizing rule for manual resizes: scanner workers never outnumber SMTP workers."""

from poolmgr.pools import Pool, resize


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
