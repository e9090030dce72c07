"""Several MX nodes sharing their client state in one Redis (`[cluster]`): at a fixed address
(`redis`), or the master that Redis Sentinel names (`sentinels`, `sentinel_master`).

Where the Redis calls happen, and why: each SMTP worker talks to Redis itself
(`RedisState`, redis-py over sockets that gevent's monkey-patching makes cooperative), so a
slow Redis holds up only the session that asked, for at most `cluster.timeout` (the call runs
under a gevent.Timeout, and redis-py's socket and connect timeouts are the same), never the
master's loop, which answers every worker's anvil requests. The master talks to Redis only from
a thread of its own (`Monitor`, as the metrics endpoint runs in one): once a second it marks its
node alive, takes dead holders' connections off the shared counts, and reads what `poolmgr
status` and /metrics show (the cluster's state, the nodes seen, the top clients).

`RedisState` is a `clientstate.ClientState`. It keeps asking this host's own state (the
master's anvil) too, so that when Redis is down, slow or flushed every question is answered
locally at once (`cluster.on_failure = "local"`): nothing is refused that one host alone would
not refuse. A failed call puts the worker in local mode; it tries Redis again at most once a
second (on a call, or on its heartbeat), and on success it writes its live connections back
(a flush or an outage may have lost them) and uses Redis again. Calls, their latency, failures
and questions answered locally are counted on the scoreboard (`cluster_*`). The master's
monitor logs each change of state once: `warning: cluster: redis URL unavailable: REASON;
using local state`, then `cluster: redis URL back`.

With `sentinels`, every process asks the sentinels for the master's address whenever it opens
a connection to Redis (redis-py's `Sentinel.master_for`, its pool bounded as with `redis`), so
a failover is followed by itself: the calls to the dead master fail (local state meanwhile),
and the first try after the sentinels promote the replica reaches the new master, where each
worker writes its live connections back as after any outage. The monitor asks the sentinels
once a round too, and logs a new master once: `cluster: redis master NAME now at HOST:PORT
(was HOST:PORT)`. Logs and status name the sentinels as `redis+sentinel://HOST:PORT,.../NAME`.

Keys (all under `cluster.key_prefix`): `conns` (sorted set: client -> live connections over
every node), `holder:NODE:PID` (hash: client -> connections one SMTP worker holds), `holders`
(sorted set: holder key -> expiry, renewed every second by the worker), `nodes` (sorted set:
node -> last seen), `rate:c|m|r:IP` (fixed-window counters with the window as TTL, as anvil's),
`greet:IP` (a pass, for greet_ttl), `dnsbl:SITE:IP` (an answer, for its TTL) and `name:IP`
(the client's name and PTR name, `NAME REVERSE`, for the answers' TTL). A worker or
node that dies stops renewing its holder entry; after `cluster.heartbeat_ttl` the next
monitor round on any node takes its connections off `conns` (Lua, atomic), so no count leaks.
Time is Redis's own (`TIME` in the scripts): the nodes' clocks need not agree. The scripts name
keys they were not given, so `key_prefix` must keep every key in one hash slot on a Redis
Cluster (e.g. "{poolmgr}:").
"""

__all__ = ["RedisState", "Gate", "Monitor", "Keys", "connect", "enabled", "describe", "redacted",
           "RETRY_EVERY", "NODE_SEEN"]

import inspect
import re
import threading
import time
import urllib.parse
from collections import Counter
from contextlib import contextmanager, nullcontext

from .config import redacted
from .defence.clientstate import ClientState, Usage

RETRY_EVERY = 1.0   # seconds between tries while Redis is down
NODE_SEEN = 60.0    # a node is listed in status while it was seen this recently
TOP_CLIENTS = 10
_MAX_POOL = 32      # connections to Redis per process: sessions wait at most cluster.timeout

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
_TAKE_OFF = """
local function take_off(conns, holder)
  local held = redis.call('HGETALL', holder)
  for i = 1, #held, 2 do
    if tonumber(redis.call('ZINCRBY', conns, -tonumber(held[i + 1]), held[i])) <= 0 then
      redis.call('ZREM', conns, held[i])
    end
  end
  redis.call('DEL', holder)
end
"""
# KEYS conns, holder, holders, rate; ARGV ip, window ms, holder ttl ms
# -> {connections, rate, 1 when the holder entry was missing (new, flushed or reaped)}
CONNECT = _NOW + """
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
local missing = redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), KEYS[2])
local count = redis.call('ZINCRBY', KEYS[1], 1, ARGV[1])
local rate = redis.call('INCR', KEYS[4])
if redis.call('PTTL', KEYS[4]) < 0 then redis.call('PEXPIRE', KEYS[4], ARGV[2]) end
return {tonumber(count), rate, missing}
"""
# KEYS conns, holder; ARGV ip
DISCONNECT = """
local n = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if n <= 0 then return 0 end
if n == 1 then redis.call('HDEL', KEYS[2], ARGV[1])
else redis.call('HINCRBY', KEYS[2], ARGV[1], -1) end
if tonumber(redis.call('ZINCRBY', KEYS[1], -1, ARGV[1])) <= 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return 1
"""
# KEYS rate; ARGV window ms
RATE = """
local n = redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""
# KEYS holders, holder; ARGV ttl ms -> 1 when the entry was missing
RENEW = _NOW + """
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), KEYS[2])
"""
# KEYS conns, holder, holders; ARGV ttl ms, then ip, count pairs: what this worker holds now
RESYNC = _NOW + _TAKE_OFF + """
take_off(KEYS[1], KEYS[2])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('ZINCRBY', KEYS[1], ARGV[i + 1], ARGV[i])
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[1]), KEYS[2])
return 1
"""
# KEYS nodes, holders, conns; ARGV node, how long a node is remembered (ms)
# -> {holders taken off, now ms}
HEARTBEAT = _NOW + _TAKE_OFF + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, holder in ipairs(dead) do
  take_off(KEYS[3], holder)
  redis.call('ZREM', KEYS[2], holder)
end
return {#dead, now}
"""


def enabled(section) -> bool:
    """Whether `[cluster]` names a shared Redis (redis, or sentinels)."""
    return bool(section.redis or section.sentinels)


def _host_port(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(section) -> str:
    """The shared Redis as logs and status name it: its URL without the password, or
    `redis+sentinel://HOST:PORT,.../NAME`."""
    if section.sentinels:
        return (f"redis+sentinel://{','.join(_host_port(a) for a in section.sentinels)}/"
                f"{section.sentinel_master}")
    return redacted(section.redis)


def connect(section, queue_class=None):
    """A redis-py client for `[cluster]`: every call bounded by cluster.timeout, no retries
    (the caller falls back at once and tries again a second later). With sentinels, the
    client of the master they name, each new connection asking them where it is.
    `queue_class` holds the pool's idle connections (redis-py's default is the standard
    library's LifoQueue)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    bounded = dict(_socket_timeouts(section.redis, section.timeout),
                   retry=Retry(NoBackoff(), 0))
    if queue_class is not None:
        bounded["queue_class"] = queue_class
    if section.sentinels:
        from redis.sentinel import Sentinel

        # Each sentinel is asked in turn, each bounded as a Redis call is; one that answered
        # is asked first from then on (a hung one costs cluster.timeout until one does).
        asking = {k: v for k, v in bounded.items() if k != "queue_class"}
        if section.sentinel_password:
            asking["password"] = section.sentinel_password
        sentinels = Sentinel(list(section.sentinels), sentinel_kwargs=asking)
        return sentinels.master_for(
            section.sentinel_master, connection_pool_class=_blocking_sentinel_pool(),
            max_connections=_MAX_POOL, timeout=section.timeout, health_check_interval=0,
            password=section.password or None, **bounded)
    pool = redis.BlockingConnectionPool.from_url(
        section.redis, max_connections=_MAX_POOL, timeout=section.timeout,
        health_check_interval=0, **bounded)
    return redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))


def _blocking_sentinel_pool():
    """redis-py's pool for a Sentinel-managed master is unbounded (ConnectionPool); this one is
    its BlockingConnectionPool, as `connect` uses without sentinels: at most _MAX_POOL
    connections, a session waiting at most cluster.timeout for one."""
    from redis import BlockingConnectionPool
    from redis.sentinel import SentinelConnectionPool

    class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
        def disconnect(self, inuse_connections: bool = True) -> None:
            # The sentinel pool asks for its idle connections to be closed when the master
            # moves; before redis-py 5.1 (Debian 12 has 4.3) the blocking pool's disconnect
            # takes no argument and closes them all: those in use then fail once, and their
            # sessions fall back to the host's state for that call.
            if _takes_inuse(BlockingConnectionPool.disconnect):
                BlockingConnectionPool.disconnect(self, inuse_connections)
            else:
                BlockingConnectionPool.disconnect(self)

    return BlockingSentinelPool


def _takes_inuse(method) -> bool:
    return "inuse_connections" in inspect.signature(method).parameters


def master_address(client) -> str:
    """HOST:PORT of the master the sentinels name now (they are asked), "" without sentinels;
    raises a redis error when none is named. A new master closes the pool's idle
    connections to the old one."""
    pool = client.connection_pool
    if not hasattr(pool, "get_master_address"):
        return ""
    return _host_port(pool.get_master_address())


# How redis-py's MasterNotFoundError names each sentinel's failure, after that sentinel's
# client (a repr of up to several hundred characters): " - network:ConnectionError: Error 111
# ..." (redis-py 8), " - ConnectionError('Error 111 ...')" (redis-py 5).
_SENTINEL_FAILURE = re.compile(r" - (?:\w+:)?(\w+Error)(?:\(([\x22\x27])(.*?)\2\)|: (.*?))?"
                               r"(?=, <redis\.|, Redis<|$)")


def reason(exc: Exception) -> str:
    """Why a call failed, for one log line: without the sentinel clients' reprs."""
    text = str(exc) or type(exc).__name__
    head, _, rest = text.partition(" : ")
    if not rest or not head.startswith("No master found"):
        return text
    failures = [quoted or why or kind
                for kind, _, quoted, why in _SENTINEL_FAILURE.findall(" : " + rest)]
    return f"{head}: {'; '.join(failures)}" if failures else head


def _socket_timeouts(url: str, timeout: float) -> dict[str, float]:
    """redis-py's socket timeouts, both `timeout`. Debian 12's redis-py (4.3) refuses
    socket_connect_timeout for a unix:// URL, where socket_timeout bounds the connect too;
    later ones take it, and default it to 5s, not to socket_timeout."""
    import redis

    timeouts = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if urllib.parse.urlsplit(url).scheme == "unix":
        taken = inspect.signature(redis.UnixDomainSocketConnection.__init__).parameters.values()
        if not any(p.name == "socket_connect_timeout" or p.kind is p.VAR_KEYWORD for p in taken):
            del timeouts["socket_connect_timeout"]
    return timeouts


class Keys:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.conns, self.holders, self.nodes = (prefix + "conns", prefix + "holders",
                                                prefix + "nodes")

    def holder(self, node: str, owner: str) -> str:
        return f"{self.prefix}holder:{node}:{owner}"

    def rate(self, kind: str, ip: str) -> str:
        return f"{self.prefix}rate:{kind}:{ip}"

    def greet(self, ip: str) -> str:
        return f"{self.prefix}greet:{ip}"

    def dnsbl(self, site: str, ip: str) -> str:
        return f"{self.prefix}dnsbl:{site}:{ip}"

    def name(self, ip: str) -> str:
        return f"{self.prefix}name:{ip}"


def _errors():
    import redis

    return (redis.RedisError, OSError)


_UNGATED = nullcontext()


class Gate:
    """Orders one worker's calls that change its connection counts in Redis (CONNECT and
    DISCONNECT) against the resync that rewrites them from what the worker holds: a resync
    waits until the calls in flight have ended and holds new ones back until it has run. A
    call that Redis ran after the resync was counted twice (a disconnect: one too few), one
    that it ran before, on another connection, but that the worker's count did not have yet
    was wiped (one too few again, and the cluster-wide limit let a connection through)."""

    COUNTED = frozenset({"connect", "disconnect"})

    def __init__(self):
        from gevent.event import Event

        self.running = 0
        self.idle, self.open = Event(), Event()
        self.idle.set()
        self.open.set()

    def enter(self, name: str):
        """The context a call named `name` runs in: the gate's for counted calls and the
        resync, nothing for the others (every rate check and renewal of a session)."""
        if name not in self.COUNTED and name != "resync":
            return _UNGATED
        return self._entered(name)

    @contextmanager
    def _entered(self, name: str):
        while not self.open.is_set():  # a resync is on (checked again: no switch after it)
            self.open.wait()
        if name == "resync":
            self.open.clear()
            try:
                self.idle.wait()
                yield
            finally:
                self.open.set()
            return
        self.running += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.running -= 1
            if not self.running:
                self.idle.set()


class RedisState(ClientState):
    """An SMTP worker's client state in Redis, with this host's state (`local`) beside it;
    see the module's docstring. `bounded()` gives the context that cuts a call at
    cluster.timeout (a gevent.Timeout in the SMTP worker)."""

    def __init__(self, cfg, local: ClientState, slot, owner: str, bounded):
        c = cfg.cluster
        self.local, self.slot, self.bounded = local, slot, bounded
        # A gevent queue for the pool, not the standard library's, whose lock and Condition
        # are not made for an exception thrown into a waiting greenlet: with calls cut by
        # `bounded` during a failover, its lock came out unbalanced, and the next use of the
        # pool raised "Semaphore released too many times" in a session's close.
        from gevent.queue import LifoQueue

        self.redis = connect(c, LifoQueue)
        self.keys = Keys(c.key_prefix)
        self.holder = self.keys.holder(c.node, owner)
        self.window_ms = int(cfg.defence.anvil_rate_time_unit * 1000)
        self.ttl_ms = int(c.heartbeat_ttl * 1000)
        self.scripts = {name: self.redis.register_script(text) for name, text in (
            ("connect", CONNECT), ("disconnect", DISCONNECT), ("rate", RATE),
            ("renew", RENEW), ("resync", RESYNC))}
        self.held: Counter = Counter()  # this worker's live connections, by client
        self.gate = Gate()
        self.retry_at = 0.0  # while set: local mode, the next try not before then

    def _call(self, name: str, *args, keys=(), argv=(), held=None):
        """One Redis call (a script by name, or a client method); None when it failed or
        Redis is being left alone until the next try. `held` (a connect's or disconnect's
        change to what the worker holds) runs once, whatever happens: when the gate lets the
        call in, so that a resync's snapshot has it exactly when Redis will, or when the
        call is not made."""
        now = time.monotonic()
        if self.retry_at:
            if now < self.retry_at:
                if held is not None:
                    held()
                self.slot.add("cluster_local")
                return None
            self.retry_at = now + RETRY_EVERY  # this call is the try; the others stay local
        try:
            with self.bounded(), self.gate.enter(name):
                if held is not None:
                    held, change = None, held
                    change()
                if callable(argv):  # what it writes is read once the gate lets it in
                    argv = argv()
                if name in self.scripts:
                    result = self.scripts[name](keys=keys, args=argv)
                else:
                    result = getattr(self.redis, name)(*args)
        except Exception:  # redis-py's errors, the sockets', and any other of the library's
            if held is not None:
                held()
            self.slot.add("cluster_failures")
            self.slot.add("cluster_local")
            self.retry_at = time.monotonic() + RETRY_EVERY
            return None
        took = time.monotonic() - now
        self.slot.add("cluster_calls")
        self.slot.add("cluster_us", int(took * 1e6))
        self.slot.observe("cluster", took)
        if self.retry_at:  # back: what this worker holds may have been lost meanwhile
            self.retry_at = 0.0
            self.resync()
        return result

    def resync(self) -> None:
        """Write this worker's live connections back into Redis."""
        self._call("resync", keys=(self.keys.conns, self.holder, self.keys.holders),
                   argv=lambda: (self.ttl_ms, *(str(v) for ip, n in self.held.items()
                                                for v in (ip, n))))

    def beat(self) -> None:
        """Every second: renew this worker's holder entry; the try while Redis is down."""
        missing = self._call("renew", keys=(self.keys.holders, self.holder),
                             argv=(self.ttl_ms,))
        if missing and self.held:
            self.resync()

    # -- ClientState
    def connect(self, ip: str) -> Usage | None:
        local = self.local.connect(ip)
        # Every live connection is held, so that a resync writes them all back (this one
        # from before its CONNECT runs: a resync that the call's success sets off has it).
        shared = self._call("connect", keys=(self.keys.conns, self.holder, self.keys.holders,
                                             self.keys.rate("c", ip)),
                            argv=(ip, self.window_ms, self.ttl_ms),
                            held=lambda: self.held.update((ip,)))
        if shared is None and local is None:  # not counted anywhere: no disconnect will come
            self._release(ip)
            return None
        lost = shared is not None and int(shared[2]) and sum(self.held.values()) > 1
        if lost:  # flushed, or reaped while this worker stood still
            self.resync()
        return local if shared is None else Usage(int(shared[0]), int(shared[1]))

    def disconnect(self, ip: str) -> None:
        self.local.disconnect(ip)
        if self.held[ip] <= 0:
            self.held.pop(ip, None)
            return
        self._call("disconnect", keys=(self.keys.conns, self.holder), argv=(ip,),
                   held=lambda: self._release(ip))

    def _release(self, ip: str) -> None:
        if self.held[ip] > 1:
            self.held[ip] -= 1
        else:
            self.held.pop(ip, None)

    def _rate(self, kind: str, ip: str, local: int | None) -> int | None:
        shared = self._call("rate", keys=(self.keys.rate(kind, ip),), argv=(self.window_ms,))
        return local if shared is None else int(shared)

    def message(self, ip: str) -> int | None:
        return self._rate("m", ip, self.local.message(ip))

    def recipient(self, ip: str) -> int | None:
        return self._rate("r", ip, self.local.recipient(ip))

    def greet_passed(self, ip: str) -> bool:
        shared = self._call("exists", self.keys.greet(ip))
        return self.local.greet_passed(ip) if shared is None else bool(shared)

    def pass_greet(self, ip: str, ttl: float) -> None:
        self.local.pass_greet(ip, ttl)
        self._call("set", self.keys.greet(ip), "1", None, int(ttl * 1000))

    def dnsbl_cached(self, ip: str, domains: list[str]) -> dict[str, bool]:
        shared = self._call("mget", [self.keys.dnsbl(d, ip) for d in domains])
        if shared is None:
            return self.local.dnsbl_cached(ip, domains)
        return {d: v == b"1" for d, v in zip(domains, shared) if v is not None}

    def cache_dnsbl(self, ip: str, domain: str, listed: bool, ttl: float) -> None:
        self.local.cache_dnsbl(ip, domain, listed, ttl)
        self._call("set", self.keys.dnsbl(domain, ip), "1" if listed else "0", None,
                   max(1, int(ttl * 1000)))

    def name_cached(self, ip: str) -> tuple[str, str] | None:
        shared = self._call("get", self.keys.name(ip))
        if shared is None:
            return self.local.name_cached(ip)
        name, _, reverse = shared.decode("ascii", "replace").partition(" ")
        return (name, reverse) if name and reverse else None

    def cache_name(self, ip: str, name: str, reverse: str, ttl: float) -> None:
        self.local.cache_name(ip, name, reverse, ttl)
        self._call("set", self.keys.name(ip), f"{name} {reverse}", None, max(1, int(ttl * 1000)))


class Monitor:
    """The master's view of the cluster, kept by a thread of its own (the master's loop never
    waits for Redis): `view()` is what `poolmgr status` shows."""

    def __init__(self, section, log):
        self.section = section
        self.log = log
        self.url = describe(section)
        self.master = ""  # HOST:PORT of the master the sentinels named last
        self.keys = Keys(section.key_prefix)
        self.stopping = threading.Event()
        self.state, self.since, self.error = "starting", time.time(), ""
        self.nodes: list[str] = []
        self.top: dict[str, int] = {}
        self.latency = 0.0
        self.reaped = 0
        # redis is imported here, in the master's main thread: a thread that imports while
        # the master forks could leave a worker a half-imported module.
        self.client = connect(section)
        self.heartbeat = self.client.register_script(HEARTBEAT)
        self.errors = _errors()
        self.thread = threading.Thread(target=self.run, name="cluster", daemon=True)

    def start(self) -> "Monitor":
        self.log.info("cluster: node %s, redis %s, key prefix %s", self.section.node, self.url,
                      self.section.key_prefix)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2 * self.section.timeout + 1)

    def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.poll()
                self.change("shared", "")
            except self.errors as exc:
                self.change("degraded", reason(exc))
            self.latency = round(time.monotonic() - started, 6)
            if self.stopping.wait(max(0.0, RETRY_EVERY - (time.monotonic() - started))):
                return

    def poll(self) -> None:
        self.follow(master_address(self.client))
        keys = self.keys
        pipe = self.client.pipeline(transaction=False)
        self.heartbeat(keys=(keys.nodes, keys.holders, keys.conns),
                  args=(self.section.node, int(NODE_SEEN * 1000)), client=pipe)
        pipe.zrange(keys.nodes, 0, -1)
        pipe.zrevrange(keys.conns, 0, TOP_CLIENTS - 1, withscores=True)
        (reaped, _), nodes, top = pipe.execute()
        self.reaped += int(reaped)
        self.nodes = sorted(n.decode(errors="replace") for n in nodes)
        self.top = {ip.decode(errors="replace"): int(n) for ip, n in top}

    def follow(self, master: str) -> None:
        """Log the master the sentinels name when it changes (a failover), once."""
        if master == self.master or not master:
            return
        if self.master:
            self.log.info("cluster: redis master %s now at %s (was %s)",
                          self.section.sentinel_master, master, self.master)
        else:
            self.log.info("cluster: redis master %s at %s", self.section.sentinel_master,
                          master)
        self.master = master

    def change(self, state: str, error: str) -> None:
        """Log a change of state once (the log style of the master's other lines)."""
        if state == self.state:
            return
        was, self.state, self.since, self.error = self.state, state, time.time(), error
        if state == "degraded":
            self.log.warning("cluster: redis %s unavailable: %s; using local state", self.url,
                             error)
            self.nodes, self.top = [], {}
        elif was == "degraded":
            self.log.info("cluster: redis %s back", self.url)
        else:
            self.log.info("cluster: redis %s shared", self.url)

    def view(self) -> dict:
        return {"state": self.state, "redis": self.url, "master": self.master,
                "node": self.section.node,
                "since": round(self.since, 1), "error": self.error, "nodes": list(self.nodes),
                "top_clients": dict(self.top), "latency": self.latency,
                "reaped": self.reaped}
