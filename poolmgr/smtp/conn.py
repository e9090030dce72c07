"""Buffered line and DATA I/O on one SMTP socket, for both ends of a conversation.

Buffer discipline matters with thousands of idle sessions per worker: an idle connection holds
an empty `bytes` and no file object. Replies are queued and sent in one write when the reader
is about to block, which is what makes PIPELINING (RFC 2920) cheap. Works on plain sockets
(scanner workers, the master-free relay client: made non-blocking and waited on with poll) and
on gevent's cooperative sockets (SMTP workers: waited on in the hub) alike; `tick` lets a
blocking caller keep its heartbeat while it waits.

End of DATA is strict: only CRLF.CRLF ends a message (RFC 5321 section 4.1.1.4), and a bare CR
or LF anywhere in the data is reported, never passed on (the SMTP smuggling class of attack,
CVE-2023-51764).

Deadlines (server side, as Postfix's smtpd_per_record_deadline and smtpd_min_data_rate): with
`per_record` the timeout bounds the reading of a whole command line, not each receive, so a
client trickling a byte now and then cannot hold a session; in DATA the deadline starts at the
timeout and each receive of N bytes adds N / `min_data_rate` seconds, never past the timeout
from now, so a client must keep an average of `min_data_rate` bytes/s. A `Timeout` that only
these deadlines caused (the peer was still sending) says `slow`.
"""

__all__ = ["Conn", "Timeout", "Disconnected", "LineTooLong", "DataResult", "malformed"]

import select
import socket
import time
from typing import Callable, NamedTuple

from greenlet import getcurrent  # gevent's own dependency

RECV_SIZE = 16384
_END = b"\r\n.\r\n"


class Timeout(Exception):
    """The peer sent nothing within the timeout, or (`slow`) too little within a deadline."""

    def __init__(self, slow: bool = False):
        super().__init__("slow" if slow else "timeout")
        self.slow = slow


class Disconnected(Exception):
    """The peer closed the connection."""


class LineTooLong(Exception):
    """A line over the limit was read and discarded up to its end."""


class DataResult(NamedTuple):
    data: bytes | None  # unstuffed message, None when too big or malformed
    size: int           # bytes received, up to the final dot
    problem: str        # "", "too_big", "bare_lf", "bare_cr", "nul"


def malformed(data: bytes) -> str:
    """What makes message data unfit to pass on: "bare_lf", "bare_cr", "nul", or ""."""
    crlf = data.count(b"\r\n")  # counting is a tenth of a search with look-around
    if data.count(b"\n") != crlf:
        return "bare_lf"
    if data.count(b"\r") != crlf:
        return "bare_cr"
    if b"\0" in data:  # "\r\n\0.\r\n" ends a message for a next hop that strips NULs
        return "nul"
    return ""


def _wait_cooperative(sock, write: bool, timeout: float) -> bool:
    """Wait in gevent's hub until `sock` is ready, at most `timeout` seconds; False when the
    time ran out. One timer and the socket's own watcher, where gevent's socket makes a
    Timeout object and looks up the socket's timeout on every wait."""
    hub = sock.hub
    timer = hub.loop.timer(timeout)
    timer.start(getcurrent().throw, _Expired)
    try:
        hub.wait(sock._write_event if write else sock._read_event)
        return True
    except _Expired:
        return False
    finally:
        timer.stop()
        timer.close()


def _wait_blocking(sock, write: bool, timeout: float) -> bool:
    """Wait in poll(2) until `sock` is ready (or closed), at most `timeout` seconds."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT if write else select.POLLIN)
    return bool(poller.poll(timeout * 1000))


_KINDS: dict[type, str] = {}  # socket class: "tls", "cooperative" or "plain"


class _Expired(Exception):
    """A cooperative wait ran out of time (thrown into the waiting greenlet by its timer)."""


class Conn:
    __slots__ = ("sock", "raw", "waiter", "buf", "out", "timeout", "tick", "tick_every",
                 "per_record", "min_data_rate")

    def __init__(self, sock, timeout: float, tick: Callable[[], None] | None = None,
                 per_record: bool = False, min_data_rate: int = 0):
        self.use(sock)
        self.buf = b""
        self.out: list[bytes] = []
        self.timeout = timeout  # may shrink during a session (stress, suspicious clients)
        self.tick = tick
        self.tick_every = 1.0  # seconds between calls of `tick` while waiting for the peer
        self.per_record = per_record        # timeout bounds a whole line, not each receive
        self.min_data_rate = min_data_rate  # bytes/s in DATA with per_record; 0: per receive

    def use(self, sock) -> None:
        """Talk over `sock` from now on (again after STARTTLS, with its TLS layer).

        A plain socket is read and written without blocking, and waited on (poll, or gevent's
        hub for its cooperative sockets) only when the kernel has nothing: a receive that
        finds data is one system call, with no timeout set per call (each settimeout is an
        ioctl, and each timed call a poll first). A TLS socket buffers in its own layer and
        keeps its own blocking calls (`raw` None)."""
        self.sock = sock
        kind = _KINDS.get(type(sock))
        if kind is None:  # asked once a class: gevent's socket answers a miss with exceptions
            kind = _KINDS[type(sock)] = "tls" if hasattr(sock, "do_handshake") else \
                "cooperative" if hasattr(sock, "_read_event") else "plain"
        if kind == "tls":
            self.raw, self.waiter = None, None
        elif kind == "cooperative":  # gevent's socket over a non-blocking one
            self.raw, self.waiter = sock._sock, _wait_cooperative
        else:
            sock.setblocking(False)
            self.raw, self.waiter = sock, _wait_blocking

    # -- output
    def write(self, data: bytes) -> None:
        self.out.append(data)

    def flush(self) -> None:
        if self.out:
            data = b"".join(self.out)
            self.out = []
            self._send(data, self.timeout)

    def _send(self, data, timeout: float) -> None:
        """All of `data`, waiting at most `timeout` each time the peer's window is full."""
        raw = self.raw
        if raw is None:
            self._send_tls(data, timeout)
            return
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            raise Disconnected() from None
        if sent < len(data):
            view = memoryview(data)
            while sent < len(view):
                if not self.waiter(self.sock, True, timeout):
                    raise Timeout()
                try:
                    sent += raw.send(view[sent:])
                except BlockingIOError:
                    pass
                except OSError:
                    raise Disconnected() from None

    def _send_tls(self, data, timeout: float) -> None:
        """send() until done (gevent's sendall asks the kernel for the socket's buffer size,
        a getsockopt, on every call)."""
        self.sock.settimeout(timeout)
        try:
            sent = self.sock.send(data)
            if sent < len(data):
                view = memoryview(data)
                while sent < len(view):
                    sent += self.sock.send(view[sent:])
        except socket.timeout:
            raise Timeout() from None
        except OSError:
            raise Disconnected() from None

    # -- input
    def _receive(self, timeout: float, tried: bool = False) -> bytes | None:
        """What the peer sends within `timeout` (0: only what has come), None if nothing;
        `tried`: a receive just found nothing. Disconnected when the peer closed."""
        raw = self.raw
        if raw is None:
            self.sock.settimeout(timeout)
            try:
                data = self.sock.recv(RECV_SIZE)
            except (socket.timeout, BlockingIOError):
                return None
            except OSError:
                raise Disconnected() from None
        else:
            end = 0.0
            while True:
                if tried:
                    if end:
                        timeout = end - time.monotonic()
                    else:
                        end = time.monotonic() + timeout
                    if timeout <= 0 or not self.waiter(self.sock, False, timeout):
                        return None
                try:
                    data = raw.recv(RECV_SIZE)
                    break
                except BlockingIOError:
                    tried = True
                except OSError:
                    raise Disconnected() from None
        if not data:
            raise Disconnected()
        return data

    def wait_input(self, timeout: float) -> int:
        """Wait up to `timeout` (0: just look) for the peer to send anything; returns bytes
        now buffered."""
        if self.buf or timeout < 0:
            return len(self.buf)
        self.flush()
        data = self._receive(timeout)
        if data is not None:
            self.buf += data
        return len(self.buf)

    def read_more(self, timeout: float) -> int:
        """Wait up to `timeout` for input beyond what is buffered (a PROXY header that came in
        pieces, `smtp.haproxy`); returns bytes now buffered. Disconnected when the peer
        closed."""
        data = self._receive(timeout)
        if data is not None:
            self.buf += data
        return len(self.buf)

    def take(self, size: int) -> bytes:
        """The first `size` bytes of the buffered input, taken off it."""
        taken, self.buf = self.buf[:size], self.buf[size:]
        return taken

    def discard_input(self) -> int:
        """Forget buffered input (after STARTTLS: CVE-2011-0411); returns bytes dropped."""
        dropped, self.buf = len(self.buf), b""
        return dropped

    def _recv(self, deadline: float = 0.0, slow: bool = False) -> bytes:
        """Bytes from the peer within `timeout`, and before `deadline` when one is given.

        `slow`: the peer is part-way through a record, so the deadline running out before
        `timeout` of silence is the peer's slowness: Timeout(slow=True).
        """
        self.flush()
        # In the hub, look first: what has come costs one receive, a wait costs two switches.
        # In poll(2), wait first: a look that finds nothing costs a third system call.
        tried = self.raw is not None
        if self.waiter is _wait_cooperative:
            data = self._receive(0.0)
            if data is not None:  # it had come: no clock, no wait
                return data
        idle_end = time.monotonic() + self.timeout
        end = min(deadline, idle_end) if deadline else idle_end
        slow = slow and end < idle_end
        while True:
            wait = end - time.monotonic()
            if wait <= 0:
                raise Timeout(slow)
            data = self._receive(min(wait, self.tick_every) if self.tick else wait, tried)
            if data is not None:
                return data
            if not self.tick:
                raise Timeout(slow)
            self.tick()
            tried = False

    def readline(self, limit: int) -> bytes:
        """One line without its line ending (CRLF or LF)."""
        deadline = time.monotonic() + self.timeout if self.per_record else 0.0
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 1:]
                if len(line) > limit:
                    raise LineTooLong()
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buf) > limit:
                self._skip_line(deadline)
                raise LineTooLong()
            self.buf += self._recv(deadline, bool(self.buf))

    def _skip_line(self, deadline: float) -> None:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                self.buf = self.buf[end + 1:]
                return
            self.buf = self._recv(deadline, True)

    def read_data(self, size_limit: int) -> DataResult:
        """Message data up to CRLF.CRLF, dot-unstuffed (RFC 5321 section 4.5.2).

        A message over `size_limit` is read to its end and dropped (problem "too_big"), so
        the dialogue stays in step and the client gets its 552 after the final dot.
        """
        # The DATA command's own CRLF precedes the data: a message may end at once with ".".
        buf = bytearray(b"\r\n")
        buf += self.buf
        self.buf = b""
        start, dropped = 0, 0
        rate = self.min_data_rate if self.per_record else 0
        deadline = time.monotonic() + self.timeout if rate else 0.0
        slow = False
        while True:
            end = buf.find(_END, start)
            if end >= 0:
                break
            if len(buf) + dropped > size_limit + 2:
                dropped += len(buf) - 4  # keep the tail: the end mark may span two reads
                del buf[:-4]
            start = max(0, len(buf) - 4)
            data = self._recv(deadline, slow)
            buf += data
            if rate:  # Postfix's smtpd_min_data_rate: N bytes buy N / rate seconds
                earned, cap = deadline + len(data) / rate, time.monotonic() + self.timeout
                # At the cap, expiry is `timeout` of silence (idle), not a low rate.
                deadline, slow = min(earned, cap), earned < cap
        self.buf = bytes(buf[end + len(_END):])
        size = dropped + end
        if size > size_limit:
            return DataResult(None, size, "too_big")
        data = bytes(buf[2:end + 2])
        problem = malformed(data)
        if problem:
            return DataResult(None, size, problem)
        if data.startswith(b"."):
            data = data[1:]
        return DataResult(data.replace(b"\r\n.", b"\r\n"), size, "")

    def read_chunk(self, size: int, keep: bool) -> bytes | None:
        """The next `size` octets, as they are (a BDAT chunk, RFC 3030); read and dropped
        (None) unless `keep`, so that a refused chunk is never taken for commands."""
        rate = self.min_data_rate if self.per_record else 0
        deadline = time.monotonic() + self.timeout if rate else 0.0
        parts, need = [], size
        data, self.buf = self.buf[:need], self.buf[need:]
        while True:
            need -= len(data)
            if keep:
                parts.append(data)
            if need <= 0:
                return b"".join(parts) if keep else None
            data = self._recv(deadline, True)
            if len(data) > need:
                data, self.buf = data[:need], data[need:]
            if rate:
                deadline = min(deadline + len(data) / rate, time.monotonic() + self.timeout)

    def send_data(self, data: bytes, block_timeout: float) -> None:
        """Dot-stuff and send a message, then the final dot (client side)."""
        self.flush()
        if data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        if data and not data.endswith(b"\r\n"):
            data += b"\r\n"
        self._send(data + b".\r\n", block_timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
