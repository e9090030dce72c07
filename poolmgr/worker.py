"""The worker base class both pools' workers share, and what a worker gets from the master.

`WorkerContext` is built by the master before fork and handed to the worker. The master forks
with its signals held (`fork`); right after the fork `child_after_fork` restores default signal
dispositions (the master's handlers only enqueue into the master's queue) and lets the signals
in. `WorkerProcess.run` is the lifecycle (gunicorn's workers/base.py): `init_process` (what
must happen after the fork, such as gevent's monkey-patching, or reading the TLS key while
still root), the drop to `master.user` (`privileges.drop`, before the first client), the
signals (TERM `handle_term` drains, QUIT exits at once, USR1 reopens the log, USR2 writes the
stack), then `serve`
until the worker is done. `notify` is the heartbeat, called about once a second: it stamps the
scoreboard slot and, when the master is gone (our parent pid changed), drains, which closes the
listening socket at once. `show` sets the process title `ps` shows (`poolmgr: smtp worker 3
[412 sessions]`). A pool's worker overrides only what differs.
"""

__all__ = ["WorkerProcess", "WorkerContext", "Limits", "limits_for", "fork", "child_after_fork",
           "set_title", "DRAIN_IDLE_GRACE", "MASTER_SIGNALS", "STACK_SIGNAL", "become",
           "forget_unfinished_imports"]

import faulthandler
import gc
import importlib._bootstrap
import os
import signal
import sys
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

import setproctitle

from . import log, privileges
from .board import Slot
from .config import Config

# A stopping worker closes a session only after it has been idle this long, so that a session
# just accepted, or one whose QUIT is on the way, is still served.
DRAIN_IDLE_GRACE = 2.0
# Sent by the master to a hung worker just before SIGKILL: the worker writes the Python stack
# of each of its threads to stderr (faulthandler, from C: it works while the worker is stuck in
# a system call or a lock), so the log says where it hung.
STACK_SIGNAL = signal.SIGUSR2
MASTER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
                  signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)


@dataclass
class WorkerContext:
    cfg: Config
    kind: str          # smtp or scanner
    number: int        # 1..N within the pool, shown in ps
    generation: int    # bumped by each reload
    slot: Slot
    socks: tuple       # the inherited listening sockets of the pool (SMTP: one per address)
    anvil: object = None  # SMTP workers: their end of the socketpair to the master's anvil


class Limits(NamedTuple):
    line_length_limit: int
    message_size_limit: int
    max_recipients: int
    timeout: float
    per_record_deadline: bool = False  # smtp.per_record_deadline
    min_data_rate: int = 0             # smtp.min_data_rate, bytes/s


def limits_for(cfg: Config, size_slack: int = 0) -> Limits:
    return Limits(cfg.smtp.line_length_limit, cfg.smtp.message_size_limit + size_slack,
                  cfg.smtp.max_recipients, cfg.smtp.timeout, cfg.smtp.per_record_deadline,
                  cfg.smtp.min_data_rate)


_early: list[int] = []


def fork() -> int:
    """os.fork with the master's signals held until the child has its own handlers
    (`child_after_fork`): a signal sent to a worker just forked (a retire by the max_rss check,
    a reload) would otherwise find the master's handler, which writes the signal to the
    master's wakeup pipe, or a default action that kills the worker."""
    # What the master holds now stays out of its own garbage collections from here on: a
    # full collection (a storm's allocations bring one) writes to every object it walks and
    # so copies each page the new worker shares with the master. Frozen objects are still
    # freed when nothing refers to them; the cycles that are garbage now are collected first
    # (it walks only what came since the last fork's freeze).
    gc.collect()
    gc.freeze()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return pid


def forget_unfinished_imports() -> None:
    """A module another thread of the master was importing at the fork (the cluster monitor's
    first round imports encodings.idna; a metrics scrape imports too) is half-initialized in
    the child, and its import lock is held by a thread the child does not have: the child's
    first import of it would wait for ever (workers were killed as hung, their stacks in
    `_lock_unlock_module`). Forget both, so that the child imports it afresh."""
    for name, module in list(sys.modules.items()):
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            del sys.modules[name]
    locks = getattr(importlib._bootstrap, "_module_locks", None)  # CPython's importlib
    if locks is not None:
        locks.clear()  # this process has one thread now: every lock held was another's


def child_after_fork(close_fds: list[int]) -> None:
    """The first thing a worker does (forked by `fork`, its signals held)."""
    forget_unfinished_imports()
    # What came from the master stays out of this process's garbage collections: a
    # collection would write to every object it walks, and copy the master's pages.
    gc.freeze()
    signal.set_wakeup_fd(-1)
    for sig in MASTER_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C in a terminal reaches the whole process group; the master decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A signal that arrives before the worker's own handlers are in place (a reload, a
    # max_rss check or a log rotation just after the fork) is kept and replayed by
    # WorkerProcess.run, instead of killing the worker by its default action.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: _early.append(signum))
    signal.signal(signal.SIGQUIT, lambda signum, frame: os._exit(0))
    faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)  # what came meanwhile, now


def become(main, ctx: WorkerContext, close_fds: list[int], logger) -> NoReturn:
    """The forked child: set up (`child_after_fork`), run the worker, exit with its status;
    never returns into the master's code."""
    code = 1
    try:
        child_after_fork(close_fds)
        code = main(ctx) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logger.exception("%s worker %d failed", ctx.kind, ctx.number)
    finally:
        try:  # the lines still waiting get a last chance; the master folds the count in
            log.drain()
            ctx.slot.add("log_dropped", log.take_dropped())
        finally:
            os._exit(code)


def set_title(title: str) -> None:
    setproctitle.setproctitle(title)


class WorkerProcess:
    """One worker's life; subclasses set `kind` and override `init_process`, `on_signal`,
    `handle_term` and `serve`."""

    kind = ""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.master_pid = os.getppid()
        self.log = log.get(ctx.kind)
        self.title = ""

    @classmethod
    def main(cls, ctx: WorkerContext) -> int:
        return cls(ctx).run()

    def run(self) -> int:
        self.init_process()
        privileges.drop(self.cfg.master.ids)  # before the first client, for good
        self.on_signal(signal.SIGTERM, self.handle_term)
        self.on_signal(signal.SIGQUIT, lambda *_: os._exit(0))
        self.on_signal(signal.SIGUSR1, lambda *_: log.reopen())
        for signum in dict.fromkeys(_early):  # signals that came before our handlers
            os.kill(os.getpid(), signum)
        return self.serve() or 0

    def init_process(self) -> None:
        """What must happen in the child, after the fork."""

    def on_signal(self, signum: int, handler) -> None:
        signal.signal(signum, lambda s, f: handler())

    def handle_term(self) -> None:
        raise NotImplementedError

    def serve(self) -> int:
        raise NotImplementedError

    def notify(self) -> None:
        """The heartbeat: stamp the slot, write the log lines that wait and count the ones
        dropped; a worker whose master died drains and exits."""
        self.ctx.slot.beat()
        log.flush()
        self.ctx.slot.add("log_dropped", log.take_dropped())
        if os.getppid() != self.master_pid:
            self.master_pid = os.getppid()
            self.log.warning("%s %d: the master is gone -- draining and exiting", self.kind,
                             self.ctx.number)
            self.handle_term()

    def show(self, load: str) -> None:
        title = f"poolmgr: {self.kind} {self.ctx.number} [{load}]"
        if title != self.title:
            set_title(title)
            self.title = title
