"""Hand-offs from the SMTP pool to the scanner pool: each SMTP worker has a share of the
scanner workers (the master's `share_handoffs`), its sessions take turns at it
(`HandoffGate`), and so they reuse kept connections instead of opening one per message."""

import threading

import gevent
import gevent.event

from helpers import message
from poolmgr.smtp.front import HandoffGate


def test_the_gate_lets_limit_hand_offs_through_and_the_others_wait_their_turn():
    gate, inside, most, order = HandoffGate(gevent.event.Event), [0], [0], []

    def hand_off(name):
        assert gate.enter(5)
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        gevent.sleep(0.05)
        order.append(name)
        inside[0] -= 1
        gate.leave()

    gate.set_limit(1)
    gevent.joinall([gevent.spawn(hand_off, n) for n in range(4)], timeout=5)
    assert most[0] == 1 and order == [0, 1, 2, 3]
    most[0] = 0
    jobs = [gevent.spawn(hand_off, n) for n in range(4)]
    gevent.sleep(0.01)
    gate.set_limit(2)  # a larger share lets a waiting one in at once
    gevent.joinall(jobs, timeout=5)
    assert most[0] == 2


def test_a_turn_that_does_not_come_in_time_is_a_failure_and_leaves_no_trace():
    gate = HandoffGate(gevent.event.Event)
    gate.set_limit(1)
    assert gate.enter(1)
    assert not gate.enter(0.1)
    assert not gate.waiting
    gate.leave()
    assert gate.enter(0.1) and gate.busy == 1


def test_smtp_workers_reuse_their_hand_off_connections_under_load(make_poolmgr):
    """Eight clients at once through two SMTP and two scanner workers: the scanner pool sees
    a handful of connections for 240 messages, not one per message."""
    pm = make_poolmgr({"autoscale": {"enabled": False}})
    errors = []

    def client(n):
        try:
            with pm.smtp() as smtp:
                for k in range(30):
                    refused = smtp.sendmail("alice@example.org", ["bob@example.test"],
                                            message(f"load {n} {k}"))
                    assert refused == {}
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert len(pm.delivered()) == 240
    scanner = pm.status()["pools"]["scanner"]["counters"]
    assert scanner["scanned"] == 240 and scanner["connections"] <= 40, scanner["connections"]
