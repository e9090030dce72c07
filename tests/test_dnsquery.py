"""The defences' DNS exchange (defence/dnsquery.py): one socket per name server, shared by
every query of a worker, answers handed to the query that asked."""

import time

import dns.rdatatype
import pytest

from poolmgr.config import parse_address
from poolmgr.defence import dnsquery
from poolmgr.defence.dnsquery import Stub
from poolmgr.testing import DnsServer, SilentDns, free_udp_port


@pytest.fixture
def dns_server():
    server = DnsServer({}).start()
    yield server
    server.stop()


def test_queries_asked_at_once_share_a_socket_and_each_gets_its_own_answer(dns_server):
    """200 queries asked before any answer is read: each gets the answer to its own name;
    two queries on one socket never share an ID; each socket sends ROTATE queries, then a
    new one (a new source port) takes over and the old one closes once answered."""
    for n in range(200):
        dns_server.host_record(f"h{n}.example.test", f"192.0.2.{n % 250 + 1}")
    # Time enough for the test's DNS server (Python) to answer 200 on a busy CI machine,
    # and no second try meanwhile: this test is about answers finding their questions.
    stub = Stub(((dns_server.host, dns_server.port),), 20.0)
    stub.try_timeout = 20.0
    dnsquery._ids[:] = [5, 7, 7]  # the next IDs drawn: 7, 7 again, then 5
    asked = [stub.ask(f"h{n}.example.test.", dns.rdatatype.A) for n in range(200)]
    assert (asked[0].id, asked[1].id) == (7, 5)
    channels = {id(q.channel): q.channel for q in asked}
    assert len(channels) == -(-200 // dnsquery.ROTATE)
    assert len({c.sock.getsockname()[1] for c in channels.values()}) == len(channels)
    deadline = time.monotonic() + 20.0
    answers = [question.answer(deadline) for question in asked]
    assert [[r.address for rrset in a.answer for r in rrset] for a in answers] == \
        [[f"192.0.2.{n % 250 + 1}"] for n in range(200)]
    current = stub.channels[0]
    assert all(c.closed for c in channels.values() if c is not current)
    assert not current.closed and not current.waiting


def test_a_name_dns_cannot_carry_gets_no_answer(dns_server):
    stub = Stub(((dns_server.host, dns_server.port),), 1.0)
    for name in ("a" * 64 + ".example.test", "caf\u00e9.example.test", "a..b.example"):
        assert stub.query(name, dns.rdatatype.A, time.monotonic() + 1.0) is None
    assert stub.channels == {}


def test_a_server_that_refuses_or_says_nothing_hands_over_to_the_next(dns_server):
    dns_server.host_record("mail.example.test", "192.0.2.7")
    silent = SilentDns()
    try:
        # A closed port answers at once (ICMP port unreachable); a silent server has its
        # 2 s a try.
        for dead, within in ((("127.0.0.1", free_udp_port()), 0.5),
                             (parse_address(silent.address), 2.5)):
            stub = Stub((dead, (dns_server.host, dns_server.port)), 5.0)
            started = time.monotonic()
            reply = stub.query("mail.example.test.", dns.rdatatype.A, started + 5.0)
            assert [r.address for rrset in reply.answer for r in rrset] == ["192.0.2.7"]
            assert time.monotonic() - started < within
    finally:
        silent.stop()


def test_questions_given_up_or_killed_leave_nothing_behind():
    """A lookup whose greenlet is killed while it waits (a name lookup past reverse_timeout)
    is no longer waited for, and a replaced socket closes once nothing waits on it."""
    import gevent

    silent = SilentDns()
    try:
        stub = Stub((parse_address(silent.address),), 5.0)
        first, deadline = stub.channel(0), time.monotonic() + 5.0
        waiting = [gevent.spawn(stub.query, f"h{n}.example.test.", dns.rdatatype.A, deadline)
                   for n in range(dnsquery.ROTATE + 6)]
        gevent.sleep(0.2)
        assert first is not stub.channels[0] and first.retired and len(first.waiting) == dnsquery.ROTATE and not first.closed
        gevent.killall(waiting)
        assert first.closed and not first.waiting and not stub.channels[0].waiting
        unread = stub.ask("x.example.test.", dns.rdatatype.A)
        unread.cancel()
        assert not stub.channels[0].waiting
    finally:
        silent.stop()


def test_questions_move_on_from_a_refusing_server_together(dns_server):
    """A DNSBL score reads its sites' answers one after another: when the first server
    refuses, the others go on to the next server without waiting for their turn."""
    for n in range(3):
        dns_server.host_record(f"s{n}.example.test", f"192.0.2.{n + 1}")
    stub = Stub((("127.0.0.1", free_udp_port()), (dns_server.host, dns_server.port)), 5.0)
    asked = [stub.ask(f"s{n}.example.test.", dns.rdatatype.A) for n in range(3)]
    assert asked[0].answer(time.monotonic() + 5.0) is not None
    for question in asked[1:]:
        question.advance()
        assert question.server == 1
    assert [[r.address for rrset in q.answer(time.monotonic() + 5.0).answer for r in rrset]
            for q in asked[1:]] == [["192.0.2.2"], ["192.0.2.3"]]
