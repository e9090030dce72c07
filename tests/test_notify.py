"""systemd's notify protocol: the Notifier alone, and a real master talking to a socket the
test binds in NOTIFY_SOCKET's place."""

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from helpers import wait_until
from poolmgr.notify import Notifier


def bind(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


def messages_until(sock: socket.socket, line: str, timeout: float = 30.0) -> list[str]:
    """Datagrams as they arrive, up to and including the first that holds `line`."""
    got, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {line!r} within {timeout}s; got {got}"
        sock.settimeout(left)
        got.append(sock.recv(4096).decode())
        if line in got[-1].splitlines():
            return got


def banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        conn.settimeout(2)
        return conn.recv(100)


def test_notifier_speaks_the_datagram_protocol(tmp_path):
    server = bind(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert notifier.ready() and server.recv(100) == b"READY=1\n"
    assert notifier.reloading()
    lines = server.recv(100).decode().splitlines()
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.status("smtp 2/2") and server.recv(100) == b"STATUS=smtp 2/2\n"
    assert not notifier.status("smtp 2/2")  # unchanged: not sent again
    assert notifier.stopping() and server.recv(100) == b"STOPPING=1\n"
    assert not notifier.watchdog(0.0)  # no WATCHDOG_USEC: no watchdog


def test_abstract_socket_and_outside_systemd():
    name = f"poolmgr-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
    assert server.recv(100) == b"READY=1\n"
    outside = Notifier({})
    assert not outside.enabled and not outside.ready() and not outside.stopping()


def test_watchdog_interval_and_pid(tmp_path):
    server = bind(tmp_path / "n")
    env = {"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "4000000"}
    dog = Notifier(env)
    assert dog.watchdog_interval == 2.0  # half of WATCHDOG_USEC
    assert dog.watchdog(100.0) and not dog.watchdog(101.0) and dog.watchdog(102.0)
    assert server.recv(100) == server.recv(100) == b"WATCHDOG=1\n"
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 2.0
    assert Notifier({**env, "WATCHDOG_PID": "1"}).watchdog_interval == 0  # another process's


def test_master_notifies_ready_reload_status_watchdog_and_stop(make_poolmgr, tmp_path,
                                                               monkeypatch):
    server = bind(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    pm = make_poolmgr(start=False)
    pm.start(wait=False)

    before = messages_until(server, "READY=1")
    # READY=1 only once both pools accept: each port answers its banner at once.
    assert banner(pm.smtp_port).startswith(b"220 ")
    assert banner(pm.scanner_port).startswith(b"220 ")
    assert not any("READY=1" in m for m in before[:-1])
    status = pm.status()
    assert status["pools"]["smtp"]["workers"] >= 1 and status["pools"]["scanner"]["workers"] >= 1

    seen = before + messages_until(server, "WATCHDOG=1") + messages_until(server, "WATCHDOG=1")
    assert "STATUS=smtp 2/2 workers, scanner 2/2, calm\n" in seen, seen

    pm.send_signal(signal.SIGHUP)
    reload = messages_until(server, "READY=1")
    reloading = next(i for i, m in enumerate(reload) if m.startswith("RELOADING=1\n"))
    assert "MONOTONIC_USEC=" in reload[reloading]
    assert reloading < len(reload) - 1  # READY=1 comes after RELOADING=1
    assert pm.status()["master"]["generation"] == 2
    assert banner(pm.smtp_port).startswith(b"220 ")

    with ThreadPoolExecutor(1) as reader:  # systemd reads while the master stops
        stopping = reader.submit(messages_until, server, "STOPPING=1")
        assert pm.stop() == 0
        stopping.result()


def test_a_notify_socket_nobody_reads_never_stops_the_master(make_poolmgr, tmp_path,
                                                             monkeypatch):
    """Its queue fills after ten datagrams; the master drops the rest and serves on."""
    server = bind(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # WATCHDOG=1 twenty times a second
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    pm = make_poolmgr()
    time.sleep(1.5)
    assert pm.status()["master"]["state"]
    assert banner(pm.smtp_port).startswith(b"220 ")
    pm.send_signal(signal.SIGHUP)
    wait_until(lambda: pm.status()["master"]["generation"] == 2, what="the reload")
    assert pm.stop() == 0
    server.close()
