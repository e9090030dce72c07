"""Restarts that refuse no connection: the USR2 upgrade of poolmgr itself (a new master from the
installed code takes the listening sockets; the old one stops once the new one serves), and
systemd's socket activation (LISTEN_FDS), which hands in sockets the same way."""

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
from urllib.request import urlopen

import psutil

from helpers import free_port, message, wait_until


def pidfile_pid(pm) -> int:
    try:
        return int((pm.dir / "poolmgr.pid").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _scrape(port: int) -> bool:
    try:
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return b"poolmgr_pool_workers" in response.read()
    except OSError:
        return False


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    psutil.Process(pid).wait(60)


def test_usr2_during_a_stream_of_messages_refuses_none(make_poolmgr):
    metrics = free_port()
    pm = make_poolmgr({"metrics": {"listen": f"127.0.0.1:{metrics}"}})
    old = pm.proc.pid
    source = subprocess.Popen(
        [shutil.which("smtp-source") or "/usr/sbin/smtp-source", "-s", "4", "-m", "400", "-c",
         "-M", "client.test", "-f", "alice@example.org", "-t", "bob@example.test",
         f"127.0.0.1:{pm.smtp_port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    wait_until(lambda: any((pm.maildir / "new").glob("*")), what="the stream under way")
    os.kill(old, signal.SIGUSR2)
    out, err = source.communicate(timeout=180)
    new = wait_until(lambda: pidfile_pid(pm) not in (0, old) and pidfile_pid(pm), timeout=30,
                     what="the new master's pid in the pidfile")
    try:
        assert pm.proc.wait(60) == 0  # the old master stopped gracefully
        assert source.returncode == 0 and "error" not in err.lower(), err
        assert len(pm.delivered()) == 400  # every message accepted and delivered
        log = pm.log()
        assert f"upgrade: started a new master, pid {new}" in log
        assert f"upgrade: serving; stopping the old master, pid {old}" in log
        # The new master serves on the same ports, with its own control socket.
        assert pm.status()["master"]["pid"] == new
        with pm.smtp() as client:
            assert client.sendmail("alice@example.org", ["bob@example.test"],
                                   message("after the upgrade")) == {}
        # The old master handed its metrics port over too.
        wait_until(lambda: _scrape(metrics), timeout=10, what="the new master's /metrics")
    finally:
        stop(new)
    assert not (pm.dir / "poolmgr.pid").exists()  # the new master cleaned up after itself


def test_socket_activation_takes_the_sockets_systemd_hands_in(make_poolmgr, tmp_path):
    """LISTEN_FDS/LISTEN_PID (sd_listen_fds(3)): the sockets arrive as fds 3 and 4 of the
    master, as systemd passes them; it binds nothing itself, and a connection queued before it
    started is served."""
    pm = make_poolmgr(start=False)
    socks = []
    for port in (pm.smtp_port, pm.scanner_port):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        socks.append(sock)
    early = socket.create_connection(("127.0.0.1", pm.smtp_port), timeout=30)  # queued
    fds = [sock.fileno() for sock in socks]

    def as_systemd_does():  # in the child, before exec: fds 3 and 4, LISTEN_PID its own pid
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
        for target, fd in enumerate(high, start=3):
            os.dup2(fd, target)
        os.putenv("LISTEN_FDS", "2")
        os.putenv("LISTEN_PID", str(os.getpid()))

    pm._log = open(pm.log_path, "ab")
    pm.proc = subprocess.Popen([sys.executable, "-m", "poolmgr", "run", "-c", str(pm.config)],
                               stdout=pm._log, stderr=pm._log, cwd=pm.dir,
                               preexec_fn=as_systemd_does, pass_fds=(3, 4))
    for sock in socks:
        sock.close()  # only the master holds them now
    pm.wait_workers(2, 2)
    assert early.recv(100).startswith(b"220 ")
    early.close()
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"],
                               message("activated")) == {}
    assert len(pm.delivered()) == 1
    assert "inherited socket" not in pm.log()
