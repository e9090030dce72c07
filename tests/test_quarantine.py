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

from helpers import message, wait_until
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


def test_release_to_another_recipient(make_poolmgr, make_sink, clamd):
    """amavisd-release's alternate recipient: `release ID --to ADDR` delivers the kept message
    to ADDR only (the envelope the next hop sees), and the index notes where it went."""
    sink = make_sink()
    pm = with_clamd(make_poolmgr, clamd.address, virus_action="discard",
                    next_hop=f"smtp:127.0.0.1:{sink.port}")
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], virus()) == {}
    (entry,) = listed(pm)
    bad = pm.run_cli("quarantine", "release", entry["id"], "--to", "x@y>\r\nRCPT TO:<z@w")
    assert bad.returncode == 2 and "not an address" in bad.stderr
    released = pm.run_cli("quarantine", "release", entry["id"], "--to", "admin@example.test")
    assert released.returncode == 0, released.stderr
    wait_until(lambda: sink.messages(), what="the released message at smtp-sink")
    (dump,) = sink.messages()
    rcpts = [line for line in dump.split(b"\n") if line.startswith(b"X-Rcpt-Args: ")]
    assert rcpts == [b"X-Rcpt-Args: <admin@example.test>"] and b"files.zip" in dump
    assert b"X-Mail-Args: <alice@example.org>" in dump
    assert f"{entry['id']}: released from=<alice@example.org> to=<admin@example.test>, " \
           f"relay=smtp:127.0.0.1:{sink.port}" in released.stderr  # its log: stderr here
    index = (pm.dir / "quarantine" / quarantine.INDEX).read_text().splitlines()
    assert json.loads(index[-1])["to"] == ["admin@example.test"]


def test_list_since_and_reason(tmp_path, make_poolmgr):
    """`quarantine list --since AGE|DATE --reason TEXT`: what was kept since then, by verdict
    (virus, banned, spam) or by a word of the reason (a virus or file name)."""
    pm = make_poolmgr(start=False)
    where = str(pm.dir / "quarantine")
    pm.configure("scanner", quarantine=where)
    now = time.time()
    for verdict, reason, age in (("virus", "INFECTED (Win.Trojan.Agent)", 3 * 86400),
                                 ("spam_killed", "SPAM (score=12.000)", 7200),
                                 ("banned", "BANNED (multipart/mixed | a.pdf.exe)", 60)):
        ident = quarantine.keep(where, b"Subject: x\r\n\r\n", queue_id="Q", client="192.0.2.1",
                                sender="a@x", recipients=["b@y"], verdict=verdict,
                                reason=reason)
        lines = (pm.dir / "quarantine" / quarantine.INDEX).read_text().splitlines()
        record = json.loads(lines[-1])
        record["time"] = now - age  # kept that long ago
        lines[-1] = json.dumps(record)
        (pm.dir / "quarantine" / quarantine.INDEX).write_text("\n".join(lines) + "\n")
        assert ident

    def verdicts(*args):
        result = pm.run_cli("quarantine", "list", "--json", *args, check=True)
        return [e["verdict"] for e in json.loads(result.stdout)]

    assert verdicts() == ["virus", "spam_killed", "banned"]
    assert verdicts("--since", "1d") == ["spam_killed", "banned"]
    assert verdicts("--since", "5m") == ["banned"]
    a_day_ago = time.strftime("%Y-%m-%dT%H:%M", time.localtime(now - 86400))
    assert verdicts("--since", a_day_ago) == ["spam_killed", "banned"]
    assert verdicts("--reason", "spam") == ["spam_killed"]
    assert verdicts("--reason", "trojan") == ["virus"]
    assert verdicts("--reason", ".EXE", "--since", "1h") == ["banned"]
    text = pm.run_cli("quarantine", "list", "--reason", "banned", check=True).stdout
    assert text.count("\n") == 1 and "banned: BANNED (multipart/mixed | a.pdf.exe)" in text
    bad = pm.run_cli("quarantine", "list", "--since", "yesterday")
    assert bad.returncode == 1 and "--since: expected an age like 2h" in bad.stderr
