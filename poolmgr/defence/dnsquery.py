"""DNS queries, as the defences ask them (the DNSBL queries, the client's name).

`Stub` holds the name servers asked (`[defence] nameservers`, or the system's from
/etc/resolv.conf); dnspython makes and reads the messages. The exchange is ours: a worker
keeps one UDP socket per name server (`Channel`, opened at its first query), shared by every
query it asks; each query goes out with an ID no other pending query on that socket has, and
one reader greenlet per socket hands each answer to the query that waits for it (a `Turn`:
one timer, no greenlet of its own). A storm's connections each ask one to three queries, and
a socket, a greenlet and a timeout object per query were a third of an SMTP worker's CPU.

`ask` sends a query and returns a `Question` at once (a DNSBL score sends one per site, then
reads them); `Question.answer(deadline)` waits for it. Each server is tried in turn, each for
at most 2 s within the caller's deadline; a server that refuses (an ICMP port unreachable) or
answers SERVFAIL or REFUSED hands over to the next at once; a truncated answer is asked again
over TCP. Waiting is gevent's: it works in an SMTP worker and, unpatched, in a test.
"""

__all__ = ["Stub", "Question", "Channel"]

import random
import socket
import time

TRY_TIMEOUT = 2.0  # seconds per server tried, within the caller's deadline
RECEIVE_BUFFER = 4 << 20
_REFUSED = object()  # what a waiting query gets when its server's port refuses


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
        if channel is None or channel.closed:
            channel = self.channels[index] = Channel(*self.servers[index])
        return channel

    def ask(self, name: str, rdtype) -> "Question":
        """Send the query to the first server; its answer comes with `Question.answer`."""
        import dns.message

        return Question(self, dns.message.make_query(name, rdtype))

    def query(self, name: str, rdtype, deadline: float):
        """The answer (a dnspython Message, NOERROR or NXDOMAIN) from the first name server
        that gives one before `deadline`; None if none does."""
        return self.ask(name, rdtype).answer(deadline)


class Question:
    """One query on its way: to one server after another until one answers."""

    __slots__ = ("stub", "query", "server", "turn", "reply", "tried_at", "channel")

    def __init__(self, stub: Stub, query):
        self.stub, self.query = stub, query
        self.server, self.turn, self.reply, self.tried_at, self.channel = -1, None, None, 0.0, None
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

    def answer(self, deadline: float):
        """The answer (NOERROR or NXDOMAIN) by `deadline`, or None."""
        import dns.exception
        import dns.flags
        import dns.query
        import dns.rcode

        while self.channel is not None:
            left = min(deadline, self.tried_at + self.stub.try_timeout) - time.monotonic()
            if left > 0 and self.reply is None:
                self.turn.wait(left)
            self.channel.forget(self)
            reply, host, port = self.reply, *self.stub.servers[self.server]
            if reply is not None and reply is not _REFUSED:
                if reply.flags & dns.flags.TC:
                    try:
                        reply = dns.query.tcp(self.query, host, port=port,
                                              timeout=max(0.05, deadline - time.monotonic()))
                    except (OSError, dns.exception.DNSException):
                        reply = None
                if reply is not None and reply.rcode() in (dns.rcode.NOERROR,
                                                           dns.rcode.NXDOMAIN):
                    return reply
            if time.monotonic() >= deadline or not self._send_next():
                break
        if self.channel is not None:
            self.channel.forget(self)
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
        self.closed = False
        self.reader = gevent.spawn(self._read)

    def send(self, question: Question) -> None:
        query = question.query
        while query.id in self.waiting:  # another query on this socket has this ID
            query.id = random.randrange(65536)
        self.waiting[query.id] = question
        try:
            self.sock.send(query.to_wire())
        except OSError:
            self.waiting.pop(query.id, None)
            raise

    def forget(self, question: Question) -> None:
        if self.waiting.get(question.query.id) is question:
            del self.waiting[question.query.id]

    def _read(self) -> None:
        import dns.exception
        import dns.message

        while True:
            try:
                data = self.sock.recv(65535)
            except ConnectionRefusedError:  # the server's port is closed: try the next
                for question in list(self.waiting.values()):
                    question.settle(_REFUSED)
                self.waiting.clear()
                continue
            except OSError:
                break
            try:
                reply = dns.message.from_wire(data, ignore_trailing=True)
            except dns.exception.DNSException:
                continue
            question = self.waiting.get(reply.id)
            if question is not None and question.query.is_response(reply):
                del self.waiting[reply.id]
                question.settle(reply)
        self.closed = True
        for question in list(self.waiting.values()):
            question.settle(_REFUSED)
        self.waiting.clear()
