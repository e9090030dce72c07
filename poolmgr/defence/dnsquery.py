"""DNS queries, as the defences ask them (the DNSBL queries, the client's name).

`Stub` holds the name servers asked (`[defence] nameservers`, or the system's from
/etc/resolv.conf) and keeps one UDP socket per name server (`Channel`, opened at its first
query; a worker's DNSBL scorer and its name lookups have a `Stub` each), shared by every query
it asks; each query goes out with an ID no other pending query on that socket has, and one
reader greenlet per socket hands each answer to the query that waits for it (a `Turn`: one
timer, no greenlet of its own). A storm's connections each ask one to three queries, and a
socket, a greenlet and a timeout object per query were a third of an SMTP worker's CPU.

The query's few bytes (header, one question) are written here; the answer is read by
dnspython (`from_wire`), once its ID and question show it is the one asked: dnspython's
query making took more of a storm connection's time than the rest of the DNS exchange. IDs
come from the system's randomness, and each socket is replaced after `ROTATE` queries or
`ROTATE_AGE` seconds, so the source port keeps changing too (an answer forged from off the
path must guess both).

`ask` sends a query and returns a `Question` at once (a DNSBL score sends one per site, then
reads them); `Question.answer(deadline)` waits for it, `advance` moves it on without waiting
if its server failed, `cancel` gives it up. Each server is tried in turn, each for at most
2 s within the caller's deadline; a server that refuses (an ICMP port or host unreachable) or
answers SERVFAIL or REFUSED is left for the next at once; a truncated answer is asked again
over TCP. Waiting is gevent's: it works in an SMTP worker and, unpatched, in a test.
"""

__all__ = ["Stub", "Question", "Channel", "ROTATE", "question_section"]

import errno
import os
import socket
import struct
import time

TRY_TIMEOUT = 2.0  # seconds per server tried, within the caller's deadline
RECEIVE_BUFFER = 4 << 20
ROTATE = 64  # queries a socket sends before a new one (a new source port) takes over
ROTATE_AGE = 2.0  # ... or seconds it is used, whichever comes first (a quiet worker's port)
_REFUSED = object()  # what a waiting query gets when its server's port refuses
# ICMP errors a connected UDP socket reports on its next recv: that server, not this socket
_UNREACHABLE = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN)
_HEADER = struct.Struct(">HHHHHH")  # ID, flags (RD), one question, no other records
_ids: list[int] = []


os.register_at_fork(after_in_child=_ids.clear)  # a child draws its own


def _new_id() -> int:
    if not _ids:
        _ids.extend(struct.unpack(">1024H", os.urandom(2048)))
    return _ids.pop()


def question_section(name: str, rdtype: int) -> bytes:
    """The question's wire form (IN class); ValueError for a name DNS cannot carry."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")  # UnicodeEncodeError is a ValueError
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad DNS label in {name!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise ValueError(f"DNS name too long: {name!r}")
    return bytes(out) + struct.pack(">HH", rdtype, 1)


class Stub:
    def __init__(self, nameservers: tuple, timeout: float):
        import dns.resolver

        if nameservers:
            self.servers = [(host, port) for host, port in nameservers]
        else:  # the system's, from /etc/resolv.conf
            system = dns.resolver.Resolver()
            self.servers = [(str(ns), system.port) for ns in system.nameservers]
        self.try_timeout = min(TRY_TIMEOUT, timeout)
        self.channels: dict[int, Channel] = {}  # by the server's position, opened when used

    def channel(self, index: int) -> "Channel":
        channel = self.channels.get(index)
        if channel is None or channel.closed or channel.sent >= ROTATE or \
                time.monotonic() - channel.opened > ROTATE_AGE:
            if channel is not None:
                channel.retire()
            channel = self.channels[index] = Channel(*self.servers[index])
        return channel

    def ask(self, name: str, rdtype) -> "Question":
        """Send the query to the first server; its answer comes with `Question.answer`. A
        name DNS cannot carry gets no answer."""
        return Question(self, name, int(rdtype))

    def query(self, name: str, rdtype, deadline: float):
        """The answer (a dnspython Message, NOERROR or NXDOMAIN) from the first name server
        that gives one before `deadline`; None if none does."""
        return self.ask(name, rdtype).answer(deadline)


class Question:
    """One query on its way: to one server after another until one answers."""

    __slots__ = ("stub", "name", "rdtype", "section", "id", "server", "turn", "reply",
                 "tried_at", "channel")

    def __init__(self, stub: Stub, name: str, rdtype: int):
        self.stub, self.name, self.rdtype = stub, name, rdtype
        self.server, self.turn, self.reply, self.tried_at, self.channel = -1, None, None, 0.0, None
        self.id = 0
        try:
            self.section = question_section(name, rdtype)
        except ValueError:
            return  # no channel: answer() gives None
        self._send_next()

    def _send_next(self) -> bool:
        """Send to the next server; False when none is left."""
        import gevent

        from ..smtp.runners import Turn

        self.server += 1
        while self.server < len(self.stub.servers):
            self.turn, self.reply = Turn(gevent.get_hub()), None
            self.tried_at = time.monotonic()
            try:
                self.channel = self.stub.channel(self.server)
                self.channel.send(self)
                return True
            except OSError:
                self.server += 1
        self.channel = None
        return False

    def settle(self, reply) -> None:
        """From the channel's reader: the answer, or _REFUSED."""
        self.reply = reply
        self.turn.set()

    def _failed(self) -> bool:
        """Whether the server asked now has failed it: refused, an answer that is not one
        (SERVFAIL, REFUSED), or no answer within its try."""
        import dns.flags
        import dns.rcode

        reply = self.reply
        if reply is None:
            return time.monotonic() >= self.tried_at + self.stub.try_timeout
        return reply is _REFUSED or not (reply.flags & dns.flags.TC or reply.rcode() in (
            dns.rcode.NOERROR, dns.rcode.NXDOMAIN))

    def advance(self) -> None:
        """Move on to the next server now if this one has failed, without waiting: the
        other questions of a DNSBL score go on while the first is read."""
        if self.channel is not None and self._failed():
            self.channel.forget(self)
            self._send_next()

    def cancel(self) -> None:
        """Nobody will read the answer: the socket stops waiting for it."""
        if self.channel is not None:
            self.channel.forget(self)
            self.channel = None

    def answer(self, deadline: float):
        """The answer (a dnspython Message, NOERROR or NXDOMAIN) by `deadline`, or None."""
        try:
            return self._answer(deadline)
        finally:  # also when the waiting greenlet is killed
            self.cancel()

    def _answer(self, deadline: float):
        import dns.exception
        import dns.flags
        import dns.message
        import dns.query

        while self.channel is not None:
            left = min(deadline, self.tried_at + self.stub.try_timeout) - time.monotonic()
            if left > 0 and self.reply is None:
                self.turn.wait(left)
            reply, host, port = self.reply, *self.stub.servers[self.server]
            if reply is not None and reply is not _REFUSED and reply.flags & dns.flags.TC:
                self.channel.forget(self)
                query = dns.message.make_query(self.name, self.rdtype)
                try:
                    self.reply = dns.query.tcp(query, host, port=port,
                                               timeout=max(0.05, deadline - time.monotonic()))
                except (OSError, EOFError, dns.exception.DNSException):
                    self.reply = _REFUSED
            if self.reply is not None and not self._failed():
                return self.reply
            if time.monotonic() >= deadline:
                break
            self.channel.forget(self)
            if not self._send_next():
                break
        return None


class Channel:
    """One UDP socket to one name server, shared by a worker's queries, with its reader."""

    def __init__(self, host: str, port: int):
        import gevent
        from gevent import socket as gsocket

        self.sock = gsocket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                   socket.SOCK_DGRAM)
        # A storm's answers wait here while the hub is busy: room for thousands (the
        # kernel caps it at net.core.rmem_max).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.sock.connect((host, port))
        self.waiting: dict[int, Question] = {}  # by query ID
        self.sent, self.opened = 0, time.monotonic()
        self.closed = self.retired = False
        self.reader = gevent.spawn(self._read)

    def send(self, question: Question) -> None:
        question.id = _new_id()
        while question.id in self.waiting:  # another query on this socket has this ID
            question.id = _new_id()
        self.waiting[question.id] = question
        self.sent += 1
        try:
            self.sock.send(_HEADER.pack(question.id, 0x0100, 1, 0, 0, 0) + question.section)
        except OSError:
            self.waiting.pop(question.id, None)
            raise

    def forget(self, question: Question) -> None:
        if self.waiting.get(question.id) is question:
            del self.waiting[question.id]
        if self.retired and not self.waiting:
            self.close()

    def retire(self) -> None:
        """No more queries: closed once those it waits for are answered or given up."""
        self.retired = True
        if not self.waiting:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()  # its reader ends

    def _read(self) -> None:
        import dns.exception
        import dns.message

        while not self.closed:
            try:
                data = self.sock.recv(65535)
            except OSError as exc:
                if self.closed or exc.errno not in _UNREACHABLE:
                    break
                # The server's port is closed, or the host unreachable: try the next.
                for question in list(self.waiting.values()):
                    question.settle(_REFUSED)
                self.waiting.clear()
                if self.retired:
                    self.close()
                continue
            question = self.waiting.get(int.from_bytes(data[:2], "big"))
            if question is None or not len(data) > 2 or not data[2] & 0x80 or \
                    data[12:12 + len(question.section)].lower() != question.section.lower():
                continue  # not an answer to a query that waits (late, or forged)
            try:
                reply = dns.message.from_wire(data, ignore_trailing=True)
            except (dns.exception.DNSException, ValueError):
                continue  # malformed: the query waits on (its try's time, then the next)
            del self.waiting[question.id]
            question.settle(reply)
            if self.retired and not self.waiting:
                self.close()
        self.close()
        for question in list(self.waiting.values()):
            question.settle(_REFUSED)
        self.waiting.clear()
