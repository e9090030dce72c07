"""The master (arbiter): listening sockets, the event loop, spawning, reaping, heartbeats.

The master binds the SMTP sockets (one per address of `smtp.listen`) and the scanner socket
once and forks the two pools, which inherit them. Signals are queued through the wakeup fd,
one byte per delivery (three TTINs are three workers, unless the kernel merged them while
pending); the control socket is read by the same loop; only `Master.loop` changes state. The
master never imports gevent and never touches a mail byte.

Signals and control verbs are dispatched through tables: signal SIGxxx to `handle_xxx`,
control request `{"cmd": "ctl", "args": [verb, value]}` to `ctl_<verb>` (smtp, scanner, stress,
autoscale), each request's shape checked first. TERM graceful stop, INT/QUIT fast stop, HUP
reload, TTIN/TTOU SMTP pool +1/-1, USR1 reopen logs.

The loop, each round: signals, reap, murder (stale heartbeats, overdue drains), then stop or
autoscale + manage, then the once-a-second sample (nuisance window, metrics) and
`recycle_fat_workers` (max_rss). What `status` reports is assembled in `status`.

Every `autoscale.interval` the master takes a snapshot (scoreboard, accept queue from
TCP_INFO, nuisance ratio) and applies what `autoscale.decide` returns; every decision is logged
with its reason and kept for `poolmgr status`.

The master speaks systemd's notify protocol when started by it (`report`, notify.py): READY=1
once both pools serve, RELOADING=1/READY=1 around a reload, STOPPING=1, STATUS=, WATCHDOG=1.

The master also serves anvil, the per-client counters of the whole host: each SMTP worker gets
one end of a socketpair at fork, and the loop answers its requests (see `anvil`). Stress mode
is a flag on the scoreboard that every SMTP worker reads.

With `[cluster] redis`, the SMTP workers share their client state in Redis (cluster.py); the
master only watches it, from a thread of its own (`cluster.Monitor`), so its loop never waits
for Redis.

The master stays as started (root, for port 25); its workers drop to `master.user` before
their first client, and the master hands that user the files they write (`hand_over_files`).
A fork or socketpair that fails for want of processes, memory or files is logged and retried,
per pool, after 1s doubling to 30s; the loop goes on serving signals and status meanwhile.
"""

__all__ = ["Master", "ROOT_WARNING"]

import collections
import os
import resource
import selectors
import signal
import socket
import time

import psutil

from . import autoscale, cluster, config, log, maildir, metrics, privileges, status, upgrade
from .defence.anvil import Anvil, AnvilServer
from .board import Board
from .config import Config, ConfigError, format_address
from .control import ControlServer
from .listen import bind_all, inherited
from .pools import DRAINING, RUNNING, Pool, Worker, resize, set_bounds
from .worker import MASTER_SIGNALS, STACK_SIGNAL, WorkerContext, child_after_fork, fork, set_title
from .notify import Notifier
from .nuisance import NuisanceWindow
from .scanner import quarantine
from .scanner import worker as scanner_worker
from .smtp import worker as smtp_worker

LOOP_INTERVAL = 0.5
HOUSEKEEPING_INTERVAL = 0.1
RSS_CHECK_INTERVAL = 5.0
KILL_MARGIN = 15.0  # seconds past graceful_timeout before a draining worker is killed
FAST_STOP_WAIT = 3.0
STACK_WAIT = 0.5  # seconds a hung worker has to write its stack (STACK_SIGNAL) before SIGKILL
# Out of processes, memory or files at fork: retry after 1s, doubling up to 30s (Postfix's
# master throttles a service whose fork fails instead of exiting).
FORK_RETRY_MIN, FORK_RETRY_MAX = 1.0, 30.0
ROOT_WARNING = "running as root with [master] user unset: workers keep root privileges"
# handle_<name> for each signal the master takes (gunicorn's SIG_NAMES).
SIG_NAMES = {sig: sig.name.removeprefix("SIG").lower() for sig in MASTER_SIGNALS}
CTL_USAGE = "usage: ctl smtp|scanner N|+N|-N, ctl stress on|off, ctl autoscale on|off"


def scanner_addresses(cfg: Config) -> list[tuple[str, int]]:
    """scanner.listen, then each policy bank's own listener."""
    return [cfg.scanner.listen] + [bank["listen"] for bank in cfg.scanner.policy]


def preload(cfg) -> None:
    """Import in the master what every SMTP worker would import for itself after its fork:
    shared then, page for page, by all of them. dnspython (the DNSBL client) costs each
    worker nearly 7 MiB; it looks up `socket` and `selectors` when it is called, so gevent's
    monkey-patching in the worker still reaches it. gevent itself is never imported here."""
    if cfg.defence.dnsbl_sites:
        import dns.resolver  # noqa: F401


class Master:
    def __init__(self, cfg: Config, config_path: str | None):
        self.cfg = cfg
        self.config_path = config_path
        self.log = log.get("master")
        self.signals: collections.deque[int] = collections.deque()
        self.generation = 1
        self.stopping = ""  # "", "graceful" or "fast"
        self.stop_started = 0.0
        self.scanners_stopped = False
        self.started = time.time()
        self.board = Board()
        self.nuisance = NuisanceWindow(cfg.defence.nuisance_window)
        self.sampled_at = 0.0
        self.handoffs_seen: dict[int, int] = {}  # hand-offs of each SMTP worker, by pid
        self.anvil = Anvil(cfg.defence.anvil_rate_time_unit)
        self.anvil_server = AnvilServer(self.anvil, time.monotonic)
        self.anvil_socks: dict[int, socket.socket] = {}  # SMTP worker pid -> master's end
        self.stress: dict = {"on": False, "source": "", "since": None}
        self.autoscale_on = cfg.autoscale.enabled
        self.scaler = autoscale.State()
        self.scaled_at = 0.0
        self.phase_since = time.time()  # wall clock: when the storm phase last changed
        # hand-offs, their wait (ms), sessions, when, their queueing (µs): status.snapshot
        self.snapshot_mark: tuple = (0, 0, 0, None, 0)
        self.decisions: collections.deque = collections.deque(maxlen=20)
        self.last_snapshot: autoscale.Snapshot | None = None
        self.decision_count = 0
        self.cluster: cluster.Monitor | None = None  # started by setup, when configured
        self.metrics = metrics.StatusCollector() if cfg.metrics.listen else None
        self.metrics_server = None
        self.rss_checked = 0.0
        self.fork_delay = {"smtp": 0.0, "scanner": 0.0}  # the last retry delay, per pool
        self.notifier = Notifier()
        self.predecessor = upgrade.predecessor()  # the master a USR2 upgrade replaces
        self.successor = 0  # the master this one started on USR2
        self.announced = False  # READY=1 sent for this generation
        bounds = cfg.bounds()
        self.pools = {
            "smtp": Pool("smtp", bounds.smtp_floor, bounds.smtp_ceiling, smtp_worker.main),
            "scanner": Pool("scanner", bounds.scanner_floor, bounds.scanner_ceiling,
                            scanner_worker.main),
        }

    # -- setup and teardown
    def setup(self) -> None:
        cfg = self.cfg
        self._check_pidfile()
        ids = cfg.master.ids
        if ids is not None and os.geteuid() != 0 and (os.getuid(), os.getgid()) != ids[1:]:
            raise SystemExit(f"fatal: [master] user {ids.user}: poolmgr must be started as "
                             f"root to run its workers as another user")
        self.hand_over_files(cfg)
        preload(cfg)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.log.info("open files limit: %d (hard limit %d)",
                      resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)
        # Each pool's listening sockets: the SMTP pool accepts on every one.
        handed = inherited()  # systemd's socket activation, or a USR2 upgrade
        self.sockets = {"smtp": bind_all(cfg.smtp.listen, cfg.smtp.listen_backlog, handed),
                        "scanner": bind_all(scanner_addresses(cfg),
                                            cfg.scanner.listen_backlog, handed)}
        for address, sock in handed.items():
            self.log.warning("inherited socket %s is not in the configuration: closed",
                             format_address(address))
            sock.close()
        if self.metrics is not None:
            try:
                self.metrics_server = metrics.start(cfg.metrics.listen, self.metrics)
            except OSError as exc:
                raise SystemExit(f"fatal: metrics endpoint {format_address(cfg.metrics.listen)}:"
                                 f" {exc.strerror}") from None
            self.log.info("metrics endpoint on http://%s/metrics",
                          format_address(cfg.metrics.listen))
        os.makedirs(os.path.dirname(cfg.master.pidfile), exist_ok=True)
        with open(cfg.master.pidfile, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w)
        # Python runs a handler once for several deliveries of one signal, but its C handler
        # writes one byte per delivery to the wakeup fd: those bytes are the signal queue.
        for sig in MASTER_SIGNALS:
            signal.signal(sig, lambda signum, frame: None)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "wakeup")
        self.control = ControlServer(cfg.master.control_socket, cfg.master.control_socket_mode,
                                     self.selector)
        self.watch_cluster(cfg)
        for warning in cfg.warnings:
            self.log.warning("%s", warning)
        if ids is None and os.geteuid() == 0:
            self.log.warning("%s", ROOT_WARNING)
        self.log.info("daemon started -- version %s, configuration %s, smtp %s, scanner %s",
                      __import__("poolmgr").__version__, cfg.path,
                      ", ".join(map(format_address, cfg.smtp.listen)),
                      format_address(cfg.scanner.listen))

    def hand_over_files(self, cfg: Config) -> None:
        """Create the files the workers write and give them to master.user (when set): the
        maildir next hop, the quarantine and its index, and the log file, which a worker
        reopens on SIGUSR1. A failure is
        logged; the workers meet it again (a scanner worker that cannot prepare its maildir
        dies at start-up, and its pool is throttled)."""
        ids = cfg.master.ids
        hop = cfg.scanner.next_hop
        try:
            if hop.kind == "maildir":
                maildir.prepare(hop.path)
                for sub in ("", "tmp", "new", "cur"):
                    privileges.hand_over(os.path.join(hop.path, sub), ids)
            privileges.hand_over(log.file_of(cfg.master), ids)
            where = cfg.scanner.quarantine
            if where:
                os.makedirs(where, mode=0o700, exist_ok=True)
                index = os.path.join(where, quarantine.INDEX)
                os.close(os.open(index, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
                privileges.hand_over(where, ids)
                privileges.hand_over(index, ids)
        except OSError as exc:
            self.log.warning("cannot prepare %s for the workers: %s", exc.filename,
                             exc.strerror)

    def _check_pidfile(self) -> None:
        try:
            with open(self.cfg.master.pidfile) as handle:
                pid = int(handle.read().strip() or 0)
        except (OSError, ValueError):
            return
        if pid and pid not in (os.getpid(), self.predecessor) and psutil.pid_exists(pid):
            try:
                alive = "poolmgr" in " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                alive = False
            if alive:
                raise SystemExit(f"fatal: poolmgr is already running (pid {pid}, "
                                 f"pidfile {self.cfg.master.pidfile})")

    def all_sockets(self) -> list[socket.socket]:
        return [sock for socks in self.sockets.values() for sock in socks]

    def watch_cluster(self, cfg: Config) -> None:
        """Start (or, after a reload that changed [cluster], restart) the cluster's monitor."""
        if self.cluster is not None:
            if self.cluster.section == cfg.cluster:
                return
            self.cluster.stop()
            self.cluster = None
        if cfg.cluster.redis:
            self.cluster = cluster.Monitor(cfg.cluster, self.log).start()

    def teardown(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        self.control.close()
        self.notifier.close()
        for sock in self.all_sockets():
            sock.close()
        try:
            with open(self.cfg.master.pidfile) as handle:
                mine = handle.read().strip() == str(os.getpid())
            if mine:  # after a USR2 upgrade the pidfile is the successor's
                os.unlink(self.cfg.master.pidfile)
        except OSError:
            pass
        self.log.info("daemon stopped")

    # -- the loop
    def run(self) -> int:
        self.setup()
        try:
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
                self.step(self.control.expire)
                while self.signals:
                    self.step(self.handle_signal, self.signals.popleft())
                self.step(self.reap)
                self.step(self.murder)
                if self.stopping:
                    if self.step(self.advance_stop):
                        break
                else:
                    self.step(self.autoscale)
                    self.step(self.manage)
                    self.step(self.relieve_predecessor)
                self.step(self.sample)
                self.step(self.recycle_fat_workers)
                self.step(self.update_title)
                self.step(self.report)
        finally:
            self.teardown()
        return 0

    def on_ready(self, key) -> bool:
        """Serve one ready file of the selector; True when housekeeping should run now."""
        if key.data == "wakeup":
            try:
                self.signals.extend(os.read(self.wakeup_r, 4096))
            except BlockingIOError:
                pass
            return True
        if key.data == "control":
            self.control.accept()
        elif key.data == "control-conn":
            self.control.read(key.fileobj, self.serve_request)
            return True
        elif not self.anvil_server.serve(key.fileobj, key.data):
            self.close_anvil(key.data)
        return False

    def step(self, action, *args):
        """One step of the loop; a bug in one is logged and the others go on (a master that
        dies leaves its pools unsupervised)."""
        try:
            return action(*args)
        except Exception:
            self.log.exception("master: %s failed; carrying on", action.__name__)
            return None

    def handle_signal(self, signum: int) -> None:
        name = SIG_NAMES.get(signum)
        if name is None:
            return
        if name != "chld":
            self.log.info("received SIG%s", name.upper())
        getattr(self, f"handle_{name}")()

    def handle_chld(self) -> None:
        pass  # reaped right after

    def handle_term(self) -> None:
        self.begin_stop("graceful")

    def handle_int(self) -> None:
        self.begin_stop("fast")

    handle_quit = handle_int

    def handle_hup(self) -> None:
        self.notifier.reloading()
        if not self.reload():
            self.notifier.ready()  # the running configuration goes on serving

    def handle_ttin(self) -> None:
        self.apply_resize("smtp", "+1", "signal")

    def handle_ttou(self) -> None:
        self.apply_resize("smtp", "-1", "signal")

    def handle_usr2(self) -> None:
        """Upgrade poolmgr itself: a new master from the installed code takes the sockets and
        stops this one once it serves (upgrade.py)."""
        if self.stopping or self.successor and psutil.pid_exists(self.successor):
            self.log.warning("upgrade refused: %s", "poolmgr is stopping" if self.stopping
                             else f"a new master (pid {self.successor}) is already starting")
            return
        if self.metrics_server is not None:  # its port is the new master's to bind
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
            self.log.info("upgrade: metrics endpoint closed for the new master")
        try:
            self.successor = upgrade.start_successor(self.config_path, self.all_sockets())
        except OSError as exc:
            self.log.error("upgrade failed: cannot start a new master: %s", exc.strerror)
            return
        self.log.info("upgrade: started a new master, pid %d; this one stops once it serves",
                      self.successor)

    def relieve_predecessor(self) -> None:
        """After a USR2 upgrade: once both pools serve, the old master may stop."""
        if self.predecessor and not self.stopping and self.serving():
            self.log.info("upgrade: serving; stopping the old master, pid %d", self.predecessor)
            try:
                os.kill(self.predecessor, signal.SIGTERM)
            except OSError:
                pass
            self.predecessor = None

    def handle_usr1(self) -> None:
        log.reopen()
        self.hand_over_files(self.cfg)  # the log file is a new one
        self.signal_all(signal.SIGUSR1)

    def apply_resize(self, kind: str, spec: str, source: str) -> tuple[bool, str]:
        done, message = resize(self.pools, kind, spec)
        if self.stopping:
            done, message = False, "refused: poolmgr is stopping"
        if done:
            self.log.info("resize (%s): %s", source, message)
        else:
            self.log.warning("resize (%s): %s", source, message)
        return done, message

    # -- workers
    def spawn(self, pool: Pool) -> bool:
        """Fork one worker. Out of processes, memory or files (EAGAIN, ENOMEM, EMFILE): False,
        logged, and the pool waits before the next try (`fork_failed`)."""
        number = pool.free_number()
        index = self.board.alloc(pool.kind, self.generation, number)
        socks = tuple(self.sockets[pool.kind])
        mine = theirs = None
        step = "socketpair"
        try:
            if pool.kind == "smtp":
                mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            step = "fork"
            pid = fork()
        except OSError as exc:
            self.board.free(index)
            for end in (mine, theirs):
                if end is not None:
                    end.close()
            self.fork_failed(pool, step, exc)
            return False
        if pid == 0:  # the child never returns from here
            code = 1
            try:
                others = [s.fileno() for s in self.all_sockets() if s not in socks]
                others += [s.fileno() for s in self.anvil_socks.values()]
                others += [mine.fileno()] if mine is not None else []
                if self.metrics_server is not None:
                    others.append(self.metrics_server.socket.fileno())
                child_after_fork([self.wakeup_r, self.wakeup_w, *self.control.fds()] + others)
                context = WorkerContext(self.cfg, pool.kind, number, self.generation,
                                        self.board.slot(index), socks, theirs)
                code = pool.main(context) or 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                self.log.exception("%s worker %d failed", pool.kind, number)
            finally:
                os._exit(code)
        pool.workers[pid] = Worker(pid, pool.kind, number, self.generation, index)
        self.fork_delay[pool.kind] = 0.0
        if mine is not None:
            theirs.close()
            mine.setblocking(False)
            self.anvil_socks[pid] = mine
            self.selector.register(mine, selectors.EVENT_READ, pid)
        return True

    def fork_failed(self, pool: Pool, step: str, exc: OSError) -> None:
        delay = min(FORK_RETRY_MAX, 2 * self.fork_delay[pool.kind] or FORK_RETRY_MIN)
        self.fork_delay[pool.kind] = delay
        pool.backoff_until = max(pool.backoff_until, time.monotonic() + delay)
        self.log.warning("fork failed: %s: %s -- %s pool retries in %gs", step,
                         exc.strerror or exc, pool.kind, delay)

    def close_anvil(self, pid: int) -> None:
        """A worker's anvil socket is closed or the worker exited: drop what it held."""
        sock = self.anvil_socks.pop(pid, None)
        if sock is not None:
            self.selector.unregister(sock)
            sock.close()
        released = self.anvil.release(pid)
        if released:
            self.log.info("anvil: released %d connection(s) held by exited worker pid %d",
                          released, pid)

    def retire(self, worker: Worker, sig: int = signal.SIGTERM) -> None:
        if worker.state == RUNNING:
            worker.state, worker.term_at = DRAINING, time.monotonic()
        self.kill(worker, sig)

    def kill(self, worker: Worker, sig: int) -> None:
        try:
            os.kill(worker.pid, sig)
        except ProcessLookupError:
            pass

    def signal_all(self, sig: int) -> None:
        for pool in self.pools.values():
            for worker in list(pool.workers.values()):
                self.kill(worker, sig)

    def reap(self) -> None:
        now = time.monotonic()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for pool in self.pools.values():
                worker = pool.workers.pop(pid, None)
                if worker is not None:
                    break
            else:
                continue
            pool.totals.update(self.board.free(worker.slot))
            self.close_anvil(pid)
            code = os.waitstatus_to_exitcode(status)
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
        now = time.monotonic()
        cfg = self.cfg
        for pool in self.pools.values():
            for worker in list(pool.workers.values()):
                if worker.killed_at is not None:
                    if not worker.kill_sent and now - worker.killed_at >= STACK_WAIT:
                        worker.kill_sent = True
                        self.kill(worker, signal.SIGKILL)
                    continue
                info = self.board.read(worker.slot)
                limit = cfg.master.worker_timeout + (cfg.scanner.timeout if info["busy"] else 0)
                age = now - info["heartbeat"]
                # A draining scanner worker may be inside a message: it gets scanner.timeout.
                grace = max(cfg.master.graceful_timeout, cfg.scanner.timeout
                            if pool.kind == "scanner" else 0) + KILL_MARGIN
                overdue = worker.state == DRAINING and now - worker.term_at > grace
                if age > limit or overdue:
                    reason = f"no heartbeat for {age:.0f}s" if age > limit else "still draining"
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

    # -- reload and stop
    def reload(self) -> bool:
        """Load the configuration again and replace the workers; False when it is refused."""
        try:
            new = config.load(self.config_path)
        except ConfigError as exc:
            for line in exc.errors:
                self.log.error("reload: %s", line)
            self.log.error("reload failed: keeping the running configuration")
            return False
        old = self.cfg
        for key in ("smtp.listen", "scanner.listen", "master.control_socket", "master.pidfile",
                    "metrics.listen", "scanner.policy"):
            if key == "scanner.policy" and scanner_addresses(new) == scanner_addresses(old):
                continue  # a bank's actions may change; its listener may not
            if new.get(key) != old.get(key):
                self.log.error("reload refused: %s changed; restart poolmgr to apply it", key)
                return False
        for warning in new.warnings:
            self.log.warning("reload: %s", warning)
        set_bounds(self.pools, new.bounds(), old.bounds())
        log.setup("poolmgr/master", new.master)
        self.hand_over_files(new)
        self.cfg = new
        self.anvil.time_unit = new.defence.anvil_rate_time_unit
        self.watch_cluster(new)
        if new.autoscale.enabled != old.autoscale.enabled:
            self.set_autoscale(new.autoscale.enabled, "reload")
        self.generation += 1
        self.announced = False  # READY=1 again once the new generation serves
        self.log.info("reload: configuration %s, generation %d: replacing workers", new.path,
                      self.generation)
        for pool in self.pools.values():
            old_workers = pool.running()
            pool.backoff_until = 0.0
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
        if self.successor and psutil.pid_exists(self.successor):
            self.notifier.send(f"MAINPID={self.successor}")  # systemd follows the new master
        self.notifier.stopping()
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

    # -- sampling and memory
    def sample(self) -> None:
        """Once a second: the nuisance window, and the copy of the status metrics serve."""
        now = time.monotonic()
        if now - self.sampled_at < 1.0:
            return
        self.sampled_at = now
        self.nuisance.window = self.cfg.defence.nuisance_window
        self.nuisance.add(now, dict(status.pool_counters(self, self.pools["smtp"])))
        self.share_handoffs()
        if self.metrics is not None:
            self.metrics.publish(status.collect(self), self.decision_count)

    def share_handoffs(self) -> None:
        """The scanner workers, shared among the SMTP workers that handed off in the last
        second (among all of them when none did): with no more hand-off connections than
        scanner workers, none waits in the scanner pool's accept queue, so none makes a
        scanner worker let a kept connection go, and SMTP workers reuse their connections
        instead of opening one per message."""
        smtp = self.pools["smtp"].running()
        counts = {w.pid: self.board.read(w.slot)["counters"].get("handoffs", 0) for w in smtp}
        active = sum(1 for pid, n in counts.items() if n != self.handoffs_seen.get(pid, n))
        self.handoffs_seen = counts
        scanners = len(self.pools["scanner"].running())
        self.board.set_handoff_share(max(1, -(-scanners // max(1, active or len(smtp)))))

    def recycle_fat_workers(self) -> None:
        """Every RSS_CHECK_INTERVAL: retire workers over their pool's max_rss; manage() starts
        fresh ones."""
        now = time.monotonic()
        if now - self.rss_checked < RSS_CHECK_INTERVAL or self.stopping:
            return
        self.rss_checked = now
        for kind, pool in self.pools.items():
            limit = getattr(self.cfg, kind).max_rss or self.cfg.master.max_rss
            if not limit:
                continue
            for worker in pool.running():
                try:
                    rss = psutil.Process(worker.pid).memory_info().rss
                except psutil.Error:
                    continue
                if rss > limit:
                    self.log.warning("%s worker %d pid %d: RSS %.1f MiB over max_rss %.1f MiB -- "
                                     "recycling", kind, worker.number, worker.pid, rss / 2**20,
                                     limit / 2**20)
                    self.retire(worker)

    # -- control requests
    def serve_request(self, request: dict) -> dict:
        """A control request must never take the master down: a handler's failure is logged
        and answered."""
        try:
            return self.handle_request(request)
        except Exception:
            self.log.exception("control request %.80r failed", request)
            return {"ok": False, "message": "internal error, see the log"}

    def handle_request(self, request: dict) -> dict:
        """One control request; a wrong shape gets an error answer, never an exception."""
        cmd, args = request.get("cmd"), request.get("args", [])
        if cmd == "status":
            return {"ok": True, "status": status.collect(self).to_json()}
        if cmd != "ctl":
            return {"ok": False, "message": f"unknown command {str(cmd)[:40]!r}"}
        handler = (getattr(self, f"ctl_{args[0]}", None) if isinstance(args, list) and
                   len(args) == 2 and all(isinstance(a, str) for a in args) and
                   args[0].isalpha() else None)
        if handler is None:
            return {"ok": False, "message": CTL_USAGE}
        return handler(args[1])

    def ctl_smtp(self, size: str) -> dict:
        done, message = self.apply_resize("smtp", size, "ctl")
        return {"ok": done, "message": message}

    def ctl_scanner(self, size: str) -> dict:
        done, message = self.apply_resize("scanner", size, "ctl")
        return {"ok": done, "message": message}

    def ctl_stress(self, word: str) -> dict:
        if word not in ("on", "off"):
            return {"ok": False, "message": CTL_USAGE}
        return {"ok": True, "message": self.set_stress(word == "on", "ctl")}

    def ctl_autoscale(self, word: str) -> dict:
        if word not in ("on", "off"):
            return {"ok": False, "message": CTL_USAGE}
        return {"ok": True, "message": self.set_autoscale(word == "on")}

    # -- autoscaling
    def autoscale(self) -> None:
        now = time.monotonic()
        if not self.autoscale_on or now - self.scaled_at < self.cfg.autoscale.interval:
            return
        self.scaled_at = now
        snap, self.snapshot_mark = status.snapshot(self, now, self.snapshot_mark)
        self.last_snapshot = snap
        before = self.scaler
        smtp, scanner, self.scaler, decisions = autoscale.decide(snap, before, self.cfg.autoscale)
        if self.scaler.phase != before.phase:
            self.phase_since = time.time()
        self.decision_count += len(decisions)
        for decision in decisions:
            self.log.info("autoscale: %s", decision)
            self.decisions.append({"time": round(time.time(), 1), "decision": decision})
        self.pools["smtp"].target, self.pools["scanner"].target = smtp, scanner
        if self.scaler.stress != before.stress:
            self.set_stress(self.scaler.stress, "autoscale")

    def set_stress(self, on: bool, source: str) -> str:
        """Switch stress mode for every SMTP worker (ctl now, the autoscaler later)."""
        was = self.stress["on"]
        if on != was:
            self.stress = {"on": on, "source": source, "since": time.time() if on else None}
            self.board.set_stress(on)
            self.log.info("stress mode %s (%s)", "on" if on else "off", source)
        return f"stress mode {'on' if on else 'off'}" + ("" if on != was else " (unchanged)")

    def set_autoscale(self, on: bool, source: str = "ctl") -> str:
        if on != self.autoscale_on:
            self.autoscale_on = on
            self.log.info("autoscale %s (%s)", "on" if on else "off", source)
            if not on:  # back to the floors; a storm's workers are retired
                for pool in self.pools.values():
                    pool.target = pool.floor
                self.scaler = autoscale.State(since=time.monotonic())
                self.phase_since = time.time()
                if self.stress["source"] == "autoscale" and self.stress["on"]:
                    self.set_stress(False, "autoscale")
        return f"autoscale {'on' if on else 'off'}"

    # -- systemd
    def report(self) -> None:
        """Tell systemd (notify.py): READY=1 once both pools have a worker of this generation
        serving, STATUS= when the summary changes, WATCHDOG=1 while the loop runs."""
        notifier = self.notifier
        if not notifier.enabled:
            return
        if not self.announced and not self.stopping and self.serving():
            self.announced = True
            notifier.ready()
        notifier.status(self.status_line())
        notifier.watchdog(time.monotonic(), slack=LOOP_INTERVAL)

    def serving(self) -> bool:
        """Both pools have a worker of the current generation that has opened its listeners."""
        return all(any(worker.generation == self.generation and self.board.serving(worker.slot)
                       for worker in pool.running()) for pool in self.pools.values())

    def status_line(self) -> str:
        """`smtp 2/2 workers, scanner 2/2, calm`: running/target, then the storm phase."""
        smtp, scanner = self.pools["smtp"], self.pools["scanner"]
        words = [f"smtp {len(smtp.running())}/{smtp.target} workers",
                 f"scanner {len(scanner.running())}/{scanner.target}",
                 self.scaler.phase if self.autoscale_on else "autoscale off"]
        if self.stress["on"]:
            words.append("stress mode")
        if self.stopping:
            words.append(f"stopping ({self.stopping})")
        return ", ".join(words)

    def update_title(self) -> None:
        smtp, scanner = self.pools["smtp"], self.pools["scanner"]
        set_title(f"poolmgr: master [smtp {len(smtp.running())}/{smtp.ceiling}, scanner "
                  f"{len(scanner.running())}/{scanner.ceiling}]"
                  + (f" -c {self.config_path}" if self.config_path else ""))
