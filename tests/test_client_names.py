"""Client names end to end, as Postfix's smtpd finds them: real poolmgr, real DNS.

The project's DNS server (dnslib on a loopback UDP port) serves the PTR records of test
clients, each of which binds its own 127.x.y.z source address, and the A records their names
resolve back to; poolmgr asks it through `defence.nameservers`. The message goes through the
whole pipeline (SMTP worker, scanner) to a recording next hop, which shows the XFORWARD NAME
the scanner passed on.
"""

import re
import time
from types import SimpleNamespace

import pytest

from helpers import message, wait_until
from test_fail2ban import fail2ban_regex
from poolmgr.config import parse_address
from poolmgr.defence.peername import LOOKUP_FAILED, UNKNOWN, Names, Peername
from poolmgr.testing import DnsServer, Recorder, SilentDns

NAMED = "127.0.8.7"      # mail.example.test, which resolves back
NO_PTR = "127.0.8.8"     # no PTR record
NOT_BACK = "127.0.8.9"   # a PTR whose name has no A record
SENDER, RCPT = "alice@example.org", "bob@example.test"


@pytest.fixture
def dns():
    server = DnsServer({}, ttl=300).start()
    server.host_record("mail.example.test", NAMED)
    server.pointer(NOT_BACK, "forged.example.test")
    yield server
    server.stop()


@pytest.fixture
def hop():
    recorder = Recorder().start()
    yield recorder
    recorder.stop()


def named_poolmgr(make_poolmgr, nameservers, hop=None, **defence):
    overrides = {"defence": {"reverse_lookup": True, "nameservers": nameservers, **defence}}
    if hop is not None:
        overrides["scanner"] = {"next_hop": f"smtp:127.0.0.1:{hop.port}"}
    return make_poolmgr(overrides)


def rcpt_reply(pm, source):
    """Connect from `source`, send one message; the RCPT's reply, and the time it took to the
    end of DATA (or to the refusal)."""
    started = time.monotonic()
    with pm.smtp(source=source) as client:
        client.ehlo("client.test")
        client.mail(SENDER)
        code, text = client.rcpt(RCPT)
        if code == 250:
            client.data(message("named"))
    return code, text.decode(), time.monotonic() - started


def test_the_lookup_confirms_the_name_with_the_address_family_of_the_client(dns):
    """PTR, then A for an IPv4 client and AAAA for an IPv6 one (no server, no cache)."""
    dns.host_record("v6.example.test", "2001:db8::7", "127.0.8.30")
    dns.pointer("2001:db8::8", "mail.example.test")  # its name has an A record only
    names = Names(((dns.host, dns.port),), timeout=2.0, min_ttl=60, max_ttl=3600)
    assert names.find(NAMED) == Peername("mail.example.test", "mail.example.test", False)
    assert names.find("2001:db8::7") == Peername("v6.example.test", "v6.example.test", False)
    assert names.find("127.0.8.30") == Peername("v6.example.test", "v6.example.test", False)
    assert names.find("2001:db8::8") == Peername(UNKNOWN, "mail.example.test", False)
    assert names.find(NOT_BACK) == Peername(UNKNOWN, "forged.example.test", False)
    assert names.find(NO_PTR) == Peername(UNKNOWN, UNKNOWN, False)
    assert "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa" \
        in dns.queries


def test_a_lookup_without_answers_is_temporary():
    """SERVFAIL, or a resolver that is down: given up within the timeout, not cached."""
    failing, silent = DnsServer({}, failing=True).start(), SilentDns()
    try:
        cache = []
        state = SimpleNamespace(name_cached=lambda ip: None,
                                cache_name=lambda *answer: cache.append(answer))
        for server in ((failing.host, failing.port), parse_address(silent.address)):
            names = Names((server,), timeout=0.3, min_ttl=60, max_ttl=3600, state=state)
            started = time.monotonic()
            assert names.find(NAMED) == LOOKUP_FAILED
            assert time.monotonic() - started < 1.0
        assert cache == []
    finally:
        failing.stop()
        silent.stop()


def test_a_client_whose_name_resolves_back_is_shown_by_name(make_poolmgr, dns, hop):
    pm = named_poolmgr(make_poolmgr, [dns.address], hop)
    for _ in range(2):  # the second connection finds the name in the host's cache
        with pm.smtp(source=NAMED) as client:
            assert client.sendmail(SENDER, [RCPT], message("named")) == {}
    copies = hop.copies(RCPT)
    assert len(copies) == 2
    assert copies[0].xforward["NAME"] == "mail.example.test"
    assert copies[0].xforward["ADDR"] == NAMED
    assert b"Received: from client.test (mail.example.test [127.0.8.7])\r\n\tby " \
           b"mx.example.test (poolmgr)" in copies[0].data
    log = pm.log()
    assert len(re.findall(r"poolmgr/smtpd\[\d+\]: connect from mail\.example\.test"
                          r"\[127\.0\.8\.7\]", log)) == 2
    # the SMTP worker's line and the scanner's, told by XFORWARD
    assert len(re.findall(r": client=mail\.example\.test\[127\.0\.8\.7\]", log)) == 4
    assert "unknown[127.0.8.7]" not in log
    assert dns.queries.count("7.8.0.127.in-addr.arpa") == 1
    assert dns.queries.count("mail.example.test") == 1
    assert pm.status()["anvil"]["client_names"] >= 1


def test_no_ptr_or_a_name_that_does_not_resolve_back_is_unknown(make_poolmgr, dns, hop):
    pm = named_poolmgr(make_poolmgr, [dns.address], hop)
    for source in (NO_PTR, NOT_BACK):
        code, _, _ = rcpt_reply(pm, source)
        assert code == 250  # unknown_reverse_client_action = ignore, the default
        assert f"connect from unknown[{source}]" in pm.log()
        (copy,) = [c for c in hop.copies(RCPT) if c.xforward["ADDR"] == source]
        assert copy.xforward["NAME"] == "unknown"  # as Postfix sends it
        assert f"Received: from client.test (unknown [{source}])".encode() in copy.data
    assert "forged.example.test" in dns.queries  # it was asked, and had no address
    assert "warning: hostname forged.example.test does not resolve to address 127.0.8.9" \
        in pm.log()
    assert "forged.example.test[" not in pm.log()


@pytest.mark.parametrize("action, code", [("tempfail", 450), ("reject", 550), ("ignore", 250)])
def test_unknown_reverse_client_action(make_poolmgr, dns, action, code, tmp_path):
    pm = named_poolmgr(make_poolmgr, [dns.address], unknown_reverse_client_action=action)
    # The harness's own probe (connect, read the banner, close) is no part of the test.
    wait_until(lambda: re.search(r"smtpd\[\d+\]: disconnect from unknown\[127\.0\.0\.1\]",
                                 pm.log()), what="the harness's probe logged")
    starts = pm.log_path.stat().st_size
    got, text, _ = rcpt_reply(pm, NO_PTR)
    assert got == code
    if code != 250:
        status = "4.7.25" if code == 450 else "5.7.25"
        reply = (f"{code} {status} Client host rejected: cannot find your reverse hostname, "
                 f"[{NO_PTR}]")
        assert text == reply[4:]
        assert f"NOQUEUE: reject: RCPT from unknown[{NO_PTR}]: {reply}; from=<{SENDER}> " \
               f"to=<{RCPT}> proto=ESMTP helo=<client.test>" in pm.log()
    # named clients, a PTR that does not resolve back (it is a reverse name: Postfix's
    # reject_unknown_reverse_client_hostname passes it) and mynetworks pass
    for source in (NAMED, NOT_BACK, "127.0.0.1"):
        assert rcpt_reply(pm, source)[0] == 250, source
    assert "connect from unknown[127.0.0.1]" in pm.log()  # exempt, not named
    assert len(pm.delivered()) == 3 + (code == 250)
    if action == "tempfail":  # fail2ban's postfix filter knows the refusal, and only it
        part = tmp_path / "part.log"
        part.write_bytes(pm.log_path.read_bytes()[starts:])
        assert set(fail2ban_regex(part, "--out", "ip").split()) == {NO_PTR}


def test_the_embedded_default_delivers_within_3s_whatever_the_resolver_does(make_poolmgr):
    """The resolvers of /etc/resolv.conf (on these machines one that answers NXDOMAIN for
    every name, or none that answers at all), and a resolver that is down: the lookup gives
    up at reverse_timeout (2 s) and the message is delivered within 3 s."""
    pm = make_poolmgr({"defence": {"reverse_lookup": True}})  # the embedded default
    code, _, took = rcpt_reply(pm, "127.0.8.20")
    assert code == 250 and took < 3.0, took
    assert "connect from unknown[127.0.8.20]" in pm.log()
    silent = SilentDns()
    try:
        pm = named_poolmgr(make_poolmgr, [silent.address], unknown_reverse_client_action="reject")
        code, _, took = rcpt_reply(pm, "127.0.8.21")
        assert code == 250 and 1.9 < took < 3.0, took  # no answer: not rejected
        assert "connect from unknown[127.0.8.21]" in pm.log()
        pm = named_poolmgr(make_poolmgr, [silent.address],
                           unknown_reverse_client_action="tempfail")
        code, _, took = rcpt_reply(pm, "127.0.8.22")
        assert code == 450 and 1.9 < took < 3.0, took  # no answer: unknown, for tempfail
        assert rcpt_reply(pm, "127.0.0.1")[0] == 250  # mynetworks
    finally:
        silent.stop()
