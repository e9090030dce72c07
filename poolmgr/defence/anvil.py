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

Wire format (ASCII, one request per packet): `SEQ C IP` connect -> `SEQ COUNT RATE`,
`SEQ M IP` message -> `SEQ RATE`, `SEQ R IP` recipient -> `SEQ RATE`, `0 D IP` disconnect
(no answer); `SEQ G IP` greet test passed? -> `SEQ 0|1`, `0 P IP TTL` passed it (no answer);
`SEQ L IP DOMAIN...` cached DNSBL answers -> `SEQ V...` (1 listed, 0 not, -1 unknown),
`0 S IP DOMAIN 0|1 TTL` cache an answer (no answer); `SEQ N IP` the cached name ->
`SEQ 1 NAME REVERSE` (`SEQ 0` when none), `0 H IP NAME REVERSE TTL` cache it (no answer).
"""

__all__ = ["Anvil", "AnvilServer", "AnvilClient", "Usage", "ANVIL_TIMEOUT"]

import selectors
import socket
from collections import Counter

from .clientstate import ClientState, TtlCache, Usage

_PURGE_EVERY = 1024  # requests between sweeps of idle clients, at most
ANVIL_TIMEOUT = 2.0  # a worker's wait for an answer; after it the client fails open
_PACKET = 4096  # a request or an answer, at most (a DNSBL lookup names every site)


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
        self.next_purge = 0.0  # and at least once a time unit, when there are requests
        self.greet = TtlCache()  # ip -> True while its greet test pass holds
        self.dnsbl = TtlCache()  # (domain, ip) -> listed, for the answer's TTL
        self.names = TtlCache()  # ip -> (name, reverse), for the answers' TTL

    def _client(self, ip: str, now: float) -> _Client:
        self.requests += 1
        if self.requests % _PURGE_EVERY == 0 or now >= self.next_purge:
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

    def greet_passed(self, ip: str, now: float) -> bool:
        return bool(self.greet.get(ip, now))

    def pass_greet(self, ip: str, ttl: float, now: float) -> None:
        self.greet.put(ip, True, now + ttl, now)

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
        """Answer every pending request; False when the worker's end is closed."""
        while True:
            try:
                packet = sock.recv(_PACKET)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not packet:
                return False
            try:
                seq, op, ip, *args = packet.decode("ascii").split()
                answer = self.answer(owner, op, ip, args)
            except (UnicodeDecodeError, ValueError):
                continue
            if answer is None:
                continue
            try:
                sock.send(f"{seq} {answer}".encode("ascii"))
            except BlockingIOError:
                pass  # the worker is not reading: it will time out and carry on
            except OSError:
                return False

    def answer(self, owner, op: str, ip: str, args: list[str]) -> str | None:
        """One request (ValueError when malformed); None for those that get no answer."""
        anvil, now = self.anvil, self.clock()
        if op == "C":
            return "%d %d" % anvil.connect(owner, ip, now)
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


class AnvilClient(ClientState):
    """A worker's side (gevent): one socket shared by all sessions, answers matched by seq.

    When the master does not answer within `timeout`, the request fails open (None) and a
    warning is logged: a slow master must not stop mail.
    """

    def __init__(self, sock: socket.socket, timeout: float, logger):
        import gevent
        import gevent.event
        import gevent.exceptions

        self.sock = sock
        self.timeout = timeout
        self.log = logger
        self.seq = 0
        self.closed = False  # the master's end is gone: stop asking
        self.pending: dict[int, "gevent.event.AsyncResult"] = {}
        self.result_type = gevent.event.AsyncResult
        # ConcurrentObjectUseError: another session is already waiting to send (the master is
        # behind and the socket's buffer is full); this one fails open instead of waiting too.
        self.failures = (gevent.Timeout, OSError, gevent.exceptions.ConcurrentObjectUseError)
        self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        while True:
            try:
                packet = self.sock.recv(_PACKET)
            except OSError:
                break
            if not packet:
                break
            seq, _, rest = packet.decode("ascii").partition(" ")
            waiter = self.pending.pop(int(seq), None)
            if waiter is not None:
                # Numbers, but for the names of a cached client name (`N`).
                waiter.set(tuple(int(v) if v.lstrip("-").isdigit() else v
                                 for v in rest.split()))
        self.closed = True
        self.log.warning("anvil: the master closed the connection -- not limiting")
        for waiter in self.pending.values():
            waiter.set(())

    def _ask(self, op: str, ip: str):
        if self.closed:
            return None
        self.seq += 1
        seq = self.seq
        waiter = self.pending[seq] = self.result_type()
        try:
            self.sock.send(f"{seq} {op} {ip}".encode("ascii"))
            return waiter.get(timeout=self.timeout)
        except self.failures as exc:  # fail open
            self.log.warning("anvil: no answer from the master for %s %s: %s -- not limiting",
                             op, ip, type(exc).__name__)
            return None
        finally:
            self.pending.pop(seq, None)

    def connect(self, ip: str) -> Usage | None:
        answer = self._ask("C", ip)
        return Usage(*answer) if answer else None

    def _tell(self, request: str) -> None:
        """A request that gets no answer."""
        if self.closed:
            return
        try:
            self.sock.send(f"0 {request}".encode("ascii"))
        except self.failures:
            pass

    def disconnect(self, ip: str) -> None:
        self._tell(f"D {ip}")

    def message(self, ip: str) -> int | None:
        answer = self._ask("M", ip)
        return answer[0] if answer else None

    def recipient(self, ip: str) -> int | None:
        answer = self._ask("R", ip)
        return answer[0] if answer else None

    def greet_passed(self, ip: str) -> bool:
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
