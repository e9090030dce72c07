"""The hand-off: a message going from the SMTP pool to the scanner pool, in one place.

At end of DATA an SMTP worker hands the message to the proxy filter (the scanner pool, or
`smtp.proxy_filter`) and passes its reply to the client. This module owns the rules of that
hand-off, on both sides:

- the share (`share`): how many hand-offs one SMTP worker may have at once. A pure function of
  the SMTP workers' hand-off counts; the master calls it once a second and publishes the result
  on the board, where each SMTP worker reads it into its gate;
- the gate (`HandoffGate`): an SMTP worker's hand-offs take turns within that share, so that
  they reuse the connections kept open between messages;
- the kept connections: the proxy filter's address (`proxy_filter`) and the connection cache
  with its idle bound (`kept_connections`, HANDOFF_IDLE);
- when a scanner worker lets a kept connection go (`let_go`), asked at the end of each message
  and while the connection idles (every IDLE_CHECK seconds);
- the XFORWARD attributes each side sends its next hop (`xforward`).

No gevent here: the master imports this module. The SMTP worker gives the gate its event
factory and its pause (gevent's).
"""

import collections
import time
from typing import Callable, Mapping

from .config import Config, NextHop
from .smtp import relay
from .smtp.parse import mailhost_address
from .smtp import replies as R

__all__ = ["HANDOFF_IDLE", "IDLE_CHECK", "HandoffGate", "share", "proxy_filter",
           "kept_connections", "let_go", "xforward"]

HANDOFF_IDLE = 2  # idle hand-off connections one SMTP worker keeps
IDLE_CHECK = 0.05  # seconds: how often an idle scanner session looks for a waiting hand-off
UNAVAILABLE = "[UNAVAILABLE]"  # XFORWARD_README: an attribute whose value is not known


# -- the share (master side)
def share(counts: Mapping[int, int], seen: Mapping[int, int], scanners: int) -> int:
    """Hand-offs one SMTP worker may have at once: the scanner workers shared among the SMTP
    workers that handed off since the last call (among all of them when none did), rounded
    up, at least 1. With no more hand-off connections than scanner workers, none waits in the
    scanner pool's accept queue, so none makes a scanner worker let a kept connection go, and
    SMTP workers reuse their connections instead of opening one per message.

    `counts`: each running SMTP worker's hand-offs so far (board counter `handoffs`), by pid;
    `seen`: the same at the last call (a worker not in it, just started, is not counted as
    active); `scanners`: running scanner workers."""
    active = sum(1 for pid, n in counts.items() if n != seen.get(pid, n))
    return max(1, -(-scanners // max(1, active or len(counts))))


# -- the gate and the kept connections (SMTP worker side)
class HandoffGate:
    """At most `limit` hand-offs at once in this worker, the others wait their turn and then
    take the connection the last one left in the cache (the master sets the limit: the
    worker's share of the scanner pool). `event` makes what a waiting hand-off waits on, with
    `wait(timeout)` and `set()` (the SMTP worker's `runners.Turn`, or a gevent Event); `pause`
    (gevent.sleep) lets the hand-off whose turn came go first when one ends, so the scanner
    worker gets its next message before the ending one writes its log line and its reply."""

    def __init__(self, event: Callable, pause: Callable[[], None] | None = None):
        self.event = event
        self.pause = pause
        self.limit = 0  # 0: no limit
        self.busy = 0
        self.waiting: collections.deque = collections.deque()

    def enter(self, timeout: float) -> bool:
        """Wait for a turn, at most `timeout` seconds; False when none came."""
        end = time.monotonic() + timeout
        while self.limit and self.busy >= self.limit:
            turn = self.event()
            self.waiting.append(turn)
            try:
                if not turn.wait(max(0.0, end - time.monotonic())):
                    return False
            finally:
                if turn in self.waiting:  # timed out, or the session was closed meanwhile
                    self.waiting.remove(turn)
        self.busy += 1
        return True

    def leave(self) -> None:
        self.busy -= 1
        if self.wake() and self.pause is not None:
            self.pause()

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self.wake()

    def wake(self) -> int:
        """Give the free turns to the hand-offs waiting longest; how many were given."""
        free = len(self.waiting) if not self.limit else self.limit - self.busy
        woken = 0
        while woken < free and self.waiting:
            self.waiting.popleft().set()
            woken += 1
        return woken


def proxy_filter(cfg: Config) -> NextHop:
    """Where SMTP workers hand off: `smtp.proxy_filter`, else the scanner pool's own listener
    (a wildcard address reached on loopback)."""
    host, port = cfg.scanner.listen
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1" if host != "::" else "::1"
    return cfg.smtp.proxy_filter or NextHop("smtp", host, port)


def kept_connections(cfg: Config) -> relay.Cache:
    """One SMTP worker's hand-off connections, kept open between messages (Postfix's
    connection cache for its filter transport): a few at most are kept idle, and a scanner
    worker holding an idle one lets it go as soon as another hand-off waits (`let_go`)."""
    timeouts = cfg.timeouts
    return relay.Cache(timeouts.connection_cache_time_limit,
                       timeouts.connection_reuse_time_limit, max_idle=HANDOFF_IDLE)


# -- when a kept connection goes (scanner worker side)
def let_go(*, carried: bool, in_transaction: bool, worker_done: bool,
           someone_waiting: Callable[[], bool], host: str) -> R.Reply | None:
    """The 421 with which a scanner worker lets its client's connection go now, or None to
    keep serving it. Only a connection kept between messages goes: one that has carried a
    message (`carried`) and has no transaction open; a client that has just connected is
    served its first message first. It goes when this worker is done (`worker_done`:
    scanner.max_requests, the worker exits after it) or when another connection waits for a
    scanner worker (`someone_waiting`, asked only then: every other scanner worker is busy, and
    the kept connection must not starve that hand-off; amavisd's children, too, serve whoever
    comes next).

    The scanner worker asks at two moments, the same rule each time: at the end of each
    message (`ScannerSession.after_command`: a waiting hand-off gets the worker at once, before
    the client takes the connection again), and every IDLE_CHECK seconds while the session
    waits for its next command (`ScannerService.tick`: a hand-off that came later). Never in
    the middle of a command or of a pipelined group: the end of a message is its last reply,
    and the idle session has nothing to read."""
    if not carried or in_transaction:
        return None
    if worker_done:
        return R.R421_SHUTDOWN.format(host=host)
    if someone_waiting():
        return R.R421_YIELD.format(host=host)
    return None


# -- XFORWARD (both sides)
def xforward(*, ident: str, addr: str, proto: str, helo: str | None, port: int | None = None,
             name: str = "", told: Mapping[str, str] | None = None) -> dict[str, str]:
    """The XFORWARD attributes (Postfix's XFORWARD_README) a hop sends its next hop with a
    message, in this order: NAME ADDR [PORT] PROTO HELO IDENT SOURCE. `relay.send` sends those
    the server offers, an empty value as [UNAVAILABLE].

    The SMTP worker names its own client: `addr`, `port`, `proto` and `helo` of the session,
    NAME the client's name as it looked it up (`unknown` when it has none, as Postfix sends
    it; [UNAVAILABLE] when no lookup was made: defence.reverse_lookup off), SOURCE REMOTE.
    The scanner re-injecting passes on what its client `told` it (NAME ADDR PROTO HELO
    SOURCE), its own peer for what it was not told, and no PORT. ADDR goes as Postfix's
    smtpd requires it: `IPv6:` before an IPv6 address (`smtp.parse.mailhost_address`).
    IDENT is always the queue id this hop logs the message under (the one it was told, when
    it was)."""
    told = told or {}
    fields = {"NAME": told.get("NAME", name or UNAVAILABLE),
              "ADDR": mailhost_address(told.get("ADDR", addr))}
    if port is not None:
        fields["PORT"] = str(port)
    fields["PROTO"] = told.get("PROTO", proto)
    fields["HELO"] = told.get("HELO", helo or "")
    fields["IDENT"] = ident
    fields["SOURCE"] = told.get("SOURCE", "REMOTE")
    return fields
