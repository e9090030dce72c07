"""Test-only helpers on top of poolmgr.harness: a raw SMTP client and test messages."""

import socket
import time

from poolmgr.harness import HELO, Poolmgr, Sink, free_port, wait_until, write_config  # noqa: F401


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

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()
