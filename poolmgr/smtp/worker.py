"""An SMTP worker process: one gevent hub, thousands of SMTP sessions.

gevent is imported and monkey-patched here, after the fork, and nowhere in the master. Each
listening socket the master bound (one per `smtp.listen` address) is re-wrapped as a gevent
socket (otherwise accept() would block the whole worker) and gets a `StreamServer`; all of
them spawn into one pool of `smtp.max_sessions_per_worker` greenlets, and when the pool is
full the worker stops accepting on every socket and the kernel's listen queues feed the other
workers.

Its sessions ask the client state (`defence.clientstate`) of the master's anvil through one
socket, or, with `[cluster] redis`, of Redis directly (`cluster.RedisState`, cooperative under
gevent, each call cut at `cluster.timeout`), with the master's as the fallback.

Signals: SIGTERM drains (stop accepting; a session idle with no transaction for
DRAIN_IDLE_GRACE seconds gets 421 and is closed; transactions finish; after
`master.graceful_timeout` the rest get 421) and exits 0; SIGQUIT exits at once; SIGUSR1 reopens
the log file.

Exports: SmtpWorker, main.
"""

import os
import time

from .. import log
from ..worker import DRAIN_IDLE_GRACE, WorkerProcess

# A session that has sent no command this long after the banner counts as nuisance for the
# autoscaler while it lives (bots that connect and never speak).
SILENT_NUISANCE = 5.0


def _tls_context(cfg, logger):
    if not cfg.smtp.tls_cert:
        return None
    import ssl  # the gevent-patched module: imported after monkey-patching

    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cfg.smtp.tls_cert, cfg.smtp.tls_key)
    except (OSError, ValueError) as exc:
        logger.warning("cannot load TLS certificate %s or key %s: %s -- STARTTLS disabled",
                       cfg.smtp.tls_cert, cfg.smtp.tls_key, exc)
        return None
    return context


class SmtpWorker(WorkerProcess):
    kind = "smtp worker"

    def init_process(self) -> None:
        import warnings

        from gevent import monkey

        # With [cluster] redis the master has imported redis, whose asyncio half keeps its own
        # reference to ssl's classes; this worker never uses it. Any other module still warns.
        warnings.filterwarnings("ignore", r"Monkey-patching ssl after ssl .*\(NOT patched\): "
                                r"\['redis\.asyncio\.connection [^,\]]*\]\. *$",
                                monkey.MonkeyPatchWarning)
        monkey.patch_all()
        import socket

        import gevent
        import gevent.event
        import gevent.pool
        import gevent.server

        from ..defence.policy import Defence
        from .front import FrontService, FrontSession
        from .protocol import Drain

        self.gevent, self.session_class, self.drain_exc = gevent, FrontSession, Drain

        log.set_name("poolmgr/smtpd")
        ctx, cfg = self.ctx, self.cfg
        self.log = log.get("smtpd")
        state = self.cluster = None
        if ctx.anvil is not None:
            from ..defence.anvil import ANVIL_TIMEOUT, AnvilClient

            state = AnvilClient(socket.socket(fileno=ctx.anvil.detach()), ANVIL_TIMEOUT,
                                self.log)
            if cfg.cluster.redis:  # the cluster's state, with the host's as its fallback
                from ..cluster import RedisState

                timeout = cfg.cluster.timeout
                state = self.cluster = RedisState(
                    cfg, state, ctx.slot, str(os.getpid()),
                    lambda: gevent.Timeout(timeout, TimeoutError("cluster.timeout")))
        self.service = FrontService(ctx, _tls_context(cfg, self.log),
                                    Defence(cfg, gevent.spawn, state), state)
        self.sessions = gevent.pool.Pool(cfg.smtp.max_sessions_per_worker)
        self.stopped = gevent.event.Event()
        self.servers = [gevent.server.StreamServer(socket.socket(fileno=sock.detach()),
                                                   self.handle, spawn=self.sessions)
                        for sock in ctx.socks]

    def on_signal(self, signum: int, handler) -> None:
        self.gevent.signal_handler(signum, handler)

    def handle(self, sock, peer) -> None:
        session = self.session_class(self.service, sock, peer)
        session.greenlet = self.gevent.getcurrent()
        self.service.sessions.add(session)
        try:
            session.run()
        finally:
            self.service.sessions.discard(session)

    def close_sessions(self, idle_only: bool) -> None:
        now = time.monotonic()
        for session in list(self.service.sessions):
            if session.greenlet is not None and (
                    not idle_only or session.drainable(now, DRAIN_IDLE_GRACE)):
                session.greenlet.kill(self.drain_exc, block=False)

    def handle_term(self) -> None:
        self.gevent.spawn(self.drain)

    def drain(self) -> None:
        """Stop accepting; close sessions as they fall idle; after the grace, close all."""
        if self.service.draining:
            return
        self.service.draining = True
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + self.cfg.master.graceful_timeout
        while len(self.sessions) and time.monotonic() < deadline:
            self.close_sessions(idle_only=True)
            self.sessions.join(timeout=0.5)
        self.close_sessions(idle_only=False)
        self.sessions.join(timeout=10)
        self.stopped.set()

    def heartbeat(self) -> None:
        silent = self.cfg.defence.greet_wait + SILENT_NUISANCE
        slot = self.ctx.slot
        while True:
            self.notify()
            slot.set_sessions(len(self.sessions))
            silent_since = time.monotonic() - silent
            suspect = transacting = 0
            for session in self.service.sessions:
                suspect += session.looks_like_nuisance(silent_since)
                transacting += session.env is not None
            slot.set_states(suspect, transacting)
            self.show(f"{len(self.sessions)} sessions"
                      + (" draining" if self.service.draining else ""))
            self.service.relay_cache.expire()
            if self.cluster is not None:
                self.cluster.beat()
            self.gevent.sleep(1.0)

    def serve(self) -> int:
        for server in self.servers:
            server.start()
        beat = self.gevent.spawn(self.heartbeat)
        self.stopped.wait()
        beat.kill()
        self.service.relay_cache.close()
        return 0


main = SmtpWorker.main
