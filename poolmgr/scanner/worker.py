"""A scanner worker process: one connection, one message at a time (amavisd-style prefork).

Plain blocking sockets, no gevent. All scanner workers wait on the inherited listening socket;
whoever wins `accept` serves that connection to its end. The heartbeat is kept from the accept
loop and, in a session, from the connection's `tick` while it waits for its client and after
each command. The accept loop also wakes when the log can take the lines that wait (log.py).
After `scanner.max_requests` messages the worker finishes its connection and
exits, and the master starts a fresh one. SIGTERM: accept nothing more, finish the connection
in hand (a client idle for DRAIN_IDLE_GRACE seconds with no transaction gets 421), exit.
SIGQUIT: exit at once. The connection to the next hop is kept between messages (`relay.Cache`,
timeouts.connection_cache_time_limit) and expired from the accept loop and from `beat`.
A client that keeps its connection open between messages (an SMTP worker's hand-off cache)
is answered 421 and let go as soon as another connection waits in the accept queue, so a
cached connection never starves a waiting hand-off (`handoff.let_go`, asked at the end of
each message and every `handoff.IDLE_CHECK` seconds while the connection idles).
"""

__all__ = ["ScannerWorker", "main"]

import os
import select
import time

from .. import handoff, log, maildir
from ..smtp import relay
from ..worker import DRAIN_IDLE_GRACE, WorkerProcess, limits_for
from ..smtp.protocol import Drain
from .scan import Scanner
from .session import ScannerSession

ACCEPT_BACKOFF = 0.5  # seconds between accept attempts after a failure (out of files, ...)
# Room for the Received: header the SMTP worker adds to a message at the size limit.
SIZE_SLACK = 64 * 1024


class ScannerService:
    def __init__(self, worker: "ScannerWorker"):
        ctx = worker.ctx
        self.cfg = ctx.cfg
        self.slot = ctx.slot
        self.worker = worker
        self.hostname = ctx.cfg.scanner.hostname
        self.limits = limits_for(ctx.cfg, SIZE_SLACK)
        self.tls_context = None
        self.log = log.get("scanner")
        self.draining = False
        self.messages = 0
        self.current: ScannerSession | None = None
        timeouts = ctx.cfg.timeouts
        self.relay_cache = relay.Cache(timeouts.connection_cache_time_limit,
                                       timeouts.connection_reuse_time_limit)
        self.scanner = Scanner(ctx.cfg, ctx.slot, self.log)
        self.listeners = ctx.socks
        self.ticked = 0.0

    def beat(self, now: float) -> None:
        """About once a second, from `tick` and after each command (a client that never pauses
        never makes the session wait): the heartbeat, and idle next-hop connections closed."""
        if now - self.ticked >= 1.0:
            self.ticked = now
            self.worker.notify()
            self.relay_cache.expire()

    def tick(self) -> None:
        """Called every `handoff.IDLE_CHECK` seconds while a session waits for its client."""
        now = time.monotonic()
        self.beat(now)
        session = self.current
        if session is None:
            return
        if self.draining and session.drainable(now, DRAIN_IDLE_GRACE):
            raise Drain()
        # Waiting for its next command with no transaction open, the session may be cut here.
        if session.drainable(now, 0.0):
            reply = session.let_go()
            if reply is not None:
                raise Drain(reply)

    def someone_waiting(self) -> bool:
        """A connection waits in one of the accept queues."""
        try:
            return bool(select.select(self.listeners, [], [], 0)[0])
        except (OSError, ValueError):
            return False


class ScannerWorker(WorkerProcess):
    kind = "scanner worker"

    def init_process(self) -> None:
        log.set_name("poolmgr/scanner")
        self.log = log.get("scanner")
        self.service = ScannerService(self)
        hop = self.cfg.scanner.next_hop
        if hop.kind == "maildir":
            maildir.prepare(hop.path)
        # A signal handler cannot cut the accept loop's select short (Python retries it): TERM
        # writes to this pipe, so a stop never waits out the select's second.
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def handle_term(self) -> None:
        self.service.draining = True
        try:
            os.write(self.wake_write, b"T")
        except OSError:
            pass  # full: the loop is woken already

    def serve(self) -> int:
        ctx, service = self.ctx, self.service
        listeners = ctx.socks
        for listener in listeners:
            listener.setblocking(False)
        max_requests = self.cfg.scanner.max_requests
        log_stuck = False
        while not service.draining and service.messages < max_requests:
            self.notify()
            service.relay_cache.expire()
            self.show(f"{service.messages} messages")
            # Log lines that wait (log.py): the loop wakes when the log can take them, unless
            # the last time it woke for them none went (then the heartbeat's flush tries).
            log_fd = log.waiting()
            log_fds = [log_fd] if log_fd is not None and log_fd >= 0 and not log_stuck else []
            try:
                ready, writable, _ = select.select([*listeners, self.wake_read], log_fds, [],
                                                   1.0)
            except InterruptedError:
                continue
            except (OSError, ValueError):  # the log's descriptor went meanwhile (a reopen)
                log_stuck = True
                continue
            log_stuck = False
            if writable:
                before = log.pending()
                log_stuck = log.flush() >= before
            ready = [sock for sock in ready if sock is not self.wake_read]
            if not ready or service.draining:
                continue
            try:
                sock, peer = ready[0].accept()
            except (BlockingIOError, InterruptedError):
                continue  # another worker took it
            except OSError as exc:  # EMFILE, ENFILE, ECONNABORTED, ENOBUFS: not fatal
                self.log.warning("scanner worker %d: accept failed: %s -- retrying in %gs",
                                 ctx.number, exc.strerror or exc, ACCEPT_BACKOFF)
                time.sleep(ACCEPT_BACKOFF)
                continue
            sock.setblocking(True)
            ctx.slot.add("connections")
            service.current = ScannerSession(service, sock, peer)
            service.current.conn.tick_every = handoff.IDLE_CHECK
            self.show("busy")
            service.current.run()
            service.current = None
        service.relay_cache.close()
        if service.messages >= max_requests:
            self.log.info("scanner worker %d: recycling after %d messages "
                          "(scanner.max_requests)", ctx.number, service.messages)
        return 0


main = ScannerWorker.main
