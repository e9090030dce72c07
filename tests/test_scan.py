"""scanner/scan.py: `poolmgr scan FILE|-` (one message through the configured checks, the
verdict as its exit code) against a real clamd and spamd, and `scanner.bypass_virus_checks`
through a real poolmgr: mail from those clients skips clamd and builtin's EICAR, while
builtin's rules and the spam checks still run."""

import json
import re
import smtplib
import subprocess
import sys

import pytest

from helpers import HELO, Raw, message, wait_until, write_config
from poolmgr.scanner import quarantine
from poolmgr.scanner.backends.builtin import EICAR
from poolmgr.testing import EICAR_NAME, Clamd, Recorder, Spamd, free_port
from test_clamd import mime, zipped
from test_spamd import PLAIN, spam


@pytest.fixture(scope="module")
def clamd():
    with Clamd() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def spamd():
    daemon = Spamd().start()
    yield daemon
    daemon.stop()


def virus() -> bytes:
    """EICAR inside a zip: only clamd finds it (the builtin check does not unpack archives)."""
    return mime(zipped("readme.txt", b"padding\n" * 50 + EICAR), "files.zip", "application/zip")


def scan(tmp_path, scanner: dict, data: bytes, *args: str) -> subprocess.CompletedProcess:
    """`poolmgr scan -` with a config of these [scanner] settings, the message on stdin."""
    config = write_config(tmp_path / "scan.toml", {"scanner": {"hostname": "mx.test",
                                                               **scanner}})
    return subprocess.run([sys.executable, "-m", "poolmgr", "scan", "-", "-c", str(config),
                           *args], input=data, capture_output=True, timeout=60)


def test_a_clean_message_exits_0_with_the_headers_it_would_get(tmp_path, clamd):
    result = scan(tmp_path, {"checks": ["builtin", "clamd"], "clamd": {"address": clamd.address}},
                  PLAIN.replace(b"\r\n", b"\n"))  # a file with LF line ends, as on disk
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "Verdict: clean (clean)\nAction: deliver\n" in out
    assert "Check builtin: nothing found\nCheck clamd: nothing found\n" in out
    assert "Header: X-Virus-Scanned: poolmgr at mx.test\n" in out
    assert "Header: X-Poolmgr-Scan: clean by poolmgr at mx.test\n" in out


def test_a_virus_found_by_clamd_exits_2_with_the_reply(tmp_path, clamd):
    result = scan(tmp_path, {"checks": ["builtin", "clamd"], "clamd": {"address": clamd.address}},
                  virus(), "--json")
    assert result.returncode == 2, result.stderr
    found = json.loads(result.stdout)
    assert (found["kind"], found["action"], found["exit"]) == ("virus", "reject", 2)
    assert found["reply"].startswith(f"554 5.7.0 Rejected: virus found: {EICAR_NAME}")
    assert found["checks"] == [{"check": "builtin"},
                               {"check": "clamd", "virus": found["checks"][1]["virus"]}]


def test_spam_exits_1_with_its_score_and_tests(tmp_path, spamd):
    result = scan(tmp_path, {"checks": ["builtin", "spamd"], "spamd": {"address": spamd.address},
                             "spam_action": "reject"}, spam())
    out = result.stdout.decode()
    assert result.returncode == 1, (out, result.stderr)
    assert "Verdict: spam_killed (SPAM (score=" in out
    assert "Action: reject: 554 5.7.0 Rejected: spam, score=" in out
    assert "GTUBE" in out.split("Tests: ")[1].splitlines()[0]
    assert "Header: X-Spam-Flag: YES\n" in out and "Subject tag: '***Spam*** '" in out


def test_a_check_that_cannot_answer_exits_75(tmp_path):
    down = f"127.0.0.1:{free_port()}"
    for on_failure in ("tempfail", "pass"):  # an unchecked pass is no clean bill either
        result = scan(tmp_path, {"checks": ["builtin", "clamd"],
                                 "clamd": {"address": down, "on_failure": on_failure}},
                      PLAIN)
        assert result.returncode == 75, result.stdout
        assert f"Check clamd: failed (connect to {down}: Connection refused), on_failure " \
               f"{on_failure}" in result.stdout.decode()
        assert b"clamd check failed" in result.stderr


def test_the_client_decides_the_bypass_and_a_bank_its_policy(tmp_path):
    eicar = message("test virus", EICAR.decode() + "\r\n")
    settings = {"bypass_virus_checks": ["192.0.2.0/24"],
                "policy": [{"name": "after-queue", "listen": f"127.0.0.1:{free_port()}",
                            "virus_action": "discard", "bypass_virus_checks": []}]}
    assert scan(tmp_path, settings, eicar, "--client", "198.51.100.7").returncode == 2
    bypassed = scan(tmp_path, settings, eicar, "--client", "192.0.2.7")
    assert bypassed.returncode == 0 and b"X-Virus-Scanned" not in bypassed.stdout
    banked = scan(tmp_path, settings, eicar, "--client", "192.0.2.7", "--policy", "after-queue")
    assert banked.returncode == 2 and b"Action: discard\n" in banked.stdout
    unknown = scan(tmp_path, settings, eicar, "--policy", "nonesuch")
    assert unknown.returncode == 64 and b"no policy bank named 'nonesuch'" in unknown.stderr
    prefixed = scan(tmp_path, settings, eicar, "--client", "IPv6:2001:db8::7")
    assert prefixed.returncode == 2 and b"X-Virus-Scanned" in prefixed.stdout
    garbage = scan(tmp_path, settings, eicar, "--client", "foo")  # 2 would be a verdict
    assert garbage.returncode == 64 and garbage.stderr == \
        b"poolmgr: error: --client 'foo' is not an IP address\n"


def test_bypass_virus_checks_skips_clamd_and_eicar_but_not_the_rules(make_poolmgr, clamd):
    """amavisd's @bypass_virus_checks_maps, by client as bypass_spam_checks is: mail from
    127.0.0.0/8 (the SMTP pool's real client, through XFORWARD) is not virus-checked; a
    content rule still rejects; a client outside still gets its viruses found."""
    pm = make_poolmgr(start=False)
    pm.configure("scanner", checks=["builtin", "clamd"], bypass_virus_checks=["127.0.0.0/8"],
                 quarantine=str(pm.dir / "quarantine"),
                 clamd={"address": clamd.address, "timeout": "5s"},
                 rules=[{"name": "no-lottery", "header": "Subject", "pattern": "(?i)lottery"}])
    pm.start()
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], virus()) == {}
        assert client.sendmail("alice@example.org", ["bob@example.test"],
                               message("eicar", EICAR.decode() + "\r\n")) == {}
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("alice@example.org", ["bob@example.test"], message("lottery win"))
        assert refused.value.smtp_code == 554
    delivered = pm.delivered()
    assert len(delivered) == 2
    assert all(b"X-Virus-Scanned" not in d for d in delivered)
    assert pm.status()["scanner"]["checks"]["clamd"]["runs"] == 0
    raw = Raw(pm.scanner_port)  # Postfix as content_filter, for a client outside
    raw.reply()
    raw.send(f"EHLO {HELO}\r\nXFORWARD ADDR=192.0.2.9\r\n"
             "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n".encode())
    assert [raw.reply()[0] for _ in range(5)] == [250, 250, 250, 250, 354]
    raw.send(virus() + b".\r\n")
    code, lines = raw.reply()
    assert code == 554 and f"virus found: {EICAR_NAME}" in lines[-1]
    raw.close()
    assert pm.status()["scanner"]["checks"]["clamd"]["runs"] == 1


def test_the_forwarded_client_address_is_taken_as_postfix_takes_it(make_poolmgr):
    """XFORWARD ADDR in the bypass lists' terms: an IPv6 address with its `IPv6:` prefix (as
    Postfix sends it) is the address, and goes on to the next hop with the prefix again (as
    Postfix's smtpd requires it); [UNAVAILABLE] (a forwarded local submission) is an unknown
    client, which no bypass list matches; one that is no address is refused (501, the odd
    octets said as ?), the message going on from the peer. Each was a session failed after
    DATA (451) when a bypass list asked about it."""
    hop = Recorder().start()
    pm = make_poolmgr(start=False)
    pm.configure("scanner", bypass_virus_checks=["2001:db8::/32", "127.0.0.0/8"],
                 virus_action="reject", next_hop=f"smtp:127.0.0.1:{hop.port}",
                 quarantine=str(pm.dir / "quarantine"))
    pm.start()
    codes = {}
    try:
        for addr in ("IPv6:2001:db8::7", "[UNAVAILABLE]", "not-an-\xe9ddress"):
            raw = Raw(pm.scanner_port)
            raw.reply()
            raw.send(f"EHLO {HELO}\r\nXFORWARD ADDR={addr}\r\n"
                     "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
                     .encode("latin-1"))
            replies = [raw.reply() for _ in range(5)]
            raw.send(message("eicar", EICAR.decode() + "\r\n") + b".\r\n")  # builtin finds it
            codes[addr] = replies[1][1][-1], raw.reply()[0]
            raw.close()
    finally:
        hop.stop()
    assert codes["IPv6:2001:db8::7"] == ("250 2.0.0 Ok", 250)  # bypassed: delivered
    assert codes["[UNAVAILABLE]"] == ("250 2.0.0 Ok", 554)  # unknown: virus-checked
    # The peer, 127.0.0.1, is in a bypass list: delivered.
    assert codes["not-an-\xe9ddress"] == ("501 5.5.4 Bad ADDR syntax: not-an-?ddress", 250)
    assert sorted(copy.xforward["ADDR"] for copy in hop.accepted) == \
        ["127.0.0.1", "IPv6:2001:db8::7"]
    assert "client=unknown[2001:db8::7]" in pm.log()
    assert "client=unknown[unknown]" in pm.log()
    assert "failed after" not in pm.log()
    # amavisd leaves an unknown client out of its Blocked line, not an empty [].
    assert re.search(r"Blocked INFECTED \(.+\) \{Rejected,Quarantined\}, "
                     r"<a@example.org> -> <b@example.test>", pm.log()), pm.log()
    assert [e.client for e in quarantine.entries(str(pm.dir / "quarantine"))] == [""]


def with_spamd(make_poolmgr, spamd, **scanner):
    pm = make_poolmgr(start=False)
    pm.configure("scanner", **{"checks": ["builtin", "spamd"], "spam_action": "reject",
                               "spamd": {"address": spamd.address},
                               "quarantine": str(pm.dir / "quarantine"),
                               "spam_lovers": ["abuse@example.test", "@lovers.test"],
                               **scanner})
    return pm


def envelope_of(dump: bytes) -> list[bytes]:
    """The recipients smtp-sink was given (its X-Rcpt-Args lines)."""
    return [line.split(b": ", 1)[1] for line in dump.split(b"\n")
            if line.startswith(b"X-Rcpt-Args: ")]


def test_spam_lovers_get_spam_tagged_and_the_others_do_not(make_poolmgr, make_sink, spamd):
    """amavisd's @spam_lovers_maps: spam at kill_level with spam_action = reject is delivered,
    tagged, to a lover (an address, or anyone @domain); mixed with others over SMTP (one
    reply), the others' copy is discarded into the quarantine."""
    sink = make_sink()
    pm = with_spamd(make_poolmgr, spamd, next_hop=f"smtp:127.0.0.1:{sink.port}").start()
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["Abuse@example.test"], spam()) == {}
        assert client.sendmail("alice@example.org", ["carol@lovers.test", "bob@example.test"],
                               spam()) == {}
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("alice@example.org", ["bob@example.test"], spam())
        assert refused.value.smtp_code == 554
    wait_until(lambda: len(sink.messages()) == 2, what="the lovers' copies at smtp-sink")
    dumps = sink.messages()  # named by time of arrival to the second: in no certain order
    assert sorted(envelope_of(d) for d in dumps) == [[b"<Abuse@example.test>"],
                                                     [b"<carol@lovers.test>"]]
    for dump in dumps:
        assert b"X-Spam-Flag: YES" in dump and b"Subject: ***Spam*** " in dump
    assert re.search(r"Passed SPAM, \[127\.0\.0\.1\] <alice@example\.org> -> "
                     r"<carol@lovers\.test>", pm.log())
    assert re.search(r"Blocked SPAM \{Discarded,Quarantined\}, \[127\.0\.0\.1\] "
                     r"<alice@example\.org> -> <bob@example\.test>", pm.log())
    kept = json.loads(pm.run_cli("quarantine", "list", "--json", check=True).stdout)
    assert [e["recipients"] for e in kept] == [["bob@example.test"], ["bob@example.test"]]


@pytest.fixture
def hop():
    recorder = Recorder().start()
    yield recorder
    recorder.stop()


def test_lovers_the_next_hop_refuses_are_told_to_the_sender(make_poolmgr, hop, spamd):
    """Over SMTP the others' copy is discarded (250); when the next hop then refuses every
    lover, the sender gets a non-delivery notification naming them, as for any recipient
    refused beside accepted ones; when that cannot go either, the whole message gets 451."""
    unknown = "550 5.1.1 <abuse@example.test>: Recipient address rejected: User unknown"
    hop.rcpt_replies = {"abuse@example.test": unknown}
    pm = with_spamd(make_poolmgr, spamd, next_hop=f"smtp:127.0.0.1:{hop.port}").start()
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["abuse@example.test", "bob@example.test"],
                               spam()) == {}
    (report,) = hop.copies("alice@example.org")
    assert report.mail_from == "" and b"report-type=delivery-status" in report.data
    assert b"Final-Recipient: rfc822; abuse@example.test\r\n" in report.data
    assert f"Diagnostic-Code: smtp; {unknown}\r\n".encode() in report.data
    assert b"Final-Recipient: rfc822; bob@example.test" not in report.data
    assert re.search(r"Blocked SPAM \{Discarded,Quarantined\}, .* -> <bob@example\.test>",
                     pm.log())
    assert "sender non-delivery notification: " in pm.log()
    hop.rcpt_replies["alice@example.org"] = unknown.replace("abuse@", "alice@")
    with pm.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            client.sendmail("alice@example.org", ["abuse@example.test", "bob@example.test"],
                            spam())
    assert deferred.value.smtp_code == 451
    assert "sender non-delivery notification to <alice@example.org> failed" in pm.log()
    assert len(hop.accepted) == 1  # the first notification: nothing was delivered


def test_spam_lovers_over_lmtp_get_a_reply_each(make_poolmgr, spamd):
    pm = with_spamd(make_poolmgr, spamd).start()
    raw = Raw(pm.scanner_port)
    raw.reply()
    raw.send(b"LHLO mx.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.test>\r\n"
             b"RCPT TO:<abuse@example.test>\r\nDATA\r\n")
    assert [raw.reply()[0] for _ in range(5)] == [250, 250, 250, 250, 354]
    raw.send(spam() + b".\r\n")
    bob, abuse = raw.reply(), raw.reply()
    assert bob[0] == 554 and "Rejected: spam, score=" in bob[1][-1]
    assert abuse[0] == 250
    raw.close()
    (delivered,) = pm.delivered()
    assert b"X-Spam-Flag: YES" in delivered
    assert json.loads(pm.run_cli("quarantine", "list", "--json", check=True).stdout)[0][
        "recipients"] == ["bob@example.test"]


def test_a_lover_and_others_without_a_quarantine_are_deferred_whole(make_poolmgr, spamd):
    """Over SMTP the others' copy can only be discarded; with nowhere to keep it the whole
    message gets 451 and nothing is delivered (the sender retries: nothing lost)."""
    pm = with_spamd(make_poolmgr, spamd, quarantine="").start()
    with pm.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            client.sendmail("alice@example.org", ["abuse@example.test", "bob@example.test"],
                            spam())
    assert deferred.value.smtp_code == 451
    assert pm.delivered() == []


def test_poolmgr_scan_names_the_spam_lovers(tmp_path, spamd):
    result = scan(tmp_path, {"checks": ["spamd"], "spamd": {"address": spamd.address},
                             "spam_action": "reject", "spam_lovers": ["@lovers.test"]},
                  spam(), "--rcpt", "bob@example.test", "--rcpt", "eve@lovers.test")
    assert result.returncode == 1
    assert b"Spam lovers, delivered tagged: <eve@lovers.test>\n" in result.stdout
