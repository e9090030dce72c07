"""Storm defences end to end: real clients from distinct 127.x.y.z addresses, real DNS.

A dnslib DNS server on a loopback UDP port serves the DNSBL zones; poolmgr is pointed at it with
`defence.nameservers`. Each client binds its own source address, so listed and unlisted,
allowlisted and denylisted clients are really different peers.
"""

import re
import signal
import time
from collections import Counter

import pytest

from helpers import Raw, free_port, message, only_worker, served_by, wait_until
from poolmgr.testing import DnsServer, SilentDns


@pytest.fixture
def dns():
    server = DnsServer({}, ttl=300).start()
    yield server
    server.stop()


def talk(pm, source, rcpt="bob@example.test", early=b""):
    """Connect from `source`, optionally talk before the banner, try one RCPT.

    Returns (banner lines, RCPT reply line or None when the server closed)."""
    raw = Raw(pm.smtp_port, source)
    if early:
        raw.send(early)
    try:
        code, banner = raw.reply()
        if code != 220:
            assert raw.closed()
            return banner, None
        if early:  # the early EHLO is answered once the banner is complete
            raw.reply()
        else:
            raw.send(b"EHLO client.test\r\n")
            raw.reply()
        raw.send(f"MAIL FROM:<a@example.org>\r\nRCPT TO:<{rcpt}>\r\n".encode())
        raw.reply()
        return banner, raw.reply()[1][-1]
    finally:
        raw.close()


def send(pm, source):
    with pm.smtp(source=source) as client:
        return client.sendmail("alice@example.org", ["bob@example.test"], message("legit"))


def counters(pm):
    return pm.status()["nuisance"]["total"]["by_reason"]


def test_dnsbl_enforce_rejects_at_rcpt_and_spares_unlisted_clients(make_poolmgr, dns):
    dns.list("127.0.3.2", "zen.test")
    pm = make_poolmgr({"defence": {"dnsbl_sites": ["zen.test*2"], "dnsbl_threshold": 2,
                                   "nameservers": [dns.address], "dnsbl_action": "enforce"}})
    banner, rcpt = talk(pm, "127.0.3.2")
    assert rcpt == "550 5.7.1 Service unavailable; client [127.0.3.2] blocked using zen.test"
    assert send(pm, "127.0.3.3") == {}
    log = pm.log()
    # postscreen's lines, poolmgr's fields after them
    assert re.search(r"DNSBL rank 2 for \[127\.0\.3\.2\]:\d+; sites=zen\.test\(\+2\); "
                     r"action=enforce$", log, re.M)
    assert re.search(r"NOQUEUE: reject: RCPT from \[127\.0\.3\.2\]:\d+: 550 5\.7\.1 Service "
                     r"unavailable; client \[127\.0\.3\.2\] blocked using zen\.test; "
                     r"from=<a@example\.org>, to=<bob@example\.test>, proto=ESMTP, "
                     r"helo=<client\.test>$", log, re.M)
    wait_until(lambda: counters(pm).get("dnsbl") == 1, what="a dnsbl verdict counted")
    # the clean session is counted when the worker has closed it, after the client's QUIT
    wait_until(lambda: pm.status()["nuisance"]["total"]["legit"] == 1,
               what="the clean session counted legit")


def test_dnsbl_drop_answers_521_and_closes(make_poolmgr, dns):
    dns.list("127.0.3.4", "zen.test")
    pm = make_poolmgr({"defence": {"dnsbl_sites": ["zen.test"], "nameservers": [dns.address],
                                   "dnsbl_action": "drop"}})
    banner, rcpt = talk(pm, "127.0.3.4")
    assert rcpt is None
    assert banner[-1] == "521 5.7.1 Service unavailable; client [127.0.3.4] blocked using zen.test"


def test_dnsbl_reply_filters_and_weights(make_poolmgr, dns):
    dns.list("127.0.4.1", "bl.test", "127.0.0.5")   # inside [2..11]: weight 2, blocked
    dns.list("127.0.4.2", "bl.test", "127.0.0.12")  # outside the filter: no score
    dns.list("127.0.4.3", "weak.test")               # weight 1 alone: under the threshold
    dns.list("127.0.4.4", "weak.test")               # 1 + 1 on two sites: at the threshold
    dns.list("127.0.4.4", "other.test")
    pm = make_poolmgr({"defence": {"dnsbl_sites": ["bl.test=127.0.0.[2..11]*2", "weak.test",
                                                   "other.test"],
                                   "dnsbl_threshold": 2, "nameservers": [dns.address],
                                   "suspicious_timeout": "1s"}})
    assert talk(pm, "127.0.4.1")[1].startswith("550 5.7.1")
    assert talk(pm, "127.0.4.4")[1] == ("550 5.7.1 Service unavailable; client [127.0.4.4] "
                                        "blocked using weak.test,other.test")
    assert send(pm, "127.0.4.2") == {}
    assert send(pm, "127.0.4.3") == {}  # scored 1: suspicious (short timeouts), not blocked
    log = pm.log()
    assert re.search(r"DNSBL rank 2 for \[127\.0\.4\.4\]:\d+; "
                     r"sites=weak\.test\(\+1\),other\.test\(\+1\)", log)
    assert "DNSBL rank" not in "".join(line for line in log.splitlines() if "127.0.4.2]" in line)
    # Suspicious: an idle moment longer than suspicious_timeout ends its session; the client
    # listed only outside the filter keeps the normal timeout.
    suspicious, clean = Raw(pm.smtp_port, "127.0.4.3"), Raw(pm.smtp_port, "127.0.4.2")
    for raw in (suspicious, clean):
        raw.reply()
        raw.send(b"EHLO client.test\r\n")
        raw.reply()
    time.sleep(2)
    assert suspicious.reply()[1][-1].startswith("421 4.4.2")
    clean.send(b"NOOP\r\n")
    assert clean.reply()[0] == 250
    suspicious.close(), clean.close()


def test_dnsbl_answers_are_cached_for_the_whole_host(make_poolmgr, dns):
    """With the default two SMTP workers: the first asks once, and both answer from the
    master's cache after that, also after a reload has replaced them."""
    dns.list("127.0.4.9", "zen.test")
    pm = make_poolmgr({"defence": {"dnsbl_sites": ["zen.test"], "nameservers": [dns.address]}})
    first, second = pm.worker_pids("smtp")
    with only_worker(pm, first):
        for _ in range(3):
            assert talk(pm, "127.0.4.9")[1].startswith("550 5.7.1")
    assert dns.queries.count("9.4.0.127.zen.test") == 1
    with only_worker(pm, second):
        for _ in range(2):
            assert talk(pm, "127.0.4.9")[1].startswith("550 5.7.1")
    assert served_by(pm, "127.0.4.9") == [first] * 3 + [second] * 2
    pm.send_signal(signal.SIGHUP)
    wait_until(lambda: not set(pm.worker_pids("smtp")) & {first, second}, what="new workers")
    pm.wait_workers(smtp=2, scanner=2)
    assert talk(pm, "127.0.4.9")[1].startswith("550 5.7.1")
    assert dns.queries.count("9.4.0.127.zen.test") == 1
    assert pm.status()["anvil"]["dnsbl_answers"] >= 1  # (the harness's probe may add one)


def test_dns_server_that_does_not_answer(make_poolmgr):
    silent = SilentDns()
    try:
        pm = make_poolmgr({"defence": {"dnsbl_sites": ["zen.test"], "dnsbl_timeout": "1s",
                                       "nameservers": [silent.address]}})
        assert send(pm, "127.0.5.1") == {}  # the session goes on without a score
        wait_until(lambda: "DNSBL no answer from zen.test for [127.0.5.1]" in pm.log(),
                   what="the timeout logged")
    finally:
        silent.stop()


def test_dns_server_that_fails_every_query(make_poolmgr):
    """SERVFAIL at once: each site scores nothing, logged in one line, no traceback."""
    dns = DnsServer({}, failing=True).start()
    try:
        pm = make_poolmgr({"defence": {"dnsbl_sites": ["zen.test", "bl.test"],
                                       "nameservers": [dns.address]}})
        assert send(pm, "127.0.5.2") == {}
        wait_until(lambda: "DNSBL no answer from zen.test,bl.test for [127.0.5.2]" in pm.log(),
                   what="the failure logged")
        assert len(dns.queries) >= 2 and "Traceback" not in pm.log()
    finally:
        dns.stop()


def test_pregreet_enforce_drop_and_ignore(make_poolmgr):
    pm = make_poolmgr({"defence": {"greet_wait": "1s", "greet_action": "enforce"}})
    banner, rcpt = talk(pm, "127.0.6.1", early=b"EHLO bot.test\r\n")
    assert banner[0].startswith("220-") and banner[-1].startswith("220 ")
    assert rcpt == "550 5.7.1 Service unavailable; client [127.0.6.1] blocked using pregreet test"
    # postscreen's line (the client's text escaped as postscreen does), the action apart
    log = pm.log()
    assert re.search(r"PREGREET 15 after 0(\.\d+)? from \[127\.0\.6\.1\]:\d+: "
                     r"EHLO bot\.test\\r\\n$", log, re.M)
    assert re.search(r"PREGREET action=enforce for \[127\.0\.6\.1\]:\d+$", log, re.M)
    # A client that waits for the whole banner is served, and passes as postscreen says.
    assert send(pm, "127.0.6.2") == {}
    assert re.search(r"PASS NEW \[127\.0\.6\.2\]:\d+$", pm.log(), re.M)
    drop = make_poolmgr({"defence": {"greet_wait": "1s", "greet_action": "drop"}})
    banner, rcpt = talk(drop, "127.0.6.3", early=b"EHLO bot.test\r\n")
    assert rcpt is None and banner[-1].startswith("521 5.7.1")
    ignore = make_poolmgr({"defence": {"greet_wait": "1s", "greet_action": "ignore"}})
    banner, rcpt = talk(ignore, "127.0.6.4", early=b"EHLO bot.test\r\n")
    assert rcpt == "250 2.1.5 Ok"
    assert "action=ignore" in ignore.log()


def test_greet_test_passed_clients_skip_the_pause_on_every_worker(make_poolmgr):
    """With the default two SMTP workers, as the README says: a client that passed skips the
    pause on every worker of the host (the master keeps the pass)."""
    pm = make_poolmgr({"defence": {"greet_wait": "1s"}})
    first, second = pm.worker_pids("smtp")

    def banner_parts():
        raw = Raw(pm.smtp_port, "127.0.6.9")
        lines = raw.reply()[1]  # "220-" then "220 " after the pause; one line when passed
        raw.send(b"QUIT\r\n")
        raw.reply()
        raw.close()
        return len(lines)

    with only_worker(pm, first):
        assert [banner_parts() for _ in range(3)] == [2, 1, 1]
    with only_worker(pm, second):
        assert [banner_parts() for _ in range(2)] == [1, 1]
    assert served_by(pm, "127.0.6.9") == [first] * 3 + [second] * 2
    assert pm.status()["anvil"]["greet_passes"] >= 1


def test_allowlist_skips_every_test_and_denylist_actions(make_poolmgr, tmp_path):
    deny_file = tmp_path / "deny.cidr"
    deny_file.write_text("# bad neighbourhood\n127.0.8.0/24\n")
    pm = make_poolmgr({"defence": {"greet_wait": "1s", "greet_action": "drop",
                                   "allowlist": ["127.0.7.0/24"], "denylist": ["127.0.9.9/32"],
                                   "denylist_file": str(deny_file), "denylist_action": "drop"}})
    banner, rcpt = talk(pm, "127.0.7.1", early=b"EHLO friend.test\r\n")
    assert banner == ["220 mx.example.test ESMTP poolmgr"] and rcpt == "250 2.1.5 Ok"
    for source in ("127.0.9.9", "127.0.8.77"):
        banner, rcpt = talk(pm, source)
        assert rcpt is None
        assert banner == [f"521 5.7.1 Service unavailable; client [{source}] blocked using "
                          "denylist"]
    assert "ALLOWLISTED [127.0.7.1]" in pm.log() and "DENYLISTED [127.0.8.77]" in pm.log()
    enforce = make_poolmgr({"defence": {"denylist": ["127.0.9.0/24"],
                                        "denylist_action": "enforce"}})
    assert talk(enforce, "127.0.9.1")[1].startswith("550 5.7.1")


def test_dual_stack_listener_sees_ipv4_clients_as_ipv4(make_poolmgr):
    """listen = ["[::]:PORT"] takes IPv4 clients as ::ffff:a.b.c.d; the denylist, mynetworks
    (127.0.0.1/32 here: relaying allowed), the log and the Received header see plain IPv4."""
    pm = make_poolmgr({"defence": {"denylist": ["127.0.9.9/32"], "denylist_action": "drop"}},
                      start=False)
    pm.smtp_port = free_port("::")  # free on every address, as [::] (dual stack) needs
    pm.configure("smtp", listen=[f"[::]:{pm.smtp_port}"]).start()
    banner, rcpt = talk(pm, "127.0.9.9")
    assert rcpt is None
    assert banner == ["521 5.7.1 Service unavailable; client [127.0.9.9] blocked using denylist"]
    with pm.smtp(source="127.0.0.1") as client:
        assert client.sendmail("alice@example.org", ["carol@elsewhere.example"],
                               message("relayed")) == {}
    (delivered,) = pm.delivered()
    assert b"Received: from client.test (unknown [127.0.0.1])" in delivered
    # Without a name to look up, `connect from` comes first, as Postfix logs it.
    log = pm.log()
    assert log.index("connect from unknown[127.0.9.9]") < log.index("DENYLISTED [127.0.9.9]")
    assert "::ffff:" not in log


def test_dnsbl_allowlist_threshold_outweighs_pregreet(make_poolmgr, dns):
    dns.list("127.0.10.1", "allow.test")
    pm = make_poolmgr({"defence": {"dnsbl_sites": ["allow.test=127.0.0.2*-2"],
                                   "dnsbl_allowlist_threshold": -1, "nameservers": [dns.address],
                                   "greet_wait": "1s", "greet_action": "enforce"}})
    banner, rcpt = talk(pm, "127.0.10.1", early=b"EHLO good.test\r\n")
    assert rcpt == "250 2.1.5 Ok"
    assert "DNSBL allowlisted rank -2 for [127.0.10.1]" in pm.log()


def test_nuisance_accounting_and_no_nuisance_reaches_the_scanner(make_poolmgr, dns):
    dns.list("127.0.11.1", "zen.test")
    pm = make_poolmgr({"smtp": {"timeout": "2s"},
                       "defence": {"dnsbl_sites": ["zen.test"], "nameservers": [dns.address],
                                   "greet_wait": "0.5s", "denylist": ["127.0.11.2/32"]}})
    # The harness's readiness probe is a lost_after_connect of its own: counted before we start.
    wait_until(lambda: counters(pm).get("lost_after_connect", 0) >= 1,
               what="the readiness probe in the nuisance counters")
    before = Counter(counters(pm))
    talk(pm, "127.0.11.1")                         # dnsbl (enforced)
    talk(pm, "127.0.11.2")                         # denylist (dropped)
    talk(pm, "127.0.11.3", early=b"EHLO x\r\n")    # pregreet
    Raw(pm.smtp_port, "127.0.11.4").close()        # lost after connect
    idle = Raw(pm.smtp_port, "127.0.11.5")         # idle until smtp.timeout
    talk(pm, "127.0.11.6", rcpt="x@elsewhere.example")  # relay attempt
    for n in range(3):
        assert send(pm, f"127.0.12.{n + 1}") == {}
    assert idle.reply()[0] == 220
    assert idle.reply()[1][-1].startswith("421 4.4.2")
    idle.close()
    expected = dict(before + Counter({"dnsbl": 1, "denylist": 1, "pregreet": 1,
                                      "lost_after_connect": 1, "idle_timeout": 1,
                                      "relay_denied": 1}))
    wait_until(lambda: counters(pm) == expected, timeout=10,
               what=f"nuisance counters {expected}, have {counters(pm)}")
    status = pm.status()
    assert status["nuisance"]["total"]["legit"] == 3
    nuisance = sum(expected.values())
    ratio = round(nuisance / (nuisance + 3), 3)
    wait_until(lambda: pm.status()["nuisance"]["ratio"] == ratio, timeout=5,
               what=f"the windowed nuisance ratio {ratio}")
    assert f"nuisance ratio {ratio:.2f}" in pm.run_cli("status").stdout
    # Only the three legitimate messages were handed to the scanner pool: it scanned three,
    # over at most three connections (an SMTP worker keeps its hand-off connection open).
    assert status["pools"]["smtp"]["counters"]["handoffs"] == 3
    assert 1 <= status["pools"]["scanner"]["counters"]["connections"] <= 3
    assert status["pools"]["scanner"]["counters"]["scanned"] == 3


def test_suspicious_clients_get_the_short_timeout(make_poolmgr, dns):
    dns.list("127.0.13.1", "weak.test")
    pm = make_poolmgr({"defence": {"dnsbl_sites": ["weak.test"], "dnsbl_threshold": 5,
                                   "nameservers": [dns.address], "suspicious_timeout": "1s"}})
    suspicious = Raw(pm.smtp_port, "127.0.13.1")
    normal = Raw(pm.smtp_port, "127.0.13.2")
    suspicious.reply(), normal.reply()
    started = time.monotonic()
    assert suspicious.reply()[1][-1].startswith("421 4.4.2")  # after about 1 s, not 300 s
    assert time.monotonic() - started < 30
    normal.send(b"NOOP\r\n")
    assert normal.reply()[0] == 250  # the normal client is still welcome
    suspicious.close(), normal.close()
