"""The clamd check (`clamd` in scanner.checks): ClamAV's daemon, asked with zINSTREAM.

The whole message as received (headers and body) is streamed to clamd, which decodes MIME,
base64 and archives itself. The protocol (clamd(8), "INSTREAM"): `zINSTREAM\\0`, then chunks,
each prefixed by its length as 4 bytes in network order, then a chunk of length zero; clamd
answers one line ended by `\\0`: `stream: OK`, `stream: NAME FOUND` or `... ERROR`.

StreamMaxLength: clamd refuses a stream longer than its StreamMaxLength (25M by default) with
`INSTREAM size limit exceeded. ERROR` and closes the connection. Sending only the first part of
a bigger message would let a virus hide behind padding, so that answer is a failure like any
other ERROR (`CheckFailed`, the scanner applies on_failure); raise StreamMaxLength in clamd.conf
to scan bigger messages. Between chunks the socket is polled, so nothing more is sent once
clamd has answered early. The command goes with the first chunk and the zero-length chunk
with the last: a message under CHUNK is one write.

A hit is `Result("clamd", virus=NAME)`, NAME as clamd reports it (signatures from a database
that is not signed by ClamAV carry clamd's `.UNOFFICIAL` suffix). Unreachable daemon, timeout,
an ERROR or a reply that cannot be read: `CheckFailed`.
"""

__all__ = ["Backend", "CHUNK", "parse_reply"]

import select
import socket
import struct
import time

from .base import Check, CheckFailed, Message, Result, connect, printable

# Each INSTREAM chunk. clamd reads chunks of any size up to StreamMaxLength; 64 KiB keeps the
# number of send calls small without holding much more than the socket buffer at once.
CHUNK = 64 * 1024

# clamd's reply is one short line (a path-free "stream: NAME FOUND"); anything longer is not
# clamd talking.
MAX_REPLY = 4096

SIZE_LIMIT = "INSTREAM size limit exceeded"


class Backend(Check):
    name = "clamd"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.address: str = cfg.scanner.clamd.address

    def check(self, message: Message) -> Result:
        deadline = time.monotonic() + self.timeout
        sock = connect(self.address, self.timeout, self.name)
        with sock:
            try:
                reply = self._instream(sock, message.data, deadline)
            except (socket.timeout, TimeoutError):
                raise CheckFailed(self.name, f"no answer from {self.address} within "
                                             f"{self.timeout:g}s") from None
            except OSError as exc:
                raise CheckFailed(self.name, f"talking to {self.address}: "
                                             f"{exc.strerror or type(exc).__name__}") from None
        return parse_reply(reply, len(message.data))

    def _instream(self, sock: socket.socket, data: bytes, deadline: float) -> bytes:
        """The command goes with the first chunk and the end with the last: a message of one
        chunk is one write."""
        view, end = memoryview(data), struct.pack(">I", 0)
        head = b"zINSTREAM\0"
        try:
            for start in range(0, len(data), CHUNK):
                if start and _readable(sock):
                    break  # clamd answered early (size limit, error): stop sending
                chunk = view[start:start + CHUNK]
                last = start + CHUNK >= len(data)
                _send(sock, b"".join((head, struct.pack(">I", len(chunk)), chunk,
                                      end if last else b"")), deadline)
                head = b""
            else:
                if not data:
                    _send(sock, head + end, deadline)
        except (BrokenPipeError, ConnectionResetError):
            pass  # clamd closed while we sent: its answer, if any, is waiting to be read
        return _read_reply(sock, deadline)


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(_remaining(deadline))
    sock.sendall(data)


def _readable(sock: socket.socket) -> bool:
    ready, _, _ = select.select([sock], [], [], 0)
    return bool(ready)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _read_reply(sock: socket.socket, deadline: float) -> bytes:
    reply = b""
    while b"\0" not in reply and len(reply) < MAX_REPLY:
        sock.settimeout(_remaining(deadline))
        try:
            more = sock.recv(MAX_REPLY)
        except ConnectionResetError:
            more = b""
        if not more:
            break
        reply += more
    return reply.partition(b"\0")[0]


def parse_reply(reply: bytes, size: int = 0) -> Result:
    """The Result for clamd's answer to zINSTREAM (without its `\\0`); CheckFailed for an
    ERROR or anything that is not an answer. `size` (the message's) goes into the size-limit
    failure's detail."""
    text = printable(reply)
    if not text:
        raise CheckFailed("clamd", "connection closed without an answer")
    if text.endswith("ERROR"):
        if text.startswith(SIZE_LIMIT):
            raise CheckFailed("clamd", f"message of {size} bytes is over clamd's StreamMaxLength "
                                       f"({SIZE_LIMIT})")
        raise CheckFailed("clamd", f"clamd answered {text[:200]}")
    if text == "stream: OK":
        return Result("clamd")
    if text.startswith("stream: ") and text.endswith(" FOUND"):
        virus = text[len("stream: "):-len(" FOUND")].strip()
        if virus:
            return Result("clamd", virus=virus)
    raise CheckFailed("clamd", f"unexpected answer {text[:200]}")
