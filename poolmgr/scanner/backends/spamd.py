"""The spamd check (`spamd` in scanner.checks): SpamAssassin's spamd, asked with SYMBOLS over
SPAMC/1.5 (SpamAssassin's spamd/PROTOCOL).

One connection per message, as spamc makes. The request:

    SYMBOLS SPAMC/1.5\\r\\n
    Content-length: <bytes>\\r\\n
    User: <scanner.spamd.user>\\r\\n          (only when set)
    \\r\\n
    <the message>

The answer: `SPAMD/1.1 0 EX_OK`, headers with `Spam: True ; 15.0 / 5.0` (verdict; score /
required score), a blank line, and the names of the rules that hit, comma-separated. A non-zero
code is one of sysexits.h's EX_* (76 EX_PROTOCOL, 64 EX_USAGE...): `CheckFailed`. A message
larger than scanner.spamd.max_size is not sent (spamc -s): `Result.skipped`.
"""

__all__ = ["Backend", "request", "parse_reply"]

import re
import socket
import time

from .base import Check, CheckFailed, Message, Result, connect, printable

NAME = "spamd"

# A SYMBOLS answer is a status line, two or three short headers and one line of rule names: far
# below this. A longer answer is not spamd's.
MAX_REPLY = 256 * 1024

STATUS = re.compile(rb"SPAMD/(\d+\.\d+) +(\d+) *(.*)")
SPAM = re.compile(r"(True|False|Yes|No) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)", re.I)
# spamd takes the User: header as a user name; a space or a control character would end it
# early or start another header.
USER = re.compile(r"[\x21-\x7e]+")


def request(data: bytes, user: str = "") -> bytes:
    """The SYMBOLS request for `data`, headers and message."""
    head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(data)}\r\n"
    if user:
        head += f"User: {user}\r\n"
    return head.encode("ascii") + b"\r\n" + data


def parse_reply(reply: bytes) -> Result:
    """spamd's whole answer to SYMBOLS as a Result; CheckFailed for an error code or an answer
    that is not SPAMD/1.x."""
    head, blank, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = STATUS.fullmatch(lines[0])
    if not status:
        raise CheckFailed(NAME, f"not a spamd answer: {printable(lines[0]) or 'nothing'}")
    if status.group(2) != b"0":
        raise CheckFailed(NAME, f"spamd answered {int(status.group(2))} "
                                f"{printable(status.group(3))}")
    if not blank:
        raise CheckFailed(NAME, "spamd's answer ends before its body")
    headers = {}
    for line in lines[1:]:
        key, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            raise CheckFailed(NAME, f"bad header line in spamd's answer: {printable(line)}")
        headers[key.strip().lower()] = value.strip()
    spam = SPAM.fullmatch(headers.get("spam", ""))
    if not spam:
        raise CheckFailed(NAME, f"no score in spamd's answer: "
                                f"Spam: {printable(headers.get('spam', '(missing)'))}")
    if "content-length" in headers and headers["content-length"] != str(len(body)):
        raise CheckFailed(NAME, f"spamd's answer has {len(body)} bytes of body, its "
                                f"Content-length says {printable(headers['content-length'])}")
    names = body.decode("ascii", "replace").strip()
    return Result(NAME, score=float(spam.group(2)), required=float(spam.group(3)),
                  tests=tuple(t.strip() for t in names.split(",") if t.strip()))


def _complete(reply: bytes) -> bool:
    """Whether `reply` holds a whole answer by its Content-length (spamd closes the connection
    after it anyway; this spares waiting for the close)."""
    head, blank, body = reply.partition(b"\r\n\r\n")
    match = re.search(rb"\r\nContent-length: *(\d+)", head, re.I)
    return bool(blank and match and len(body) >= int(match.group(1)))


class Backend(Check):
    name = NAME

    def __init__(self, cfg):
        super().__init__(cfg)
        section = cfg.scanner.spamd
        self.address: str = section.address
        self.max_size: int = section.max_size
        self.user: str = section.user
        if self.user and not USER.fullmatch(self.user):
            raise ValueError(f"scanner.spamd.user must be printable ASCII without spaces, "
                             f"got {self.user!r}")

    def check(self, message: Message) -> Result:
        size = len(message.data)
        if size > self.max_size:
            return Result(NAME, skipped=f"size {size} > max_size")
        deadline = time.monotonic() + self.timeout
        sock = connect(self.address, self.timeout, NAME)
        try:
            return parse_reply(self._exchange(sock, request(message.data, self.user), deadline))
        finally:
            sock.close()

    def _exchange(self, sock: socket.socket, data: bytes, deadline: float) -> bytes:
        """Send the request and read the answer to its end, all within `deadline`."""
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except TimeoutError:
            raise CheckFailed(NAME, f"timed out after {self.timeout:g}s sending to "
                                    f"{self.address}") from None
        except OSError as exc:
            # spamd may have answered (an error) and closed before taking all of the message.
            try:
                return self._read(sock, deadline, b"")
            except CheckFailed:
                raise CheckFailed(NAME, f"send to {self.address}: "
                                        f"{exc.strerror or type(exc).__name__}") from None
        return self._read(sock, deadline, b"")

    def _read(self, sock: socket.socket, deadline: float, reply: bytes) -> bytes:
        try:
            while not _complete(reply):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
                if len(reply) > MAX_REPLY:
                    raise CheckFailed(NAME, f"answer longer than {MAX_REPLY} bytes")
        except TimeoutError:
            raise CheckFailed(NAME, f"no answer from {self.address} within "
                                    f"{self.timeout:g}s") from None
        except OSError as exc:
            if reply:
                return reply
            raise CheckFailed(NAME, f"read from {self.address}: "
                                    f"{exc.strerror or type(exc).__name__}") from None
        if not reply:
            raise CheckFailed(NAME, f"{self.address} closed the connection without answering")
        return reply
