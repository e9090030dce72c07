"""Free loopback ports, waiting for a process to be ready or a condition to hold, stopping a
daemon the tests started, and a scratch directory in memory for a daemon's temporary files.

`wait_until` raises `WaitTimeout` (a TimeoutError), never AssertionError: the bench's targets
use it outside tests too.
"""

__all__ = ["free_port", "free_udp_port", "listening", "wait_until", "WaitTimeout", "terminate",
           "LOWEST", "ram_directory"]

import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class WaitTimeout(TimeoutError):
    """What `wait_until` waited for did not happen in time."""


_HANDED: set[tuple[int, int]] = set()
LOWEST = 20000  # the ports handed out lie from here up to the kernel's ephemeral range


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to on `host`, not handed out before by this process, and below
    the kernel's ephemeral range: no outgoing connection takes it as its source port before
    the test binds it, and a connection to it while nothing listens cannot connect to itself.
    "::" (dual stack) finds one free on every IPv4 and IPv6 address, as a `[::]` listener
    needs."""
    return _fresh(host, socket.SOCK_STREAM)


def free_udp_port(host: str = "127.0.0.1") -> int:
    return _fresh(host, socket.SOCK_DGRAM)


def _share() -> tuple[int, int]:
    """The ports this process may hand out: all from LOWEST up to the ephemeral range, or,
    under pytest-xdist, this worker's own slice of them (gw0 the first, gw1 the next...), so
    that two workers never hand out the same port."""
    low, top = LOWEST, _ephemeral_low() - 1
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        width = (top - low + 1) // count
        low += int(worker[2:]) * width
        top = low + width - 1
    return low, top


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _fresh(host: str, kind: int) -> int:
    low, top = _share()
    for _ in range(1000):
        port = random.randint(low, top) if top > low else 0  # 0: the kernel chooses
        if (kind, port) in _HANDED:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as sock:
            if ":" in host:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                sock.bind((host, port))
            except OSError:
                continue
            port = sock.getsockname()[1]
        if (kind, port) not in _HANDED:
            _HANDED.add((kind, port))
            return port
    raise OSError(f"no free port on {host}")


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on the port."""
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.1, what: str = "condition"):
    """Call `predicate` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def terminate(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """Stop a daemon by its pid: SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


RAM = "/dev/shm"


def ram_directory(prefix: str, reader: str | None = None) -> Path:
    """A new directory on a tmpfs (/dev/shm) where there is one to write, else under the
    system's temporary directory: where a daemon's per-scan files go (clamd's
    TemporaryDirectory, amavisd's $TEMPBASE), as their docs advise and as Debian 13's tmpfs
    /tmp has them. On this machine's ext4 /tmp, creating and removing clamd's directory for
    each scan cost it 1.4 ms a message, against 0.2 ms on a tmpfs. Not where AppArmor
    confines `reader`, the program that must use the directory (Debian's profile for clamd
    allows /tmp, not /dev/shm)."""
    usable = os.path.isdir(RAM) and os.access(RAM, os.W_OK) and not (
        reader and _confined(reader))
    return Path(tempfile.mkdtemp(prefix=prefix, dir=RAM if usable else None))


def _confined(program: str) -> bool:
    """Whether an AppArmor profile for `program` is enforced here."""
    try:
        profiles = Path("/sys/kernel/security/apparmor/profiles").read_text()
    except OSError:  # no AppArmor, or not ours to read
        return False
    return any(line.startswith(program + " ") and "(enforce)" in line
               for line in profiles.splitlines())
