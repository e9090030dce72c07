"""systemd's service notification protocol (sd_notify), without a dependency.

systemd passes `NOTIFY_SOCKET`, a Unix datagram socket (a path, or an abstract name written
with a leading '@'); each datagram is newline-separated `KEY=value` lines. The master says
`READY=1` once both pools serve, `RELOADING=1` (with `MONOTONIC_USEC`, which
Type=notify-reload wants) and then `READY=1` again around a reload, `STOPPING=1` when it begins
to stop, `STATUS=` whenever the one-line summary changes, and `WATCHDOG=1` while systemd's
watchdog is armed (`WATCHDOG_USEC`, for our pid or any when `WATCHDOG_PID` is unset). Outside
systemd (no NOTIFY_SOCKET) every call does nothing. A lost datagram is not an error: the
protocol is best effort, like libsystemd's; and a send never blocks the master (a datagram
the peer has no room for is dropped).
"""

__all__ = ["Notifier"]

import os
import socket
import time


class Notifier:
    """The master's end of NOTIFY_SOCKET; `environ` is os.environ unless a test passes one."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # the abstract namespace
        self.address = address if address.startswith(("/", "\0")) else ""
        self.sock: socket.socket | None = None
        self.status_text = ""
        self.watchdog_interval = 0.0  # seconds between WATCHDOG=1; 0: no watchdog
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if self.address and usec.isdigit() and int(usec) > 0 and \
                (not pid or pid == str(os.getpid())):
            # Half the timeout, as sd_watchdog_enabled(3) advises.
            self.watchdog_interval = int(usec) / 1e6 / 2
        self.watchdog_sent = float("-inf")

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> bool:
        """One datagram of `KEY=value` lines; False when it could not be sent."""
        if not self.address:
            return False
        try:
            if self.sock is None:
                # Never blocking: a peer that does not read (its queue full, ten datagrams by
                # default) must not stop the master; the datagram is dropped instead.
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                          | socket.SOCK_NONBLOCK)
            self.sock.sendto("\n".join(lines).encode() + b"\n", self.address)
            return True
        except OSError:
            return False

    def ready(self) -> bool:
        return self.send("READY=1")

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """STATUS=text, only when it differs from the last one sent."""
        if text == self.status_text:
            return False
        self.status_text = text
        return self.send(f"STATUS={text}")

    def watchdog(self, now: float, slack: float = 0.0) -> bool:
        """WATCHDOG=1 when the interval (less `slack`, how late the caller may look next) has
        passed since the last one."""
        if not self.watchdog_interval or now - self.watchdog_sent < self.watchdog_interval - slack:
            return False
        self.watchdog_sent = now
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
