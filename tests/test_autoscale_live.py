"""The autoscaler with real processes: a bounded swarm of idle bots raises the SMTP pool, and
it goes back to its floor after the storm."""

import resource
import socket
import time

import pytest

from helpers import message, wait_until

BOTS = 1000


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
        "smtp": {"min_workers": 2, "max_workers": 6, "max_sessions_per_worker": 200,
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
    pm = make_poolmgr({
        "smtp": {"min_workers": 2, "max_workers": 5, "max_sessions_per_worker": 100},
        "autoscale": {"interval": "0.5s", "storm_enter_occupancy": 0.5, "cooldown": "2s",
                      "min_worker_lifetime": "1s"},
    })
    bots = swarm(pm.smtp_port, 300, 51)
    try:
        wait_until(lambda: sizes(pm)[1] >= 4, timeout=40, what="the pool raised by the storm")
        result = pm.run_cli("ctl", "smtp", "5", check=True)  # the sysadmin's floor, in a storm
        assert "smtp pool" in result.stdout
        assert "autoscale off" in pm.run_cli("ctl", "autoscale", "off", check=True).stdout
        status = pm.status()
        assert status["autoscale"]["enabled"] is False
        assert status["pools"]["smtp"]["target"] == 5 and status["pools"]["smtp"]["floor"] == 5
    finally:
        for sock in bots:
            sock.close()
    time.sleep(3)
    assert sizes(pm)[1] == 5  # the floor holds with the autoscaler off, storm or not
    assert "autoscale on" in pm.run_cli("ctl", "autoscale", "on", check=True).stdout
    assert "autoscale off (ctl)" in pm.log() and "autoscale on (ctl)" in pm.log()
