"""What a worker process gets from the master, and the worker side of process housekeeping.

`WorkerContext` is built by the master before fork and handed to the worker's `main`. The
helpers here run in the child right after fork: restore default signal dispositions (the
master's handlers only enqueue into the master's queue) and set the process title that `ps`
shows (`poolmgr: smtp worker 3 [412 sessions]`).

Exports: WorkerContext, Limits, limits_for, child_after_fork, replay_early_stop, set_title,
DRAIN_IDLE_GRACE.
"""

import os
import signal
from dataclasses import dataclass
from typing import NamedTuple

import setproctitle

from .board import Slot
from .config import Config

# A stopping worker closes a session only after it has been idle this long, so that a session
# just accepted, or one whose QUIT is on the way, is still served.
DRAIN_IDLE_GRACE = 2.0
MASTER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
                  signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD)


@dataclass
class WorkerContext:
    cfg: Config
    kind: str          # smtp or scanner
    number: int        # 1..N within the pool, shown in ps
    generation: int    # bumped by each reload
    slot: Slot
    sock: object       # the inherited listening socket
    anvil: object = None  # SMTP workers: their end of the socketpair to the master's anvil


class Limits(NamedTuple):
    line_length_limit: int
    message_size_limit: int
    max_recipients: int
    timeout: float


def limits_for(cfg: Config, size_slack: int = 0) -> Limits:
    return Limits(cfg.smtp.line_length_limit, cfg.smtp.message_size_limit + size_slack,
                  cfg.smtp.max_recipients, cfg.smtp.timeout)


_early_stop: list[int] = []


def child_after_fork(close_fds: list[int]) -> None:
    signal.set_wakeup_fd(-1)
    for sig in MASTER_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C in a terminal reaches the whole process group; the master decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker retired before its own handlers are in place (a reload or a max_rss check just
    # after the fork) still stops gracefully: SIGTERM is kept for replay_early_stop.
    signal.signal(signal.SIGTERM, lambda signum, frame: _early_stop.append(signum))
    signal.signal(signal.SIGQUIT, lambda signum, frame: os._exit(0))
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass


def replay_early_stop() -> None:
    """Called by a worker once its own SIGTERM handler is installed."""
    if _early_stop:
        os.kill(os.getpid(), signal.SIGTERM)


def set_title(title: str) -> None:
    setproctitle.setproctitle(title)
