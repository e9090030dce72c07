"""An SMTP worker process: one gevent hub, thousands of SMTP sessions.

gevent is imported and monkey-patched here, after the fork, and nowhere in the master. Each
listening socket the master bound (one per `smtp.listen` address) is re-wrapped as a gevent
socket (otherwise accept() would block the whole worker) and gets a `StreamServer`. A session
is made in the hub as it is accepted and runs in a greenlet of its own (a kept one:
`smtp.runners`) until it waits for its client; an idle session is parked (`smtp.park`), with
no greenlet. At `smtp.max_sessions_per_worker` sessions, running and parked, or GREETING_MAX
sessions accepted whose banner has not gone out yet (while the accept queue is under the
autoscaler's storm mark), the worker stops accepting on every socket and the kernel's listen queues feed the
other workers: in a storm, banners go out in arrival order, and a new client's banner waits
behind at most GREETING_MAX others here.

Its sessions ask the client state (`defence.clientstate`) of the master's anvil through one
socket, or, with `[cluster] redis` or `sentinels`, of Redis directly (`cluster.RedisState`,
cooperative under gevent, each call cut at `cluster.timeout`), with the master's as the
fallback. The log lines the log could not take at once (log.py) are written by one greenlet,
`write_log`, as the log takes them again; no session waits for them. Once a storm is over, the heartbeat hands the
memory its sessions freed back to the system (`heap.Trimmer`).

Signals: SIGTERM drains (stop accepting; a session idle with no transaction for
DRAIN_IDLE_GRACE seconds gets 421 and is closed; transactions finish; after
`master.graceful_timeout` the rest get 421) and exits 0; SIGQUIT exits at once; SIGUSR1 reopens
the log file.
"""

__all__ = ["SmtpWorker", "main", "GREETING_MAX"]

import gc
import os
import time

from .. import log
from ..heap import Trimmer
from ..listen import accept_queue
from ..worker import DRAIN_IDLE_GRACE, WorkerProcess

# Sessions accepted whose banner has not gone out yet (waiting for the master's anvil, the
# client's name, their turn in the hub): at this many the worker stops accepting until one
# goes out, so that a storm's connections wait in the kernel's accept queue, in arrival
# order and for any worker, rather than by thousands in one worker, each new client's banner
# behind all of theirs (and the accept queue is what the autoscaler reads as a storm). But
# not once that queue is as full as the autoscaler's storm mark (autoscale.storm_enter_
# occupancy of smtp.listen_backlog): the autoscaler has seen it, and beyond it the kernel
# would soon drop connections.
GREETING_MAX = 256
QUEUE_CHECK = 0.05  # seconds between looks at the accept queue while held back by GREETING_MAX
# A session that has sent no command this long after the banner counts as nuisance for the
# autoscaler while it lives (bots that connect and never speak).
SILENT_NUISANCE = 5.0
# The log writer (write_log): how often it looks whether lines wait, how long it waits for the
# log to turn writable before it tries anyway, its pause when the log took nothing.
LOG_IDLE_CHECK = 0.25
LOG_RETRY = 1.0
LOG_PAUSE = 0.1
# The garbage collector's young threshold (Python's default: 700 allocations). A storm's
# sessions are long-lived objects by the thousand: at 700 a 10,000-session flood brought 3 full
# collections per worker, ~120 ms each at its size, a stall of every session of the worker
# (longer on a busy machine); at 7,000 it brought none, and half the time in young ones.
GC_YOUNG = 7000


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


def _server_class(stream_server, full):
    """gevent's StreamServer, accepting while the worker has room, and leaving the socket
    open when `handle` returns: a parked session lives on without its greenlet."""

    class Server(stream_server):
        def full(self) -> bool:
            return full()

        def do_close(self, sock, *args) -> None:
            pass  # the session closes its socket

    return Server


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
        import gevent.server

        from ..defence.policy import Defence
        from ..handoff import HandoffGate
        from .front import FrontService, FrontSession
        from .park import Parking
        from .protocol import Drain
        from .runners import Runners, Turn

        self.gevent, self.session_class, self.drain_exc = gevent, FrontSession, Drain
        self.heap = Trimmer()  # a storm's freed memory back to the system once it is over
        gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])

        log.set_name("poolmgr/smtpd")
        ctx, cfg = self.ctx, self.cfg
        self.log = log.get("smtpd")
        state = self.cluster = None
        if ctx.anvil is not None:
            from ..defence.anvil import ANVIL_TIMEOUT, AnvilClient

            state = AnvilClient(socket.socket(fileno=ctx.anvil.detach()), ANVIL_TIMEOUT,
                                self.log, lambda: ctx.slot.add("anvil_fallbacks"))
            from ..cluster import RedisState, enabled

            if enabled(cfg.cluster):  # the cluster's state, with the host's as its fallback
                timeout = cfg.cluster.timeout
                state = self.cluster = RedisState(
                    cfg, state, ctx.slot, str(os.getpid()),
                    lambda: gevent.Timeout(timeout, TimeoutError("cluster.timeout")))
        self.service = FrontService(ctx, _tls_context(cfg, self.log),
                                    Defence(cfg, gevent.spawn, state, self.log, ctx.slot),
                                    state)
        self.max_sessions = cfg.smtp.max_sessions_per_worker
        self.stopped_full = False  # the servers stopped accepting because the worker was full
        self.queue_check = gevent.get_hub().loop.timer(QUEUE_CHECK, QUEUE_CHECK)
        hub = gevent.get_hub()
        self.runners = Runners(hub, gevent.spawn)
        self.service.parking = Parking(hub.loop, self.runners.spawn)
        self.service.handoff_gate = HandoffGate(lambda: Turn(hub), gevent.sleep)
        self.service.on_room = self.room
        self.stopped = gevent.event.Event()
        server_class = _server_class(gevent.server.StreamServer, self.full)
        self.servers = [server_class(socket.socket(fileno=sock.detach()), self.handle,
                                     spawn=None)
                        for sock in ctx.socks]

    def full(self) -> bool:
        """Asked by the servers before each accept: when True they stop accepting."""
        service = self.service
        if len(service.sessions) >= self.max_sessions:
            self.stopped_full = True
            return True
        if service.greeting >= GREETING_MAX and not self.queue_filling():
            self.stopped_full = True
            if not self.queue_check.active:  # the queue may fill before a banner goes out
                self.queue_check.start(self.room)
            return True
        return False

    def queue_filling(self) -> bool:
        """The fullest accept queue is at the autoscaler's storm mark or past it."""
        cfg = self.cfg
        waiting, limit = accept_queue([server.socket for server in self.servers],
                                      cfg.smtp.listen_backlog)
        return waiting >= limit * cfg.autoscale.storm_enter_occupancy

    def room(self) -> None:
        """A session closed or sent its banner (or QUEUE_CHECK passed): accept again if the
        worker stopped when it was full (not after an accept error: gevent's back-off starts
        it again)."""
        if self.stopped_full and not self.full():
            self.stopped_full = False
            self.queue_check.stop()
            for server in self.servers:
                if server.started:
                    server.start_accepting()

    def on_signal(self, signum: int, handler) -> None:
        self.gevent.signal_handler(signum, handler)

    def handle(self, sock, peer) -> None:
        """In the hub, at accept: the session counts from now (until its on_close)."""
        session = self.session_class(self.service, sock, peer)
        self.service.sessions.add(session)
        # The count on the board as it changes, not at the next heartbeat: the autoscaler
        # sees a storm's sessions the moment they arrive (and a new worker's first one).
        self.ctx.slot.set_sessions(len(self.service.sessions))
        session.greenlet = self.runners.spawn(session.run)

    def close_sessions(self, idle_only: bool) -> None:
        """Drain sessions: a parked one resumes with Drain, a running one gets it thrown in;
        one whose greenlet has yet to begin is left for the next round (gevent would cancel
        that greenlet, and the session would never close)."""
        now = time.monotonic()
        for session in list(self.service.sessions):
            if idle_only and not session.drainable(now, DRAIN_IDLE_GRACE):
                continue
            if session.parked is not None:
                self.service.parking.interrupt(session, self.drain_exc())
            elif session.running:
                session.greenlet.kill(self.drain_exc, block=False)

    def wait_sessions(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.service.sessions and time.monotonic() < end:
            self.gevent.sleep(0.1)

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
        while self.service.sessions and time.monotonic() < deadline:
            self.close_sessions(idle_only=True)
            self.wait_sessions(0.5)
        deadline = time.monotonic() + 10
        while self.service.sessions and time.monotonic() < deadline:
            self.close_sessions(idle_only=False)
            self.wait_sessions(0.5)
        self.stopped.set()

    def heartbeat(self) -> None:
        silent = self.cfg.defence.greet_wait + SILENT_NUISANCE
        slot = self.ctx.slot
        while True:
            self.notify()
            sessions = len(self.service.sessions)
            slot.set_sessions(sessions)
            silent_since = time.monotonic() - silent
            suspect = transacting = 0
            for session in self.service.sessions:
                suspect += session.looks_like_nuisance(silent_since)
                transacting += session.env is not None
            slot.set_states(suspect, transacting)
            self.show(f"{sessions} sessions"
                      + (" draining" if self.service.draining else ""))
            self.service.relay_cache.expire()
            self.heap.tick(sessions, time.monotonic())
            # The share of the scanner pool the master published (handoff.share).
            self.service.handoff_gate.set_limit(slot.handoff_share())
            if self.cluster is not None:
                self.cluster.beat()
            self.gevent.sleep(1.0)

    def write_log(self) -> None:
        """The log lines that could not be written at once (log.py), written as the log
        takes them: this greenlet waits for the log's socket or pipe to turn writable, and
        the hub serves the sessions meanwhile."""
        from gevent.socket import wait_write

        while True:
            fd = log.waiting()
            if fd is None:
                self.gevent.sleep(LOG_IDLE_CHECK)
                continue
            if fd < 0:  # a file on a full disk: nothing to wait on but time
                self.gevent.sleep(LOG_RETRY)
            else:
                try:
                    wait_write(fd, timeout=LOG_RETRY)
                except Exception:  # the timeout, or a descriptor closed meanwhile (reopen)
                    pass
            before = log.pending()
            left = log.flush()
            if left and left >= before and fd >= 0:
                # Writable, yet nothing went (ENOBUFS, a syslogd that went away): not a loop.
                self.gevent.sleep(LOG_PAUSE)

    def serve(self) -> int:
        for server in self.servers:
            server.start()
        beat = self.gevent.spawn(self.heartbeat)
        writer = self.gevent.spawn(self.write_log)
        self.stopped.wait()
        beat.kill()
        writer.kill()
        self.service.relay_cache.close()
        return 0


main = SmtpWorker.main
