"""Hand-offs from the SMTP pool to the scanner pool: each SMTP worker has a share of the
scanner workers (the master's `share_handoffs`), its sessions take turns at it
(`HandoffGate`), and so they reuse kept connections instead of opening one per message."""

import subprocess
import sys
import textwrap
import threading

import pytest

from helpers import message

# The gate runs on gevent, which the test process itself must not import (the bench checks
# that it does not): its tests run in a Python of their own.
GATE_TESTS = """
import gevent, gevent.event
from poolmgr.smtp.front import HandoffGate
from poolmgr.smtp.runners import Turn
EVENT = {"event": gevent.event.Event, "turn": lambda: Turn(gevent.get_hub())}[sys.argv[1]]

# limit hand-offs through at once, the others in their turn; a larger share lets one in
gate, inside, most, order = HandoffGate(EVENT), [0], [0], []

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
assert most[0] == 1 and order == [0, 1, 2, 3], (most, order)
most[0] = 0
jobs = [gevent.spawn(hand_off, n) for n in range(4)]
gevent.sleep(0.01)
gate.set_limit(2)
gevent.joinall(jobs, timeout=5)
assert most[0] == 2, most

# a turn that does not come in time is a failure and leaves no trace
gate = HandoffGate(EVENT)
gate.set_limit(1)
assert gate.enter(1)
assert not gate.enter(0.1)
assert not gate.waiting
gate.leave()
assert gate.enter(0.1) and gate.busy == 1

# with a pause, the hand-off whose turn came goes first: it is under way before the one that
# ended goes on (to its log line and its reply)
gate, events = HandoffGate(EVENT, gevent.sleep), []
gate.set_limit(1)

def ending():
    assert gate.enter(1)
    gevent.sleep(0.05)
    gate.leave()
    events.append("ended one goes on")

def next_one():
    assert gate.enter(1)
    events.append("next one under way")
    gate.leave()

gevent.joinall([gevent.spawn(ending), gevent.spawn(next_one)], timeout=5)
assert events == ["next one under way", "ended one goes on"], events
print("gate ok")
"""


@pytest.mark.parametrize("turns", ["event", "turn"])  # gevent's Event; the SMTP worker's Turn
def test_the_gate_takes_turns_within_its_limit_and_a_late_turn_fails_cleanly(turns):
    result = subprocess.run([sys.executable, "-c", "import sys\n" + textwrap.dedent(GATE_TESTS),
                             turns],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "gate ok", result.stderr


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
