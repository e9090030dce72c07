"""The host's own client state (`clientstate.ClientState`): per-client connection and rate
counters for the whole host (Postfix's anvil), the greet test's pass cache, the DNSBL
answers and the client names (`peername`), kept by the master.

`Anvil` is the store: plain counters and caches and no I/O, with the clock passed in, so that
it is unit-testable. The master owns one and serves every SMTP worker over a SOCK_SEQPACKET
socketpair made at fork (`AnvilServer`); a worker's sessions ask through one `AnvilClient`,
which tags each request with a sequence number so that thousands of sessions share the
socket. Limits are applied by the caller, as Postfix's smtpd does with anvil's counts. As the
master keeps the caches, every SMTP worker of the host shares them and they outlive a reload
or a recycled worker (postscreen's cache, shared by all of postscreen's clients).

Rates are counted in fixed windows of `anvil_rate_time_unit` per client from its first event,
as Postfix's anvil does. The connection count is of live sessions: a session releases its
count when it ends, and the master releases all of a worker's counts when the worker exits, so
a crashed worker leaves nothing behind.

A storm asks thousands of times a second, so neither side pays a system call per request:
in a worker, sessions only queue their requests, and one writer greenlet sends what was
queued meanwhile in as few packets as fit (one reader greenlet takes the answers), so no two
greenlets ever wait on the socket; the master answers each packet's requests in one packet.
A request whose session has given up before it was sent is not sent; a connect that was sent
but not answered in time is released (`D`) at once, so a late answer never leaves a count
behind. The queue holds at most _OUTBOX_MAX requests (a master that reads nothing for
long); past it, a request fails open at once. When the master does not answer within
ANVIL_TIMEOUT, the session fails open (not limited): counted (`anvil_fallbacks` on the board: `poolmgr status`, the metric
`poolmgr_anvil_fallbacks_total`) and logged once per episode, from the first such request
(`anvil: no answer from the master for OP IP: Timeout -- not limiting`) to the first answer
ANVIL_TIMEOUT after the last one (`anvil: the master answers again; N request(s) were not
limited`).

Wire format (ASCII, SOCK_SEQPACKET): a packet is one or more requests, or one or more
answers, separated by newlines, at most _PACKET bytes. Requests: `SEQ C IP` connect ->
`SEQ COUNT RATE 0|1` (the last: whether the client's greet test pass holds, kept by the
worker for GREET_KEPT seconds for the session's `greet_passed` that follows, so that a new
session waits for one answer before its banner, not two), `SEQ M IP` message -> `SEQ RATE`,
`SEQ R IP` recipient -> `SEQ RATE`, `0 D IP` disconnect (no answer); `SEQ G IP` greet test
passed? -> `SEQ 0|1`, `0 P IP TTL` passed it (no answer); `SEQ L IP DOMAIN...` cached DNSBL answers -> `SEQ V...` (1 listed,
0 not, -1 unknown), `0 S IP DOMAIN 0|1 TTL` cache an answer (no answer); `SEQ N IP` the
cached name -> `SEQ 1 NAME REVERSE` (`SEQ 0` when none), `0 H IP NAME REVERSE TTL` cache it
(no answer). A malformed request is skipped; requests are served in the order sent.
"""

__all__ = ["Anvil", "AnvilServer", "AnvilClient", "Usage", "ANVIL_TIMEOUT"]

import selectors
import socket
import time
from collections import Counter, deque

from .clientstate import ClientState, PassCache, TtlCache, Usage

# Idle clients are swept out once a time unit, or sooner when the store has doubled since
# the last sweep (at least _PURGE_SIZE): a sweep walks every client, so it is kept amortised
# (with 100,000 live clients, one every 1,024 requests cost more than the requests).
_PURGE_SIZE = 1024
ANVIL_TIMEOUT = 2.0  # a worker's wait for an answer; after it the client fails open
_PACKET = 4096  # requests or answers, at most (a DNSBL lookup names every site)
_PACKETS_PER_TURN = 64  # packets the master serves from one worker before its loop goes on
# Requests a worker holds for a master that has stopped reading; past it, new ones fail open.
_OUTBOX_MAX = 100_000
# Seconds a worker keeps the greet test pass that came with a connect's answer, for the
# session's greet_passed right after (a session refused at connect never asks).
GREET_KEPT = 1.0


class _Client:
    __slots__ = ("count", "window_start", "connections", "messages", "recipients")

    def __init__(self, now: float):
        self.count = 0
        self.window_start = now
        self.connections = self.messages = self.recipients = 0


class Anvil:
    """The counters of every client, for the whole host."""

    def __init__(self, time_unit: float):
        self.time_unit = time_unit
        self.clients: dict[str, _Client] = {}
        self.owners: dict[object, Counter] = {}  # worker -> live connections by client
        self.requests = 0
        self.next_purge, self.purge_size = 0.0, _PURGE_SIZE  # see _PURGE_SIZE
        self.greet = PassCache()  # the clients whose greet test pass holds
        self.dnsbl = TtlCache()  # (domain, ip) -> listed, for the answer's TTL
        self.names = TtlCache()  # ip -> (name, reverse), for the answers' TTL

    def _client(self, ip: str, now: float) -> _Client:
        self.requests += 1
        if now >= self.next_purge or len(self.clients) >= self.purge_size:
            self.purge(now)
        client = self.clients.get(ip)
        if client is None:
            client = self.clients[ip] = _Client(now)
        elif now - client.window_start >= self.time_unit:
            client.window_start = now
            client.connections = client.messages = client.recipients = 0
        return client

    def connect(self, owner, ip: str, now: float) -> Usage:
        client = self._client(ip, now)
        client.count += 1
        client.connections += 1
        self.owners.setdefault(owner, Counter())[ip] += 1
        return Usage(client.count, client.connections)

    def disconnect(self, owner, ip: str) -> None:
        held = self.owners.get(owner)
        if not held or held[ip] <= 0:
            return
        held[ip] -= 1
        if not held[ip]:
            del held[ip]
        client = self.clients.get(ip)
        if client is not None and client.count > 0:
            client.count -= 1

    def message(self, ip: str, now: float) -> int:
        client = self._client(ip, now)
        client.messages += 1
        return client.messages

    def recipient(self, ip: str, now: float) -> int:
        client = self._client(ip, now)
        client.recipients += 1
        return client.recipients

    def release(self, owner) -> int:
        """A worker has exited: drop the connections it held; returns how many."""
        held = self.owners.pop(owner, None) or Counter()
        for ip, n in held.items():
            client = self.clients.get(ip)
            if client is not None:
                client.count = max(0, client.count - n)
        return sum(held.values())

    def purge(self, now: float) -> None:
        """Forget clients with no live connection whose window has ended."""
        self.next_purge = now + self.time_unit
        self.clients = {ip: c for ip, c in self.clients.items()
                        if c.count or now - c.window_start < self.time_unit}
        self.purge_size = max(_PURGE_SIZE, 2 * len(self.clients))

    def greet_passed(self, ip: str, now: float) -> bool:
        return self.greet.holds(ip, now)

    def pass_greet(self, ip: str, ttl: float, now: float) -> None:
        self.greet.add(ip, ttl, now)

    def dnsbl_cached(self, ip: str, domains, now: float) -> list[bool | None]:
        return [self.dnsbl.get((domain, ip), now) for domain in domains]

    def cache_dnsbl(self, ip: str, domain: str, listed: bool, ttl: float, now: float) -> None:
        self.dnsbl.put((domain, ip), listed, now + ttl, now)

    def name_cached(self, ip: str, now: float) -> tuple[str, str] | None:
        return self.names.get(ip, now)

    def cache_name(self, ip: str, name: str, reverse: str, ttl: float, now: float) -> None:
        self.names.put(ip, (name, reverse), now + ttl, now)


class AnvilServer:
    """The master's side: one socket per SMTP worker (`pair` before the fork, `adopt` after
    it, `drop` when the worker is gone), each served as its packets arrive."""

    def __init__(self, anvil: Anvil, clock):
        self.anvil = anvil
        self.clock = clock
        self.socks: dict[int, socket.socket] = {}  # SMTP worker pid -> the master's end

    @staticmethod
    def pair() -> tuple[socket.socket, socket.socket]:
        """A new worker's socketpair: (the master's end, the worker's). Raises OSError."""
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def adopt(self, pid: int, sock: socket.socket, selector) -> None:
        sock.setblocking(False)
        self.socks[pid] = sock
        selector.register(sock, selectors.EVENT_READ, pid)

    def drop(self, pid: int, selector, log) -> None:
        """The worker's socket is closed or the worker exited: what it held is released."""
        sock = self.socks.pop(pid, None)
        if sock is not None:
            selector.unregister(sock)
            sock.close()
        released = self.anvil.release(pid)
        if released:
            log.info("anvil: released %d connection(s) held by exited worker pid %d",
                     released, pid)

    def fds(self) -> list[int]:
        """The master's ends: a forked worker closes them."""
        return [sock.fileno() for sock in self.socks.values()]

    def figures(self) -> tuple[int, int, int, int, int]:
        """Clients, their connections, greet passes, DNSBL answers and client names held
        (for status)."""
        anvil = self.anvil
        return (len(anvil.clients), sum(c.count for c in anvil.clients.values()),
                len(anvil.greet), len(anvil.dnsbl), len(anvil.names))

    def serve(self, sock: socket.socket, owner) -> bool:
        """Answer the pending requests (up to _PACKETS_PER_TURN packets of them: the loop has
        other workers and its housekeeping); False when the worker's end is closed."""
        for _ in range(_PACKETS_PER_TURN):
            try:
                packet = sock.recv(_PACKET)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not packet:
                return False
            try:
                lines = packet.decode("ascii").split("\n")
            except UnicodeDecodeError:
                continue
            answers = []
            for line in lines:
                try:
                    seq, op, ip, *args = line.split()
                    answer = self.answer(owner, op, ip, args)
                except ValueError:
                    continue
                if answer is not None:
                    answers.append(f"{seq} {answer}")
            if answers and not self._send(sock, answers):
                return False
        return True

    @staticmethod
    def _send(sock: socket.socket, answers: list[str]) -> bool:
        """The answers, in as few packets as fit; False when the worker's end is closed."""
        for packet in _packets(answers):
            try:
                sock.send(packet)
            except BlockingIOError:
                pass  # the worker is not reading: its sessions time out and carry on
            except OSError:
                return False
        return True

    def answer(self, owner, op: str, ip: str, args: list[str]) -> str | None:
        """One request (ValueError when malformed); None for those that get no answer."""
        anvil, now = self.anvil, self.clock()
        if op == "C":
            count, rate = anvil.connect(owner, ip, now)
            return "%d %d %d" % (count, rate, anvil.greet_passed(ip, now))
        if op == "M":
            return str(anvil.message(ip, now))
        if op == "R":
            return str(anvil.recipient(ip, now))
        if op == "D":
            anvil.disconnect(owner, ip)
        elif op == "G":
            return str(int(anvil.greet_passed(ip, now)))
        elif op == "P":
            anvil.pass_greet(ip, float(args[0]), now)
        elif op == "L":
            return " ".join("-1" if v is None else str(int(v))
                            for v in anvil.dnsbl_cached(ip, args, now))
        elif op == "S":
            domain, listed, ttl = args
            anvil.cache_dnsbl(ip, domain, listed == "1", float(ttl), now)
        elif op == "N":
            cached = anvil.name_cached(ip, now)
            return "0" if cached is None else "1 %s %s" % cached
        elif op == "H":
            name, reverse, ttl = args
            anvil.cache_name(ip, name, reverse, float(ttl), now)
        return None


def _packets(lines: list[str]):
    """`lines` joined by newlines into packets of at most _PACKET bytes (a longer line goes
    alone: the receiver drops what is cut off, and that request fails open)."""
    batch, size = [], 0
    for line in lines:
        if batch and size + len(line) >= _PACKET:
            yield "\n".join(batch).encode("ascii")
            batch, size = [], 0
        batch.append(line)
        size += len(line) + 1
    if batch:
        yield "\n".join(batch).encode("ascii")


class AnvilClient(ClientState):
    """A worker's side (gevent): one socket shared by all sessions, answers matched by seq;
    one writer greenlet sends what the sessions queue, one reader takes the answers.

    When the master does not answer within `timeout`, the request fails open (None): a slow
    master must not stop mail. Each such request is counted (`fallbacks`, and `count()`,
    the worker's board counter); the first of an episode is logged (see the module's
    docstring).
    """

    def __init__(self, sock: socket.socket, timeout: float, logger, count=None):
        import gevent
        import gevent.event

        from ..smtp.runners import Turn

        self.sock = sock
        self.timeout = timeout
        self.log = logger
        self.count = count  # called once per request failed open
        self.seq = 0
        self.sent = 0  # the highest seq handed to the socket
        self.closed = False  # the master's end is gone: stop asking
        self.pending: dict[int, list] = {}  # seq -> [its Turn, the answer when it came]
        self.outbox: deque[tuple[int, str]] = deque()  # (seq, request); 0: no answer awaited
        self.fallbacks = 0  # requests failed open, since the start
        self.failing = 0  # ... in the current episode (0: none)
        self.failed_at = 0.0  # when the last one failed
        self.greet_seen: dict[str, tuple[bool, float]] = {}  # ip -> (passed, when): see C
        hub = gevent.get_hub()
        self.turn = lambda: Turn(hub)  # an answer's wake-up: one timer, no Timeout object
        self.queued = gevent.event.Event()
        self.reader = gevent.spawn(self._read)
        self.writer = gevent.spawn(self._write)

    def _read(self) -> None:
        while True:
            try:
                packet = self.sock.recv(_PACKET)
            except OSError:
                break
            if not packet:
                break
            for line in packet.decode("ascii", "replace").split("\n"):
                seq, _, rest = line.partition(" ")
                waiter = self.pending.pop(int(seq) if seq.isdigit() else 0, None)
                if waiter is not None:  # [its Turn, the answer]
                    # Numbers, but for the names of a cached client name (`N`).
                    waiter[1] = tuple(int(v) if v.lstrip("-").isdigit() else v
                                      for v in rest.split())
                    waiter[0].set()
            if self.failing and time.monotonic() - self.failed_at >= self.timeout:
                self.log.info("anvil: the master answers again; %d request(s) were not limited",
                              self.failing)
                self.failing = 0
        self.closed = True
        self.queued.set()  # the writer ends
        self.log.warning("anvil: the master closed the connection -- not limiting")
        for waiter in self.pending.values():
            waiter[0].set()  # its answer None: closed

    def _write(self) -> None:
        """What the sessions queue, in the order queued, a packet at a time as the socket
        takes them: a request whose session gave up while it waited here is left out."""
        outbox = self.outbox
        while not self.closed:
            self.queued.wait()
            self.queued.clear()
            while outbox and not self.closed:
                packet = self._packet()
                try:
                    if packet:
                        self.sock.send(packet)  # waits while the master is behind
                except OSError:
                    return  # the reader sees the socket closed too

    def _packet(self) -> bytes:
        """The next packet's worth of the queue."""
        outbox, pending = self.outbox, self.pending
        lines, size = [], 0
        while outbox:
            seq, request = outbox[0]
            if seq and seq not in pending:
                outbox.popleft()  # its session has given up
                continue
            if lines and size + len(request) >= _PACKET:
                break
            outbox.popleft()
            lines.append(request)
            size += len(request) + 1
            if seq:
                self.sent = seq  # queued in order: the highest so far
        return "\n".join(lines).encode("ascii")

    def _queue(self, seq: int, request: str) -> bool:
        """False when the queue is full (the master has read nothing for long)."""
        if len(self.outbox) >= _OUTBOX_MAX:
            return False
        self.outbox.append((seq, request))
        self.queued.set()
        return True

    def _ask(self, op: str, ip: str):
        if self.closed:
            self._fell_back(op, ip, "closed")
            return None
        self.seq += 1
        seq = self.seq
        waiter = self.pending[seq] = [self.turn(), None]
        if not self._queue(seq, f"{seq} {op} {ip}"):
            del self.pending[seq]
            self._fell_back(op, ip, "queue full")
            return None
        try:
            answered = waiter[0].wait(self.timeout)
        finally:
            self.pending.pop(seq, None)
        if not answered:
            if op == "C" and seq <= self.sent:
                # The master counts it when it gets there: the session will not release it.
                self._queue(0, f"0 D {ip}")
            self._fell_back(op, ip, "Timeout")
            return None
        answer = waiter[1]
        if answer is None:  # the master closed the connection meanwhile
            self._fell_back(op, ip, "closed")
        return answer

    def _fell_back(self, op: str, ip: str, why: str) -> None:
        """A request failed open: counted, and logged if it is the first of an episode."""
        self.fallbacks += 1
        if self.count is not None:
            self.count()
        if not self.failing and not self.closed:
            self.log.warning("anvil: no answer from the master for %s %s: %s -- not limiting",
                             op, ip.split()[0], why)
        self.failing += 1
        self.failed_at = time.monotonic()

    def connect(self, ip: str) -> Usage | None:
        answer = self._ask("C", ip)
        if not answer:
            return None
        seen, now = self.greet_seen, time.monotonic()
        if seen:  # forget the oldest if nobody asked for it in time (oldest first: pop, put)
            oldest = next(iter(seen))
            if now - seen[oldest][1] >= GREET_KEPT:
                del seen[oldest]
        seen.pop(ip, None)
        seen[ip] = (bool(answer[2]), now)
        return Usage(answer[0], answer[1])

    def _tell(self, request: str) -> None:
        """A request that gets no answer."""
        if not self.closed and not self._queue(0, f"0 {request}"):
            op, ip = request.split()[:2]
            self._fell_back(op, ip, "queue full")

    def disconnect(self, ip: str) -> None:
        self._tell(f"D {ip}")

    def message(self, ip: str) -> int | None:
        answer = self._ask("M", ip)
        return answer[0] if answer else None

    def recipient(self, ip: str) -> int | None:
        answer = self._ask("R", ip)
        return answer[0] if answer else None

    def greet_passed(self, ip: str) -> bool:
        seen = self.greet_seen.pop(ip, None)
        if seen is not None and time.monotonic() - seen[1] < GREET_KEPT:
            return seen[0]  # from the connect's answer, a moment ago
        answer = self._ask("G", ip)
        return bool(answer and answer[0])

    def pass_greet(self, ip: str, ttl: float) -> None:
        self._tell(f"P {ip} {ttl:g}")

    def dnsbl_cached(self, ip: str, domains: list[str]) -> dict[str, bool]:
        answer = self._ask("L", " ".join([ip, *domains])) or ()
        return {domain: bool(v) for domain, v in zip(domains, answer) if v >= 0}

    def cache_dnsbl(self, ip: str, domain: str, listed: bool, ttl: float) -> None:
        self._tell(f"S {ip} {domain} {int(listed)} {ttl:g}")

    def name_cached(self, ip: str) -> tuple[str, str] | None:
        answer = self._ask("N", ip)
        if not answer or answer[0] != 1 or len(answer) != 3:
            return None
        return str(answer[1]), str(answer[2])

    def cache_name(self, ip: str, name: str, reverse: str, ttl: float) -> None:
        self._tell(f"H {ip} {name} {reverse} {ttl:g}")
