"""A scanner worker process: one connection, one message at a time (amavisd-style prefork).

Plain blocking sockets, no gevent. All scanner workers wait on the inherited listening socket;
whoever wins `accept` serves that connection to its end. The heartbeat is kept from the accept
loop and, while a session waits for its client, from the connection's `tick`. After
`scanner.max_requests` messages the worker finishes its connection and exits, and the master
starts a fresh one. SIGTERM: accept nothing more, finish the connection in hand (a client idle
for DRAIN_IDLE_GRACE seconds with no transaction gets 421), exit.
SIGQUIT: exit at once. The connection to the next hop is kept between messages (`relay.Cache`,
timeouts.connection_cache_time_limit) and expired from the accept loop and from `tick`.

Exports: main.
"""

import os
import select
import signal
import time

from .. import delivery, log, relay
from ..process import DRAIN_IDLE_GRACE, WorkerContext, limits_for, replay_early_stop, set_title
from ..smtp.protocol import Drain
from .session import ScannerSession

# Room for the Received: header the SMTP worker adds to a message at the size limit.
SIZE_SLACK = 64 * 1024


class ScannerService:
    def __init__(self, ctx: WorkerContext):
        self.cfg = ctx.cfg
        self.slot = ctx.slot
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

    def tick(self) -> None:
        """Called about once a second while a session waits for its client."""
        self.slot.beat()
        self.relay_cache.expire()
        if self.draining and self.current is not None and \
                self.current.drainable(time.monotonic(), DRAIN_IDLE_GRACE):
            raise Drain()


def main(ctx: WorkerContext) -> int:
    log.set_name("poolmgr/scanner")
    service = ScannerService(ctx)
    hop = ctx.cfg.scanner.next_hop
    if hop.kind == "maildir":
        delivery.prepare(hop.path)

    def stop(signum, frame):
        service.draining = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGQUIT, lambda s, f: os._exit(0))
    signal.signal(signal.SIGUSR1, lambda s, f: log.reopen())
    replay_early_stop()
    listener = ctx.sock
    listener.setblocking(False)
    max_requests = ctx.cfg.scanner.max_requests
    title = None
    while not service.draining and service.messages < max_requests:
        ctx.slot.beat()
        service.relay_cache.expire()
        new_title = f"poolmgr: scanner worker {ctx.number} [{service.messages} messages]"
        if new_title != title:
            set_title(new_title)
            title = new_title
        try:
            ready, _, _ = select.select([listener], [], [], 1.0)
        except InterruptedError:
            continue
        if not ready or service.draining:
            continue
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            continue  # another worker took it
        sock.setblocking(True)
        ctx.slot.add("connections")
        service.current = ScannerSession(service, sock, peer)
        set_title(f"poolmgr: scanner worker {ctx.number} [busy]")
        title = None
        service.current.run()
        service.current = None
    service.relay_cache.close()
    if service.messages >= max_requests:
        service.log.info("scanner worker %d: recycling after %d messages (scanner.max_requests)",
                         ctx.number, service.messages)
    return 0
