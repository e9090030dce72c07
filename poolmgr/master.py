"""The master (arbiter): the loop, signals, spawn, reap, heartbeat/murder, manage, reload
and stop. It binds both pools' listening sockets once and forks the workers, which inherit
them. Its loop selects on the signal queue (signals.py), the control socket (control.py) and
the SMTP workers' anvil sockets (defence/anvil.py); only the loop changes state. Signals go to
`handle_<name>`: TERM graceful stop, INT/QUIT fast stop, HUP reload, TTIN/TTOU SMTP pool
+1/-1, USR1 reopen logs, USR2 upgrade. Pool sizes change in sizing.py; what runs beside the
pools (pidfile, control socket, metrics, cluster, systemd) is in services.py; what the master
knows goes out as one typed record (`view`). It never imports gevent nor touches a mail byte.
"""

__all__ = ["Master", "ROOT_WARNING", "SIG_NAMES"]

import contextlib
import os
import selectors
import signal
import socket
import time

from . import config, handoff, log
from .board import Board
from .config import Config
from .defence.anvil import Anvil, AnvilServer
from .listen import accept_queue, bind_pools
from .nuisance import NuisanceWindow
from .pools import DRAINING, RUNNING, Pool, Vigil, Worker, set_bounds
from .scanner import worker as scanner_worker
from .services import ROOT_WARNING, Services
from .signals import SignalQueue
from .sizing import Sizing
from .status import AnvilStatus, ClusterStatus, MasterView, Status, collect, summary
from .smtp import worker as smtp_worker
from .worker import MASTER_SIGNALS, STACK_SIGNAL, WorkerContext, become, fork, set_title

LOOP_INTERVAL = 0.5
HOUSEKEEPING_INTERVAL = 0.1
RSS_CHECK_INTERVAL = 5.0
KILL_MARGIN = 15.0  # seconds past graceful_timeout before a draining worker is killed
FAST_STOP_WAIT = 3.0
STACK_WAIT = 0.5  # seconds a hung worker has to write its stack (STACK_SIGNAL) before SIGKILL
# handle_<name> for each signal the master takes (gunicorn's SIG_NAMES).
SIG_NAMES = {sig: sig.name.removeprefix("SIG").lower() for sig in MASTER_SIGNALS}


class Master:
    def __init__(self, cfg: Config, config_path: str | None):
        self.cfg, self.config_path, self.log = cfg, config_path, log.get("master")
        self.generation, self.stopping = 1, ""  # stopping: "", "graceful" or "fast"
        self.vigil = Vigil(self.log)  # whether the master ran: heartbeats are judged fairly
        self.stop_started, self.scanners_stopped = 0.0, False
        self.announced = False  # READY=1 sent for this generation
        self.started, self.board = time.time(), Board()
        self.nuisance = NuisanceWindow(cfg.defence.nuisance_window)
        self.sampled_at = self.rss_checked = 0.0
        self.handoffs_seen: dict[int, int] = {}  # hand-offs of each SMTP worker, by pid
        self.anvil = AnvilServer(Anvil(cfg.defence.anvil_rate_time_unit), time.monotonic)
        self.services = Services(cfg, self.log)
        bounds = cfg.bounds()
        self.pools = {
            "smtp": Pool("smtp", bounds.smtp_floor, bounds.smtp_ceiling, smtp_worker.main),
            "scanner": Pool("scanner", bounds.scanner_floor, bounds.scanner_ceiling,
                            scanner_worker.main),
        }
        self.sizing = Sizing(self.pools, self.board, cfg.autoscale.enabled, self.log)

    # -- start and end
    def run(self) -> int:
        self.services.prepare(self.cfg)
        self.sockets = bind_pools(self.cfg, self.log)
        self.signals = SignalQueue()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.signals.fd, selectors.EVENT_READ, "wakeup")
        self.services.open(self.cfg, self.selector)
        try:
            self.loop()
        finally:
            self.services.close(self.cfg)
            for sock in self.all_sockets():
                sock.close()
            self.log.info("daemon stopped")
        return 0

    def all_sockets(self) -> list[socket.socket]:
        return [sock for socks in self.sockets.values() for sock in socks]

    # -- the loop
    def loop(self) -> None:
        housekept = 0.0
        while True:
            urgent = False
            for key, _ in self.selector.select(LOOP_INTERVAL):
                urgent = self.step(self.on_ready, key) or urgent
            # Anvil requests wake the loop thousands of times a second in a storm; the
            # housekeeping below runs on signals, control requests, and every 0.1s.
            now = time.monotonic()
            if not urgent and now - housekept < HOUSEKEEPING_INTERVAL:
                continue
            housekept = now
            self.step(self.services.control.expire)
            for signum in self.signals.take():
                self.step(self.handle_signal, signum)
            self.step(self.reap)
            self.step(self.murder)
            if self.stopping:
                if self.step(self.advance_stop):
                    return
            else:
                self.step(self.autoscale)
                self.step(self.manage)
                self.step(self.relieve_predecessor)
            for action in (self.sample, self.recycle_fat_workers, self.update_title,
                           self.report, log.flush):
                self.step(action)

    def on_ready(self, key) -> bool:
        """Serve one ready file of the selector; True when housekeeping should run now."""
        if key.data == "wakeup":
            self.signals.read()
            return True
        if key.data == "control":
            self.services.control.accept()
        elif key.data == "control-conn":
            self.services.control.read(key.fileobj, self)
            return True
        elif not self.anvil.serve(key.fileobj, key.data):
            self.anvil.drop(key.data, self.selector, self.log)
        return False

    def step(self, action, *args):
        """One step of the loop; a bug in one is logged and the others go on (a master that
        dies leaves its pools unsupervised)."""
        try:
            return action(*args)
        except Exception:
            self.log.exception("master: %s failed; carrying on", action.__name__)
            return None

    # -- signals
    def handle_signal(self, signum: int) -> None:
        name = SIG_NAMES.get(signum)
        if name is not None and name != "chld":  # CHLD: reaped right after
            self.log.info("received SIG%s", name.upper())
            getattr(self, f"handle_{name}")()

    def handle_term(self) -> None:
        self.begin_stop("graceful")

    def handle_int(self) -> None:
        self.begin_stop("fast")

    handle_quit = handle_int

    def handle_hup(self) -> None:
        self.services.notifier.reloading()
        if not self.reload():
            self.services.notifier.ready()  # the running configuration goes on serving

    def handle_ttin(self) -> None:
        self.sizing.resize("smtp", "+1", "signal", bool(self.stopping))

    def handle_ttou(self) -> None:
        self.sizing.resize("smtp", "-1", "signal", bool(self.stopping))

    def handle_usr1(self) -> None:
        log.reopen()
        self.services.hand_over_files(self.cfg)  # the log file is a new one
        self.signal_all(signal.SIGUSR1)

    def handle_usr2(self) -> None:
        """Upgrade poolmgr itself: a new master takes the sockets (upgrade.py)."""
        self.services.begin_upgrade(self.config_path, self.all_sockets(), self.stopping)

    def relieve_predecessor(self) -> None:
        """After a USR2 upgrade: once both pools serve, the old master may stop."""
        if self.services.upgrade.predecessor and not self.stopping and self.serving():
            self.services.relieve_predecessor()

    # -- workers
    def spawn(self, pool: Pool) -> bool:
        """Fork one worker. Out of processes, memory or files (EAGAIN, ENOMEM, EMFILE): False,
        logged, and the pool waits before the next try."""
        number = pool.free_number()
        index = self.board.alloc(pool.kind, self.generation, number)
        socks = tuple(self.sockets[pool.kind])
        mine, theirs, step = None, None, "socketpair"
        try:
            if pool.kind == "smtp":
                mine, theirs = self.anvil.pair()
            step = "fork"
            pid = fork()
        except OSError as exc:
            self.board.free(index)
            for end in filter(None, (mine, theirs)):
                end.close()
            delay = pool.fork_failed(time.monotonic())
            self.log.warning("fork failed: %s: %s -- %s pool retries in %gs", step,
                             exc.strerror or exc, pool.kind, delay)
            return False
        if pid == 0:  # the child: never returns from here
            close = [s.fileno() for s in self.all_sockets() if s not in socks]
            close += self.signals.fds() + self.services.fds() + self.anvil.fds()
            close += [mine.fileno()] if mine is not None else []
            become(pool.main, WorkerContext(self.cfg, pool.kind, number, self.generation,
                                            self.board.slot(index), socks, theirs),
                   close, self.log)
        pool.workers[pid] = Worker(pid, pool.kind, number, self.generation, index)
        pool.fork_delay = 0.0
        if mine is not None:
            theirs.close()
            self.anvil.adopt(pid, mine, self.selector)
        return True

    def retire(self, worker: Worker, sig: int = signal.SIGTERM) -> None:
        if worker.state == RUNNING:
            worker.state, worker.term_at = DRAINING, time.monotonic()
        self.kill(worker, sig)

    def kill(self, worker: Worker, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)

    def signal_all(self, sig: int) -> None:
        for pool in self.pools.values():
            for worker in list(pool.workers.values()):
                self.kill(worker, sig)

    def reap(self) -> None:
        now = time.monotonic()
        while True:
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            pool = next((p for p in self.pools.values() if pid in p.workers), None)
            if pool is None:
                continue
            worker = pool.workers.pop(pid)
            pool.totals.update(self.board.free(worker.slot))
            self.anvil.drop(pid, self.selector, self.log)
            code = os.waitstatus_to_exitcode(code)
            how = f"exit status {code}" if code >= 0 else f"killed by signal {-code}"
            if code != 0:
                self.log.warning("%s worker %d pid %d %s", pool.kind, worker.number, pid, how)
            delay = 0.0 if self.stopping else pool.note_exit(worker, code, now)
            if delay:
                self.log.warning("%s pool: worker died at start-up -- throttling for %gs",
                                 pool.kind, delay)

    def murder(self) -> None:
        """Kill hung workers (stale heartbeat) and draining workers past their grace: each is
        asked for its stack first (STACK_SIGNAL), and killed STACK_WAIT later."""
        now, cfg = time.monotonic(), self.cfg
        self.vigil.watch(now, cfg.master.worker_timeout / 2)
        for pool in self.pools.values():
            for worker in pool.stack_written(now, STACK_WAIT, self.vigil.since):
                self.kill(worker, signal.SIGKILL)
            # A draining scanner worker may be inside a message: it gets scanner.timeout.
            grace = max(cfg.master.graceful_timeout, cfg.scanner.timeout
                        if pool.kind == "scanner" else 0) + KILL_MARGIN
            for worker, reason in pool.hung(self.board.read, now, cfg.master.worker_timeout,
                                            cfg.scanner.timeout, grace, self.vigil.since):
                self.log.warning("%s worker %d pid %d: %s -- killing", pool.kind,
                                 worker.number, worker.pid, reason)
                worker.killed_at = now
                self.kill(worker, STACK_SIGNAL)  # where it hangs, to stderr; SIGKILL next

    def manage(self) -> None:
        now = time.monotonic()
        for pool in self.pools.values():
            running = pool.running()
            for worker in running[:max(0, len(running) - pool.target)]:
                self.log.info("%s pool: retiring worker %d pid %d (target %d)", pool.kind,
                              worker.number, worker.pid, pool.target)
                self.retire(worker)
            missing = pool.target - len(running)
            while missing > 0 and now >= pool.backoff_until and self.spawn(pool):
                missing -= 1

    def recycle_fat_workers(self) -> None:
        """Retire workers over their pool's max_rss; manage() starts fresh ones."""
        now = time.monotonic()
        if now - self.rss_checked < RSS_CHECK_INTERVAL or self.stopping:
            return
        self.rss_checked = now
        for kind, pool in self.pools.items():
            limit = getattr(self.cfg, kind).max_rss or self.cfg.master.max_rss
            for worker, rss in pool.over_rss(limit):
                self.log.warning("%s worker %d pid %d: RSS %.1f MiB over max_rss %.1f MiB -- "
                                 "recycling", kind, worker.number, worker.pid, rss / 2**20,
                                 limit / 2**20)
                self.retire(worker)

    # -- reload and stop
    def reload(self) -> bool:
        """Load the configuration again and replace the workers; False when it is refused."""
        old, new = self.cfg, config.reload(self.config_path, self.cfg, self.log)
        if new is None:
            return False
        set_bounds(self.pools, new.bounds(), old.bounds())
        self.cfg = new
        self.services.reload(new)
        self.anvil.anvil.time_unit = new.defence.anvil_rate_time_unit
        self.nuisance.window = new.defence.nuisance_window
        if new.autoscale.enabled != old.autoscale.enabled:
            self.sizing.set_autoscale(new.autoscale.enabled, "reload")
        self.generation, self.announced = self.generation + 1, False  # READY=1 when it serves
        self.log.info("reload: configuration %s, generation %d: replacing workers", new.path,
                      self.generation)
        for pool in self.pools.values():
            old_workers, pool.backoff_until = pool.running(), 0.0
            for _ in range(pool.target):
                if not self.spawn(pool):
                    break  # manage() starts the rest after the back-off
            for worker in old_workers:
                self.retire(worker)
        return True

    def begin_stop(self, how: str) -> None:
        if self.stopping == "fast" or self.stopping == how:
            return
        self.stopping, self.stop_started = how, time.monotonic()
        self.services.stopping()
        for sock in self.all_sockets():
            sock.close()  # workers hold their own copies until they drain
        if how == "fast":
            self.signal_all(signal.SIGQUIT)
            return
        self.log.info("graceful stop: draining SMTP workers (up to %gs)",
                      self.cfg.master.graceful_timeout)
        for worker in self.pools["smtp"].workers.values():
            self.retire(worker)

    def advance_stop(self) -> bool:
        """One step of stopping; True when every worker is gone."""
        elapsed = time.monotonic() - self.stop_started
        if self.stopping == "fast":
            if elapsed > FAST_STOP_WAIT:
                self.signal_all(signal.SIGKILL)
        elif not self.scanners_stopped and (not self.pools["smtp"].workers or
                                            elapsed > self.cfg.master.graceful_timeout):
            # Scanner workers keep serving until the SMTP workers' last hand-offs are done.
            self.scanners_stopped = True
            for worker in self.pools["scanner"].workers.values():
                self.retire(worker)
        return not any(pool.workers for pool in self.pools.values())

    # -- what the master knows, handed over as one record
    def view(self) -> MasterView:
        now, cfg, sizing, monitor = time.monotonic(), self.cfg, self.sizing, self.services.cluster
        pools = {kind: pool.view(self.board.read, now) for kind, pool in self.pools.items()}
        return MasterView(
            now, self.started, cfg.path, self.generation, self.stopping, pools,
            cfg.smtp.max_sessions_per_worker,
            accept_queue(self.sockets["smtp"], cfg.smtp.listen_backlog),
            cfg.smtp.listen_backlog, self.nuisance.summary(), sizing.scaler, sizing.stress,
            AnvilStatus(*self.anvil.figures()),
            ClusterStatus(**monitor.view()) if monitor else ClusterStatus(),
            list(cfg.scanner.checks), [site.domain for site in cfg.defence.dnsbl_sites],
            cfg.scanner.feeder_maxproc)

    def status(self) -> Status:
        return collect(self.view())

    def autoscale(self) -> None:
        self.sizing.tick(self.view, self.cfg.autoscale)

    def sample(self) -> None:
        """Once a second: the nuisance window, each SMTP worker's share of the scanner pool
        (`handoff.share`, on the board), the status the metrics serve, the heap's trim."""
        now = time.monotonic()
        if now - self.sampled_at < 1.0:
            return
        self.sampled_at, view = now, self.view()
        self.nuisance.add(now, dict(view.pools["smtp"].counters()))
        counts = {w.worker.pid: w.board["counters"].get("handoffs", 0)
                  for w in view.pools["smtp"].running()}
        self.board.set_handoff_share(handoff.share(counts, self.handoffs_seen,
                                                   len(view.pools["scanner"].running())))
        self.handoffs_seen = counts
        self.services.publish(lambda: collect(view), self.sizing.scaler.decision_count)
        self.services.heap.tick(0, now)

    # -- systemd and ps
    def report(self) -> None:
        if self.services.report(self.serving, lambda: summary(self.view()),
                                self.announced or bool(self.stopping), LOOP_INTERVAL):
            self.announced = True

    def serving(self) -> bool:
        """Each pool (no SMTP pool when scanner-only) has a worker of this generation serving."""
        return all(any(w.generation == self.generation and self.board.serving(w.slot)
                       for w in pool.running()) for pool in self.pools.values() if pool.ceiling)

    def update_title(self) -> None:
        smtp, scanner = self.pools["smtp"], self.pools["scanner"]
        set_title(f"poolmgr: master [smtp {len(smtp.running())}/{smtp.ceiling}, scanner "
                  f"{len(scanner.running())}/{scanner.ceiling}]"
                  + (f" -c {self.config_path}" if self.config_path else ""))
