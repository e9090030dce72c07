"""Verdicts through a real poolmgr with a real clamd (Debian's clamav-daemon, a local EICAR
signature): reject with the virus name, discard into the quarantine and release from it, a
clamd that is down (tempfail: 451, nothing lost; pass: delivered unchecked), amavisd's headers
with forged copies removed; and the quarantine's own bookkeeping (list, purge)."""

import json
import smtplib
import time
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import message
from poolmgr.scanner import quarantine
from poolmgr.scanner.backends.builtin import EICAR
from poolmgr.testing import EICAR_NAME, Clamd, free_port
from test_clamd import mime, zipped


@pytest.fixture(scope="module")
def clamd():
    with Clamd() as daemon:
        yield daemon


def with_clamd(make_poolmgr, address: str, **scanner):
    pm = make_poolmgr(start=False)
    pm.configure("scanner", checks=["builtin", "clamd"], quarantine=str(pm.dir / "quarantine"),
                 clamd={"address": address, "timeout": "5s", **scanner.pop("clamd", {})},
                 **scanner)
    return pm.start()


def virus() -> bytes:
    """EICAR inside a zip: only clamd finds it (the builtin check does not unpack archives)."""
    return mime(zipped("readme.txt", b"padding\n" * 50 + EICAR), "files.zip", "application/zip")


def listed(pm) -> list[dict]:
    result = pm.run_cli("quarantine", "list", "--json", check=True)
    return json.loads(result.stdout)


def test_virus_found_by_clamd_is_rejected_and_quarantined(make_poolmgr, clamd):
    pm = with_clamd(make_poolmgr, clamd.address)
    with pm.smtp() as client:
        client.ehlo()
        client.mail("alice@example.org")
        client.rcpt("bob@example.test")
        code, text = client.data(virus())
    assert code == 554 and text.startswith(b"5.7.0 Rejected: virus found: " +
                                           EICAR_NAME.encode())
    assert pm.delivered() == []
    assert f"Blocked INFECTED ({EICAR_NAME}.UNOFFICIAL) {{Rejected,Quarantined}}" in pm.log()
    (entry,) = listed(pm)
    assert (entry["verdict"], entry["sender"], entry["recipients"]) == (
        "virus", "alice@example.org", ["bob@example.test"])
    assert entry["client"] == "127.0.0.1" and entry["reason"].startswith("INFECTED")
    shown = pm.run_cli("quarantine", "show", entry["id"], check=True).stdout
    assert "files.zip" in shown


def test_discarded_virus_is_accepted_kept_and_released(make_poolmgr, clamd):
    """After Postfix's queue a reject is backscatter: discard accepts, keeps, delivers nothing;
    `poolmgr quarantine release` delivers it to the next hop."""
    pm = with_clamd(make_poolmgr, clamd.address, virus_action="discard")
    with pm.smtp() as client:
        client.ehlo()
        client.mail("alice@example.org")
        client.rcpt("bob@example.test")
        code, text = client.data(virus())
    (entry,) = listed(pm)
    assert code == 250 and text.startswith(f"2.7.0 Ok, discarded, id={entry['id']}".encode())
    assert pm.delivered() == [] and "{Discarded,Quarantined}" in pm.log()
    released = pm.run_cli("quarantine", "release", entry["id"])
    assert released.returncode == 0, released.stderr
    (delivered,) = pm.delivered()
    assert b"files.zip" in delivered
    assert delivered.startswith(b"Return-Path: <alice@example.org>\r\nX-Poolmgr-Scan: released "
                                b"from quarantine (" + entry["id"].encode())
    assert listed(pm)[0]["released"]
    assert pm.run_cli("quarantine", "release", "no-such-id").returncode == 1


@pytest.mark.log_allows(r"clamd check failed")
def test_clamd_down_with_tempfail_gives_451_and_nothing_is_lost(make_poolmgr):
    pm = with_clamd(make_poolmgr, f"127.0.0.1:{free_port()}")
    with pm.smtp() as client:
        client.ehlo()
        client.mail("alice@example.org")
        client.rcpt("bob@example.test")
        code, text = client.data(message("retry me"))
    assert (code, text) == (451, b"4.3.0 Error: content check clamd unavailable, try again "
                                 b"later")
    assert pm.delivered() == [] and listed(pm) == []
    assert "clamd check failed: connect to 127.0.0.1:" in pm.log()


def test_clamd_down_with_pass_delivers_unchecked(make_poolmgr):
    pm = with_clamd(make_poolmgr, f"127.0.0.1:{free_port()}", clamd={"on_failure": "pass"})
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], message("pass")) == {}
    (delivered,) = pm.delivered()
    assert b"X-Poolmgr-Scan: clean (unchecked by clamd)" in delivered
    assert "clamd check failed: connect to" in pm.log() and "(passed unchecked)" in pm.log()
    assert "Passed UNCHECKED" in pm.log()


def test_clean_mail_gets_amavisd_headers_and_forged_ones_are_removed(make_poolmgr, clamd):
    pm = with_clamd(make_poolmgr, clamd.address)
    forged = (b"X-Virus-Scanned: by nobody\r\nX-Spam-Flag: NO\r\nX-Spam-Status: No, score=-9\r\n"
              b"X-Poolmgr-Scan: clean\r\n")
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"],
                               forged + message("clean")) == {}
    (delivered,) = pm.delivered()
    head = delivered.split(b"\r\n\r\n")[0]
    assert head.count(b"X-Virus-Scanned:") == 1
    assert b"X-Virus-Scanned: poolmgr at " in head
    assert b"X-Spam-" not in head and b"score=-9" not in delivered
    assert head.count(b"X-Poolmgr-Scan:") == 1
    assert "Passed CLEAN, [127.0.0.1] <alice@example.org> -> <bob@example.test>" in pm.log()


def test_purge_removes_only_what_is_older(tmp_path):
    where = str(tmp_path / "q")
    old = quarantine.keep(where, b"Subject: old\r\n\r\n", queue_id="Q1", client="192.0.2.1",
                          sender="a@x", recipients=["b@y"], verdict="virus", reason="INFECTED")
    time.sleep(0.05)
    cut = time.time()
    new = quarantine.keep(where, b"Subject: new\r\n\r\n", queue_id="Q2", client="192.0.2.1",
                          sender="a@x", recipients=["b@y"], verdict="spam_killed",
                          reason="SPAM")
    assert quarantine.purge(where, older_than=0.0, now=cut) == [old]
    assert [e.id for e in quarantine.entries(where)] == [new]
    assert not (tmp_path / "q" / f"{old}.eml").exists()


def test_verdicts_and_check_latency_in_status_top_and_metrics(make_poolmgr, clamd):
    port = free_port()
    pm = make_poolmgr({"metrics": {"listen": f"127.0.0.1:{port}"}}, start=False)
    pm.configure("scanner", checks=["builtin", "clamd"], quarantine=str(pm.dir / "quarantine"),
                 clamd={"address": clamd.address})
    pm.start()
    with pm.smtp() as client:
        client.sendmail("alice@example.org", ["bob@example.test"], message("one"))
        client.sendmail("alice@example.org", ["bob@example.test"], message("two"))
        with pytest.raises(smtplib.SMTPDataError):
            client.sendmail("alice@example.org", ["bob@example.test"], virus())
    scanner = pm.status()["scanner"]
    assert scanner["verdicts"] == {"clean": 2, "spam_tagged": 0, "spam_killed": 0, "virus": 1,
                                   "banned": 0, "failed": 0, "deferred": 0}
    clamd_runs = scanner["checks"]["clamd"]
    assert (clamd_runs["runs"], clamd_runs["failed"]) == (3, 0)
    assert sum(clamd_runs["buckets"]) == 3 and clamd_runs["seconds"] > 0
    text = pm.run_cli("status", check=True).stdout
    assert "scanner verdicts: clean 2, spam_tagged 0, spam_killed 0, virus 1" in text
    assert "clamd 3 runs, 0 failed" in text
    assert "clamd 3 runs" in pm.run_cli("top", "--once", check=True).stdout
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(response.read().decode())
                   for s in family.samples}
    assert samples[("poolmgr_scanner_verdicts_total", (("kind", "virus"),))] == 1
    assert samples[("poolmgr_check_seconds_count", (("check", "clamd"),))] == 3
    assert samples[("poolmgr_check_seconds_bucket", (("check", "clamd"), ("le", "+Inf")))] == 3
    assert samples[("poolmgr_check_failures_total", (("check", "clamd"),))] == 0
