"""The defences' DNS exchange (defence/dnsquery.py): one socket per name server, shared by
every query of a worker, answers handed to the query that asked."""

import time

import dns.message
import dns.rdatatype
import pytest

from poolmgr.config import parse_address
from poolmgr.defence.dnsquery import Question, Stub
from poolmgr.testing import DnsServer, SilentDns, free_udp_port


@pytest.fixture
def dns_server():
    server = DnsServer({}).start()
    yield server
    server.stop()


def test_queries_asked_at_once_share_one_socket_and_each_gets_its_own_answer(dns_server):
    for n in range(200):
        dns_server.host_record(f"h{n}.example.test", f"192.0.2.{n % 250 + 1}")
    stub = Stub(((dns_server.host, dns_server.port),), 5.0)
    asked = [stub.ask(f"h{n}.example.test.", dns.rdatatype.A) for n in range(199)]
    same = dns.message.make_query("h199.example.test.", dns.rdatatype.A)
    same.id = asked[0].query.id  # two queries on one socket never share an ID
    asked.append(Question(stub, same))
    assert asked[-1].query.id != asked[0].query.id
    deadline = time.monotonic() + 5.0
    answers = [question.answer(deadline) for question in asked]
    assert [[r.address for rrset in a.answer for r in rrset] for a in answers] == \
        [[f"192.0.2.{n % 250 + 1}"] for n in range(200)]
    assert len(stub.channels) == 1 and not stub.channels[0].waiting


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
