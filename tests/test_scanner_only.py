"""Scanner-only mode with real processes: `[smtp] listen = []` runs no SMTP pool, and the
scanner pool alone serves as a real Postfix's content_filter (amavisd's place); status, top,
metrics, ctl and the autoscaler work without an SMTP pool, and `[scanner] feeder_maxproc`
caps the scanner pool at the maxproc of Postfix's `scan` transport (2 in tests/postfix.py).
"""

import re
import signal
import smtplib
import socket
import threading
from urllib.request import urlopen

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import HELO, free_port, message, wait_until
from postfix import Postfix

SCAN_MAXPROC = 2  # the maxproc of `scan` and `scanlmtp` in tests/postfix.py's master.cf


@pytest.fixture(scope="module")
def shared_postfix():
    postfix = Postfix(free_port()).start()
    yield postfix
    postfix.stop()


def scanner_only(make_poolmgr, scanner_port=None, start=True, **scanner):
    """A poolmgr with no SMTP pool; its scanner pool on `scanner_port` when given."""
    pm = make_poolmgr({"smtp": {"listen": []},
                       "scanner": {"min_workers": 2, "max_workers": 2,
                                   "feeder_maxproc": SCAN_MAXPROC, **scanner}}, start=False)
    if scanner_port is not None:
        pm.scanner_port = scanner_port
    pm.configure("scanner", listen=f"127.0.0.1:{pm.scanner_port}")
    return pm.start() if start else pm


def worker_titles(pm) -> list[str]:
    """The process titles of the master's children (setproctitle: `poolmgr: scanner worker
    1 [...]`)."""
    return [" ".join(child.cmdline()) for child in psutil.Process(pm.proc.pid).children()]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("feed", ["inbound_port", "lmtp_inbound_port"])
def test_postfix_content_filter_delivers_with_no_smtp_worker(make_poolmgr, shared_postfix, feed):
    postfix = shared_postfix
    postfix.reset()
    pm = scanner_only(make_poolmgr, postfix.scanner_port,
                      next_hop=f"smtp:127.0.0.1:{postfix.reinject_port}")
    # A child sets its title when it starts serving: until then it shows the master's.
    titles = wait_until(lambda: (lambda t: t if all(x.startswith("poolmgr: ") and "worker" in x
                                                    for x in t) else None)(worker_titles(pm)),
                        what="titled workers")
    assert len(titles) == 2 and all(t.startswith("poolmgr: scanner worker") for t in titles), \
        titles
    assert refused(pm.smtp_port)  # the harness's SMTP port is in no listen list: nothing binds
    with smtplib.SMTP("127.0.0.1", getattr(postfix, feed), local_hostname=HELO,
                      source_address=("127.0.0.9", 0), timeout=30) as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"],
                               message("scanner only")) == {}
    wait_until(lambda: postfix.delivered(), timeout=60,
               what=f"delivery by Postfix; maillog:\n{postfix.maillog()}")
    (delivered,) = postfix.delivered()
    assert b"Subject: scanner only" in delivered and b"X-Poolmgr-Scan: clean" in delivered
    log = postfix.maillog()
    assert f"relay=127.0.0.1[127.0.0.1]:{pm.scanner_port}" in log  # through the scanner pool
    assert "client=unknown[127.0.0.9]" in pm.log()  # XFORWARD from Postfix's smtpd
    status = pm.status()
    assert status["pools"]["smtp"]["workers"] == 0 and status["pools"]["smtp"]["ceiling"] == 0
    assert status["pools"]["scanner"]["counters"]["scanned"] == 1
    assert not any("smtp worker" in t for t in worker_titles(pm))
    assert "daemon started" in pm.log() and "smtp none (scanner-only)" in pm.log()


def test_status_top_and_metrics_without_an_smtp_pool(make_poolmgr):
    metrics = free_port()
    pm = make_poolmgr({"smtp": {"listen": []},
                       "scanner": {"max_workers": 3, "feeder_maxproc": 3},
                       "metrics": {"listen": f"127.0.0.1:{metrics}"}})
    with smtplib.SMTP("127.0.0.1", pm.scanner_port, local_hostname=HELO, timeout=30) as client:
        client.sendmail("alice@example.org", ["bob@example.test"], message("direct"))
    status = pm.cli_status()  # `poolmgr status --json`
    smtp = status["pools"]["smtp"]
    assert (smtp["workers"], smtp["target"], smtp["floor"], smtp["ceiling"]) == (0, 0, 0, 0)
    assert smtp["worker_list"] == [] and smtp["slots"] == 0
    assert status["scanner"]["scanner_only"] is True and status["scanner"]["feeder_maxproc"] == 3
    assert status["pools"]["scanner"]["workers"] == 2
    assert status["pools"]["scanner"]["ceiling"] == 3
    text = pm.run_cli("status", check=True).stdout
    assert "smtp        none  (scanner-only: Postfix's content_filter feeds the scanner pool)" \
        in text
    # (the harness's banner probe at start was a connection too)
    assert re.search(r"^messages: scanned 1; connections from the feeder \d+; feeder_maxproc 3$",
                     text, re.M), text
    top = pm.run_cli("top", "--once", check=True).stdout
    assert "scanner-only, fed by Postfix (feeder_maxproc 3)" in top
    assert any(line.startswith("scanner") and "2+0" in line for line in top.splitlines())

    def scraped():
        page = urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        samples = {(s.name, s.labels.get("pool", "")): s.value
                   for family in text_string_to_metric_families(page) for s in family.samples}
        return samples if samples.get(("poolmgr_pool_workers", "scanner")) == 2 else None
    samples = wait_until(scraped, what="metrics with the scanner pool")  # published each second
    assert samples[("poolmgr_pool_workers", "smtp")] == 0
    assert samples[("poolmgr_pool_ceiling", "smtp")] == 0
    assert samples[("poolmgr_pool_ceiling", "scanner")] == 3
    assert samples[("poolmgr_smtp_slots", "")] == 0


def test_ctl_resizes_the_scanner_pool_and_refuses_the_smtp_pool(make_poolmgr):
    pm = make_poolmgr({"smtp": {"listen": []},
                       "scanner": {"min_workers": 1, "max_workers": 4, "feeder_maxproc": 3}})
    pm.wait_workers(0, 1)
    done = pm.run_cli("ctl", "scanner", "3")
    assert done.returncode == 0 and "scanner pool 1 -> 3 workers" in done.stdout
    pm.wait_workers(0, 3)
    above = pm.run_cli("ctl", "scanner", "+1")  # max_workers 4, but Postfix opens only 3
    assert above.returncode != 0
    assert "scanner 4 is above the pool's ceiling 3" in above.stdout + above.stderr
    smtp = pm.run_cli("ctl", "smtp", "+1")
    assert smtp.returncode != 0 and "refused: no smtp pool (scanner-only mode" in \
        smtp.stdout + smtp.stderr
    pm.send_signal(signal.SIGTTIN)  # TTIN is SMTP pool +1: refused too, the master carries on
    wait_until(lambda: "resize (signal): refused: no smtp pool" in pm.log(),
               what="TTIN refused")
    assert pm.run_cli("ctl", "scanner", "-2").returncode == 0
    status = pm.wait_workers(0, 1)
    assert status["pools"]["scanner"]["floor"] == 1 and status["pools"]["smtp"]["target"] == 0


def test_the_autoscaler_sizes_only_the_scanner_pool_up_to_the_feeder(make_poolmgr, make_sink):
    """Three deliveries at once against a next hop that takes 3 s to answer DATA: the
    scanner pool grows from 1 worker as its workers stay busy, stops at feeder_maxproc (2)
    although max_workers is 4, delivers all three, and shrinks back to its floor when idle."""
    sink = make_sink(extra=["-w", "3"])
    pm = make_poolmgr({"smtp": {"listen": []},
                       "scanner": {"min_workers": 1, "max_workers": 4,
                                   "feeder_maxproc": SCAN_MAXPROC,
                                   "next_hop": f"smtp:127.0.0.1:{sink.port}"},
                       "autoscale": {"interval": "0.2s", "scanner_grow_after": "0.4s",
                                     "scanner_shrink_after": "1s",
                                     "min_worker_lifetime": "0.5s"}})
    replies: list = []

    def deliver(n: int) -> None:
        # No QUIT: a scanner worker may close an idle kept connection at once (421) for a
        # client waiting in its accept queue; what counts is the reply to the message.
        client = smtplib.SMTP("127.0.0.1", pm.scanner_port, local_hostname=HELO, timeout=60)
        try:
            replies.append(client.sendmail("alice@example.org", ["bob@example.test"],
                                           message(f"feed {n}")))
        finally:
            client.close()
    clients = [threading.Thread(target=deliver, args=(n,)) for n in range(3)]
    for client in clients:
        client.start()
    wait_until(lambda: pm.status()["pools"]["scanner"]["workers"] == SCAN_MAXPROC,
               timeout=30, what="the scanner pool grown to feeder_maxproc")
    for client in clients:
        client.join(60)
    assert replies == [{}, {}, {}]
    wait_until(lambda: len(sink.messages()) == 3, what="3 messages at the next hop")
    status = pm.wait_workers(0, 1, timeout=30)  # idle: back to the floor
    decisions = [d["decision"] for d in status["autoscale"]["decisions"]]
    assert "scanner 1 -> 2" in " ".join(decisions), decisions
    assert not any(d.startswith("smtp") or "-> 3" in d or "storm" in d for d in decisions), \
        decisions
    assert status["pools"]["smtp"]["workers"] == 0 and status["pools"]["smtp"]["target"] == 0


def test_reload_and_upgrade_without_an_smtp_pool(make_poolmgr):
    """HUP replaces the scanner workers; USR2's new master counts as serving once its scanner
    pool serves (no SMTP pool to wait for), so the old master stops."""
    pm = scanner_only(make_poolmgr)
    old = pm.proc.pid
    pm.send_signal(signal.SIGHUP)
    wait_until(lambda: pm.status()["master"]["generation"] == 2 and
               all(w["generation"] == 2 for w in pm.status()["pools"]["scanner"]["worker_list"]),
               what="generation 2's scanner workers")
    pm.send_signal(signal.SIGUSR2)
    pidfile = pm.dir / "poolmgr.pid"
    new = wait_until(lambda: (lambda pid: pid if pid not in (0, old) else None)(
        int(pidfile.read_text().strip() or 0) if pidfile.exists() else 0), timeout=30,
        what="the new master's pid in the pidfile")
    try:
        assert pm.proc.wait(60) == 0  # the old master stopped: its successor serves
        assert f"upgrade: serving; stopping the old master, pid {old}" in pm.log()
        status = pm.wait_workers(0, 2)
        assert status["master"]["pid"] == new and status["pools"]["smtp"]["ceiling"] == 0
        with smtplib.SMTP("127.0.0.1", pm.scanner_port, local_hostname=HELO,
                          timeout=30) as client:
            assert client.sendmail("alice@example.org", ["bob@example.test"],
                                   message("after the upgrade")) == {}
    finally:
        psutil.Process(new).terminate()
        psutil.Process(new).wait(60)
    assert len(pm.delivered()) == 1
