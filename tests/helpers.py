"""Test-only helpers on top of poolmgr.testing: a raw SMTP client and test messages."""

import os
import re
import signal
import socket
import time
from contextlib import contextmanager

from poolmgr.testing import HELO, Poolmgr, Sink, free_port, wait_until, write_config

__all__ = ["HELO", "Poolmgr", "Sink", "free_port", "wait_until", "write_config", "message",
           "Raw", "stopped", "only_worker", "served_by"]


def message(subject: str = "test", body: str = "hello\r\n", sender: str = "alice@example.org",
            to: str = "bob@example.test") -> bytes:
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}.{time.time_ns()}@example.org>\r\n\r\n"
            f"{body}").encode()


class Raw:
    """A raw SMTP client socket, for what smtplib will not send (pipelining, bare LF...)."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 15):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[str]]:
        """One whole (possibly multi-line) reply: (code, lines)."""
        lines = []
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            text = line.rstrip(b"\r").decode()
            lines.append(text)
            if text[3:4] != "-":
                return int(text[:3]), lines

    def closed(self, timeout: float = 10) -> bool:
        """True when the server hung up (end of file or reset) within `timeout` seconds.

        A server that leaves the connection open and silent, or sends more, has not hung up:
        a receive timeout is False, not an error that looks like a close.
        """
        if self.buf:
            return False  # unread replies: the server spoke after the last one we read
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (TimeoutError, socket.timeout):
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.sock.close()


@contextmanager
def stopped(pids: list[int]):
    """Processes stopped with SIGSTOP for a moment: they accept and answer nothing meanwhile."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def only_worker(pm: Poolmgr, pid: int):
    """Steer new connections to one SMTP worker: the others are stopped meanwhile."""
    return stopped([p for p in pm.worker_pids("smtp") if p != pid])


def served_by(pm: Poolmgr, source: str) -> list[int]:
    """PIDs of the SMTP workers whose log says `connect from unknown[source]`, in order."""
    pattern = re.compile(r"poolmgr/smtpd\[(\d+)\]: connect from unknown\[" + re.escape(source)
                         + r"\]")
    return [int(pid) for pid in pattern.findall(pm.log())]
