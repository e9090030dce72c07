"""The autoscaler and observability with real processes: a bounded swarm of idle bots raises
the SMTP pool and it goes back to its floor after the storm; metrics over HTTP; max_rss;
`poolmgr top` in a pseudo-terminal."""

import os
import pty
import re
import resource
import select
import socket
import subprocess
import sys
import time
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import free_port, message, wait_until

BOTS = 2000


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def swarm(port: int, count: int, octet: int) -> list[socket.socket]:
    """`count` idle connections from distinct 127.OCTET.x.y addresses; they never speak."""
    bots = []
    for n in range(count):
        sock = socket.socket()
        sock.bind((f"127.{octet}.{n // 250}.{n % 250 + 1}", 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        bots.append(sock)
    return bots


def sizes(pm):
    status = pm.status()
    return status, status["pools"]["smtp"]["workers"], status["pools"]["scanner"]["workers"]


def test_idle_swarm_raises_the_smtp_pool_and_it_falls_back_after(make_poolmgr, many_files):
    pm = make_poolmgr({
        "smtp": {"min_workers": 2, "max_workers": 6, "max_sessions_per_worker": 400,
                 "timeout": "120s"},
        "autoscale": {"interval": "0.5s", "storm_enter_occupancy": 0.6,
                      "storm_exit_occupancy": 0.2, "cooldown": "3s",
                      "min_worker_lifetime": "1s"},
        "defence": {"stress_timeout": "120s"},
    })
    assert pm.status()["storm"]["active"] is False
    bots = swarm(pm.smtp_port, BOTS, 50)
    try:
        started = time.monotonic()
        wait_until(lambda: pm.status()["storm"]["active"], timeout=30, what="a storm")
        # Silent bots are counted as nuisance while they live, before any of them times out.
        wait_until(lambda: pm.status()["pools"]["smtp"]["sessions_by_state"]["suspect"] >= 100,
                   timeout=15, what="silent bots counted as suspect")
        # The pool grows step by step up to its ceiling; there stress mode switches on.
        status = wait_until(lambda: (lambda s: s["pools"]["smtp"]["workers"] == 6 and s)(
            pm.status()), timeout=30, what="6 SMTP workers")
        wait_until(lambda: pm.status()["stress"]["on"], timeout=10, what="stress mode")
        assert pm.status()["stress"]["source"] == "autoscale"
        assert time.monotonic() - started < 40
        # Legitimate mail during the storm is delivered.
        with pm.smtp() as client:
            assert client.sendmail("alice@example.org", ["bob@example.test"],
                                   message("during the storm")) == {}
        status = pm.status()
        assert status["autoscale"]["phase"] == "storm"
        assert status["pools"]["scanner"]["workers"] <= status["pools"]["smtp"]["workers"]
    finally:
        for sock in bots:
            sock.close()
    wait_until(lambda: not pm.status()["storm"]["active"], timeout=30, what="the storm's end")
    wait_until(lambda: sizes(pm)[1:] == (2, 2) and pm.status()["pools"]["smtp"]["draining"] == 0,
               timeout=60, what="the SMTP pool back at its floor")
    status = pm.status()
    assert status["autoscale"]["phase"] == "calm" and status["stress"]["on"] is False
    assert len(pm.delivered()) == 1
    log = pm.log()
    assert "autoscale: storm begins: occupancy" in log
    assert "autoscale: smtp 2 -> " in log
    assert "autoscale: stress mode on" in log and "autoscale: stress mode off" in log
    assert "autoscale: calm: smtp pool back at 2" in log
    decisions = [d["decision"] for d in status["autoscale"]["decisions"]]
    assert decisions[-1] == "calm: smtp pool back at 2"


def test_ctl_autoscale_off_returns_to_the_floors_and_manual_floors_hold(make_poolmgr, many_files):
    """In a storm that keeps going: `ctl smtp 3` moves the floor, `ctl autoscale off` takes the
    pool down to that floor and keeps it there although the storm would raise it, and
    `ctl autoscale on` lets the storm raise it again."""
    pm = make_poolmgr({
        "smtp": {"min_workers": 2, "max_workers": 6, "max_sessions_per_worker": 100},
        "autoscale": {"interval": "0.5s", "storm_enter_occupancy": 0.5, "cooldown": "2s",
                      "min_worker_lifetime": "1s"},
    })
    bots = swarm(pm.smtp_port, 450, 51)
    try:
        wait_until(lambda: sizes(pm)[1] >= 4, timeout=40, what="the pool raised by the storm")
        result = pm.run_cli("ctl", "smtp", "3", check=True)  # the sysadmin's floor, in a storm
        assert "smtp pool" in result.stdout
        assert pm.status()["pools"]["smtp"]["floor"] == 3
        # The autoscaler works above the floor: the storm raises the pool again ...
        wait_until(lambda: pm.status()["pools"]["smtp"]["target"] > 3, timeout=30,
                   what="the autoscaler raising the pool above the new floor")
        # ... until it is switched off, which puts the pool back at its floor.
        assert "autoscale off" in pm.run_cli("ctl", "autoscale", "off", check=True).stdout
        status = pm.wait_workers(3, 2, timeout=30)  # the storm's extra workers are retired
        assert status["autoscale"]["enabled"] is False
        assert status["pools"]["smtp"]["target"] == 3 and status["pools"]["smtp"]["floor"] == 3
        # The retired workers' bots are gone; a second wave fills the three workers. The
        # autoscaler, were it still running, would raise the pool again: it stays at the
        # floor and decides nothing.
        bots += swarm(pm.smtp_port, 250, 52)
        wait_until(lambda: pm.status()["pools"]["smtp"]["sessions"] >= 250, timeout=20,
                   what="the second wave held")
        decisions = pm.status()["autoscale"]["decisions"]
        for _ in range(6):
            time.sleep(0.5)
            status = pm.status()
            assert status["pools"]["smtp"]["workers"] == 3
        assert status["autoscale"]["decisions"] == decisions
        assert "autoscale on" in pm.run_cli("ctl", "autoscale", "on", check=True).stdout
        wait_until(lambda: sizes(pm)[1] > 3, timeout=30, what="the storm raising the pool again")
    finally:
        for sock in bots:
            sock.close()
    assert pm.status()["pools"]["smtp"]["floor"] == 3  # the manual floor outlived it all
    assert "autoscale off (ctl)" in pm.log() and "autoscale on (ctl)" in pm.log()


def test_metrics_endpoint_is_scraped_over_http(make_poolmgr):
    port = free_port()
    pm = make_poolmgr({"metrics": {"listen": f"127.0.0.1:{port}"}})
    with pm.smtp(source="127.0.52.1") as client:
        client.sendmail("alice@example.org", ["bob@example.test"], message("metrics"))

    def scrape():
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            text = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    samples = wait_until(lambda: (lambda m: m.get(
        ("poolmgr_messages_total", (("outcome", "accepted"),))) == 1 and m)(scrape()),
        timeout=10, what="the accepted message in the metrics")
    assert samples[("poolmgr_pool_workers", (("pool", "smtp"),))] == 2
    assert samples[("poolmgr_pool_ceiling", (("pool", "scanner"),))] == 4
    assert samples[("poolmgr_sessions_total", (("verdict", "legit"),))] == 1
    assert samples[("poolmgr_handoffs_total", ())] == 1
    assert samples[("poolmgr_storm", ())] == 0 and samples[("poolmgr_stress", ())] == 0
    assert samples[("poolmgr_smtp_slots", ())] == 2 * 2000
    rss = {labels: v for (name, labels), v in samples.items()
           if name == "poolmgr_worker_rss_bytes"}
    # By pool and slot, never by pid: a replaced worker keeps its series.
    assert set(rss) == {(("pool", pool), ("slot", slot)) for pool in ("scanner", "smtp")
                        for slot in ("1", "2")}
    assert all(v > 1_000_000 for v in rss.values())
    assert not any("pid" in dict(labels) for _, labels in samples)
    for histogram in ("poolmgr_handoff_seconds", "poolmgr_scan_seconds"):
        assert samples[(f"{histogram}_count", ())] == 1
        assert samples[(f"{histogram}_bucket", (("le", "+Inf"),))] == 1
        assert samples[(f"{histogram}_bucket", (("le", "30"),))] == 1
        assert 0 < samples[(f"{histogram}_sum", ())] < 30
    import poolmgr
    assert samples[("poolmgr_build_info", (("version", poolmgr.__version__),))] == 1
    assert samples[("process_resident_memory_bytes", ())] > 1_000_000  # the master's own
    assert f"metrics endpoint on http://127.0.0.1:{port}/metrics" in pm.log()


def test_workers_over_max_rss_are_recycled(make_poolmgr):
    pm = make_poolmgr({"smtp": {"max_rss": "1M"}, "master": {"max_rss": "4G"}})
    before = set(pm.worker_pids("smtp"))
    scanners = set(pm.worker_pids("scanner"))
    wait_until(lambda: "over max_rss 1.0 MiB -- recycling" in pm.log(), timeout=15,
               what="a recycling log line")
    wait_until(lambda: set(pm.worker_pids("smtp")) - before, timeout=15,
               what="a fresh SMTP worker")
    with pm.smtp(source="127.0.52.2") as client:  # mail goes on while workers are replaced
        assert client.sendmail("alice@example.org", ["bob@example.test"], message("rss")) == {}
    # Past the next check (every 5 s), which recycles the fresh SMTP workers again:
    # master.max_rss 4G spares the scanners.
    checks = pm.log().count("over max_rss 1.0 MiB -- recycling")
    wait_until(lambda: pm.log().count("over max_rss 1.0 MiB -- recycling") > checks,
               timeout=15, what="the next max_rss check")
    assert set(pm.worker_pids("scanner")) == scanners  # the scanner pool: untouched
    assert "scanner worker" not in "".join(l for l in pm.log().splitlines() if "max_rss" in l)


def test_top_shows_the_pools_live_and_quits_with_q(make_poolmgr):
    pm = make_poolmgr()
    once = pm.run_cli("top", "--once", check=True).stdout
    assert "autoscale calm" in once and "last decisions:" in once
    assert re_line("smtp", once) and re_line("scanner", once)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "poolmgr", "top", "-c", str(pm.config)],
                            stdin=follower, stdout=follower, stderr=follower,
                            env={**os.environ, "TERM": "xterm", "LINES": "30", "COLUMNS": "120"})
    os.close(follower)
    screen = b""
    try:
        deadline = time.monotonic() + 15
        while b"last decisions" not in screen and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                screen += os.read(leader, 65536)
        assert b"poolmgr top" in screen and b"occupancy" in screen
        os.write(leader, b"q")
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


def re_line(pool: str, text: str) -> bool:
    return re.search(rf"^{pool}\s+\d+\+\d+\s+\d+\s+\d+\s+\d+\s+\d+\s+\[[#.]+\]", text, re.M) \
        is not None
