"""An SMTP worker process: one gevent hub, thousands of SMTP sessions.

gevent is imported and monkey-patched here, after the fork, and nowhere in the master. The
listening socket the master bound is re-wrapped as a gevent socket (otherwise accept() would
block the whole worker). A `StreamServer` with a pool of `smtp.max_sessions_per_worker`
greenlets accepts; when the pool is full the worker stops accepting and the kernel's listen
queue feeds the other workers.

Signals: SIGTERM drains (stop accepting; a session idle with no transaction for
DRAIN_IDLE_GRACE seconds gets 421 and is closed; transactions finish; after
`master.graceful_timeout` the rest get 421) and exits 0; SIGQUIT exits at once; SIGUSR1 reopens
the log file.

Exports: main.
"""

import os
import signal
import time

from .. import log
from ..process import DRAIN_IDLE_GRACE, WorkerContext, replay_early_stop, set_title

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


def main(ctx: WorkerContext) -> int:
    from gevent import monkey

    monkey.patch_all()
    import socket

    import gevent
    import gevent.event
    import gevent.pool
    import gevent.server

    from ..defence.policy import Defence
    from .front import FrontService, FrontSession
    from .protocol import Drain

    log.set_name("poolmgr/smtpd")
    cfg = ctx.cfg
    logger = log.get("smtpd")
    anvil = None
    if ctx.anvil is not None:
        from ..anvil import AnvilClient
        from .front import ANVIL_TIMEOUT

        anvil = AnvilClient(socket.socket(fileno=ctx.anvil.detach()), ANVIL_TIMEOUT, logger)
    service = FrontService(ctx, _tls_context(cfg, logger), Defence(cfg, gevent.spawn), anvil)
    listener = socket.socket(fileno=ctx.sock.detach())
    sessions = gevent.pool.Pool(cfg.smtp.max_sessions_per_worker)
    stopped = gevent.event.Event()

    def handle(sock, peer):
        session = FrontSession(service, sock, peer)
        session.greenlet = gevent.getcurrent()
        service.sessions.add(session)
        try:
            session.run()
        finally:
            service.sessions.discard(session)

    server = gevent.server.StreamServer(listener, handle, spawn=sessions)

    def close_sessions(idle_only: bool) -> None:
        now = time.monotonic()
        for session in list(service.sessions):
            if session.greenlet is not None and (
                    not idle_only or session.drainable(now, DRAIN_IDLE_GRACE)):
                session.greenlet.kill(Drain, block=False)

    def drain() -> None:
        """Stop accepting; close sessions as they fall idle; after the grace, close all."""
        if service.draining:
            return
        service.draining = True
        server.close()
        deadline = time.monotonic() + cfg.master.graceful_timeout
        while len(sessions) and time.monotonic() < deadline:
            close_sessions(idle_only=True)
            sessions.join(timeout=0.5)
        close_sessions(idle_only=False)
        sessions.join(timeout=10)
        stopped.set()

    silent = cfg.defence.greet_wait + SILENT_NUISANCE

    def heartbeat() -> None:
        title = None
        while True:
            ctx.slot.beat()
            ctx.slot.set_sessions(len(sessions))
            silent_since = time.monotonic() - silent
            suspect = transacting = 0
            for session in service.sessions:
                suspect += session.looks_like_nuisance(silent_since)
                transacting += session.env is not None
            ctx.slot.set_states(suspect, transacting)
            state = " draining" if service.draining else ""
            new_title = f"poolmgr: smtp worker {ctx.number} [{len(sessions)} sessions{state}]"
            if new_title != title:
                set_title(new_title)
                title = new_title
            gevent.sleep(1.0)

    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(drain))
    gevent.signal_handler(signal.SIGQUIT, lambda: os._exit(0))
    gevent.signal_handler(signal.SIGUSR1, log.reopen)
    replay_early_stop()
    server.start()
    beat = gevent.spawn(heartbeat)
    stopped.wait()
    beat.kill()
    return 0
