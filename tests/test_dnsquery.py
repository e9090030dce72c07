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
    stub = Stub(((dns_server.host, dns_server.port),), 5.0)
    dnsquery._ids[:] = [5, 7, 7]  # the next IDs drawn: 7, 7 again, then 5
    asked = [stub.ask(f"h{n}.example.test.", dns.rdatatype.A) for n in range(200)]
    assert (asked[0].id, asked[1].id) == (7, 5)
    channels = {id(q.channel): q.channel for q in asked}
    assert len(channels) == -(-200 // dnsquery.ROTATE)
    assert len({c.sock.getsockname()[1] for c in channels.values()}) == len(channels)
    deadline = time.monotonic() + 5.0
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
