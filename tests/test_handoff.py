"""Hand-offs from the SMTP pool to the scanner pool (`poolmgr.handoff`): each SMTP worker has a
share of the scanner workers (`share`, which the master publishes), its sessions take turns at
it (`HandoffGate`), and so they reuse kept connections instead of opening one per message; a
scanner worker lets a kept connection go when another hand-off waits (`let_go`); each side
sends its next hop its XFORWARD attributes (`xforward`). The rules are tested as functions
first, then end to end."""

import functools
import smtplib
import subprocess
import sys
import textwrap
import threading

import pytest

from helpers import HELO, Raw, message, wait_until
from poolmgr import handoff
from poolmgr.smtp import replies as R
from test_relay import Server

# -- the share (the master's side)
def test_the_scanner_pool_is_shared_among_the_smtp_workers_that_handed_off():
    seen = {101: 10, 102: 10, 103: 10, 104: 10}  # hand-offs per SMTP worker a second ago
    assert handoff.share(seen, seen, 6) == 2  # none handed off since: among all four
    assert handoff.share({**seen, 101: 12, 103: 11}, seen, 6) == 3  # among the two that did
    assert handoff.share({**seen, 101: 12, 103: 11}, seen, 5) == 3  # rounded up
    assert handoff.share({**seen, 102: 11}, seen, 6) == 6  # the one that did gets them all
    assert handoff.share({**seen, 105: 3}, seen, 10) == 2  # one just started: not active
    assert handoff.share({101: 10}, seen, 4) == 4  # the gone ones are forgotten
    assert handoff.share(seen, seen, 1) == 1 and handoff.share(seen, seen, 0) == 1
    assert handoff.share({}, {}, 4) == 4  # no SMTP worker yet


def test_the_share_is_the_fewest_hand_offs_that_keep_every_scanner_worker_in_use():
    for scanners in range(9):
        for workers in range(1, 6):
            for active in range(workers + 1):
                seen = dict.fromkeys(range(workers), 0)
                counts = {pid: int(pid < active) for pid in range(workers)}
                share, among = handoff.share(counts, seen, scanners), active or workers
                assert share >= 1 and share * among >= scanners, (scanners, workers, active)
                assert share == 1 or (share - 1) * among < scanners, (scanners, workers, active)


# -- when a scanner worker lets a kept connection go
def test_only_a_connection_kept_between_messages_is_let_go():
    let_go = functools.partial(handoff.let_go, host="scan.test")
    kept = {"carried": True, "in_transaction": False, "worker_done": False}
    yielded, shutting_down = (R.R421_YIELD.format(host="scan.test"),
                              R.R421_SHUTDOWN.format(host="scan.test"))

    def not_asked():
        raise AssertionError("the accept queue was looked at")

    assert let_go(**kept, someone_waiting=lambda: True) == yielded
    assert let_go(**kept, someone_waiting=lambda: False) is None  # nobody waits: kept
    assert let_go(**{**kept, "worker_done": True}, someone_waiting=not_asked) == shutting_down
    # A client that has just connected is served its first message, whoever waits.
    for done in (False, True):
        assert let_go(**{**kept, "carried": False, "worker_done": done},
                      someone_waiting=not_asked) is None
    # Never in the middle of a transaction.
    for done in (False, True):
        assert let_go(**{**kept, "in_transaction": True, "worker_done": done},
                      someone_waiting=not_asked) is None


# -- XFORWARD
def test_each_side_builds_its_xforward_attributes():
    smtp_side = handoff.xforward(ident="4F1C2A", addr="192.0.2.7", port=40001, proto="ESMTP",
                                 helo="client.example")
    assert list(smtp_side.items()) == [
        ("NAME", "[UNAVAILABLE]"), ("ADDR", "192.0.2.7"), ("PORT", "40001"), ("PROTO", "ESMTP"),
        ("HELO", "client.example"), ("IDENT", "4F1C2A"), ("SOURCE", "REMOTE")]
    assert handoff.xforward(ident="Q", addr="192.0.2.7", port=1, proto="SMTP",
                            helo=None)["HELO"] == ""  # no HELO: relay.send says [UNAVAILABLE]
    # The scanner passes on what it was told, but not PORT, and its own queue id as IDENT.
    told = {"NAME": "spike.example", "ADDR": "192.0.2.55", "PORT": "40001", "PROTO": "ESMTP",
            "HELO": "spike", "IDENT": "TOLD", "SOURCE": "LOCAL"}
    scanner_side = handoff.xforward(ident="4F1C2A", addr="127.0.0.1", proto="SMTP",
                                    helo="mx.test", told=told)
    assert list(scanner_side.items()) == [
        ("NAME", "spike.example"), ("ADDR", "192.0.2.55"), ("PROTO", "ESMTP"),
        ("HELO", "spike"), ("IDENT", "4F1C2A"), ("SOURCE", "LOCAL")]
    # Told nothing (Postfix as content_filter without XFORWARD): its own peer.
    assert handoff.xforward(ident="Q", addr="127.0.0.1", proto="LMTP", helo="mx.test",
                            told={}) == {"NAME": "[UNAVAILABLE]", "ADDR": "127.0.0.1",
                                         "PROTO": "LMTP", "HELO": "mx.test", "IDENT": "Q",
                                         "SOURCE": "REMOTE"}
    # An IPv6 address as Postfix's smtpd takes it (a bare one is 501 Bad ADDR syntax there).
    assert handoff.xforward(ident="Q", addr="2001:db8::7", port=1, proto="ESMTP",
                            helo=None)["ADDR"] == "IPv6:2001:db8::7"
    assert handoff.xforward(ident="Q", addr="127.0.0.1", proto="SMTP", helo="mx.test",
                            told={"ADDR": "2001:db8::8"})["ADDR"] == "IPv6:2001:db8::8"


def test_the_hand_off_module_imports_no_gevent():
    """The master imports it; gevent is only the SMTP worker's, after its fork."""
    result = subprocess.run([sys.executable, "-c", "import sys, poolmgr.handoff\n"
                             "assert 'gevent' not in sys.modules, 'gevent imported'"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# The gate runs on gevent, which the test process itself must not import (the bench checks
# that it does not): its tests run in a Python of their own.
GATE_TESTS = """
import gevent, gevent.event
from poolmgr.handoff import HandoffGate
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


def test_each_side_sends_its_next_hop_its_xforward_attributes(make_poolmgr):
    """The SMTP worker names its client to the proxy filter, its port included; the scanner
    passes on what its client told it, without PORT, under its own queue id."""
    offer = b"250-PIPELINING\r\n250-XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE\r\n250 OK\r\n"
    proxy_filter, next_hop = Server(ehlo=offer), Server(ehlo=offer)
    try:
        pm = make_poolmgr({"smtp": {"proxy_filter": f"127.0.0.1:{proxy_filter.hop.port}"},
                           "scanner": {"next_hop": f"smtp:127.0.0.1:{next_hop.hop.port}"}})
        with smtplib.SMTP("127.0.0.1", pm.smtp_port, local_hostname=HELO,
                          source_address=("127.0.0.9", 0), timeout=30) as client:
            port = client.sock.getsockname()[1]
            assert client.sendmail("alice@example.org", ["bob@example.test"], message()) == {}
        ((xforward, *_), *_) = [[c for c in conn if c.startswith(b"XFORWARD")]
                                for conn in proxy_filter.commands()]
        ident = xforward.split(b"IDENT=")[1].split()[0]
        assert xforward == (b"XFORWARD NAME=[UNAVAILABLE] ADDR=127.0.0.9 PORT=%d PROTO=ESMTP "
                            b"HELO=%s IDENT=%s SOURCE=REMOTE" % (port, HELO.encode(), ident))

        raw = Raw(pm.scanner_port)
        raw.reply()
        raw.send(b"EHLO mx.test\r\n")
        raw.reply()
        raw.send(b"XFORWARD NAME=spike.example ADDR=192.0.2.55 PORT=40001 PROTO=ESMTP\r\n"
                 b"XFORWARD HELO=spike IDENT=ABCDEF1234 SOURCE=REMOTE\r\n"
                 b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        assert [raw.reply()[0] for _ in range(5)] == [250, 250, 250, 250, 354]
        raw.send(b"Subject: forwarded\r\n\r\nhi\r\n.\r\n")
        assert raw.reply()[0] == 250
        raw.close()
        wait_until(lambda: next_hop.commands(), what="the scanner's re-injection")
        ((xforward, *_), *_) = [[c for c in conn if c.startswith(b"XFORWARD")]
                                for conn in next_hop.commands()]
        assert xforward == (b"XFORWARD NAME=spike.example ADDR=192.0.2.55 PROTO=ESMTP "
                            b"HELO=spike IDENT=ABCDEF1234 SOURCE=REMOTE")
    finally:
        proxy_filter.close()
        next_hop.close()
