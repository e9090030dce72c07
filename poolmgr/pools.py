"""A pool of one kind of worker, and the one sizing rule between the two pools.

One `Pool` class serves both pools; they differ only by kind, the worker's `main` and config.
A pool has a floor (where manual resizes and `min_workers` put it), a ceiling (`max_workers`)
and a target the master converges to.

The sizing rule lives in `fit` and nowhere else: each pool within its floor and ceiling, and
never more scanner workers than SMTP workers (the SMTP pool rises to the scanner pool; the
scanner pool's ceiling is the SMTP pool's). Without an SMTP pool (scanner-only mode, behind
Postfix's content_filter: its ceiling is 0) the SMTP listeners of the rule are Postfix's: the
scanner pool's ceiling is the feeder's concurrency (`scanner.feeder_maxproc`, the maxproc of
Postfix's `scan` transport), folded in by `configured_bounds`, and the SMTP pool stays at 0.
Every path that sizes the pools goes through it:
the config's start-up floors (`Config.bounds`), `resize` (ctl and TTIN/TTOU), reload, and the
autoscaler (`autoscale.decide`, whose calm size is `calm_size`); `broken` names what a pair of
sizes breaks, for the autoscaler's self-check and the bench.
"""

__all__ = ["Pool", "Worker", "Vigil", "Bounds", "fit", "calm_size", "broken", "configured_bounds",
           "bounds_of", "set_bounds", "resize", "RUNNING", "DRAINING", "PoolView", "WorkerView"]

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import psutil

RUNNING, DRAINING = "running", "draining"
STARTUP_WINDOW = 5.0  # a worker that fails within this many seconds failed at start-up
MAX_BACKOFF = 60.0
# Out of processes, memory or files at fork: retry after 1s, doubling up to 30s (Postfix's
# master throttles a service whose fork fails instead of exiting).
FORK_RETRY_MIN, FORK_RETRY_MAX = 1.0, 30.0


@dataclass
class Worker:
    pid: int
    kind: str
    number: int
    generation: int
    slot: int
    started: float = field(default_factory=time.monotonic)
    state: str = RUNNING
    term_at: float | None = None
    killed_at: float | None = None  # when murder() found it hung (its stack was asked for)
    kill_sent: bool = False  # SIGKILL sent


class Pool:
    def __init__(self, kind: str, floor: int, ceiling: int, main: Callable):
        self.kind = kind
        self.floor = floor
        self.ceiling = ceiling
        self.target = floor
        self.main = main
        self.workers: dict[int, Worker] = {}
        self.totals: Counter = Counter()  # counters of workers that have exited
        self.failures = 0
        self.backoff_until = 0.0
        self.fork_delay = 0.0  # the last retry delay after a failed fork

    def running(self) -> list[Worker]:
        return sorted((w for w in self.workers.values() if w.state == RUNNING),
                      key=lambda w: w.started)

    def free_number(self) -> int:
        taken = {w.number for w in self.running()}
        return next(n for n in range(1, len(taken) + 2) if n not in taken)

    def note_exit(self, worker: Worker, code: int, now: float) -> float:
        """Record an exit; returns the back-off delay (0 when the exit was not a failure)."""
        failed = worker.state == RUNNING and code != 0
        if failed and now - worker.started < STARTUP_WINDOW:
            self.failures += 1
            delay = min(MAX_BACKOFF, 0.5 * 2 ** self.failures)
            self.backoff_until = now + delay
            return delay
        if not failed:
            self.failures = 0
        return 0.0

    def view(self, read, now: float) -> "PoolView":
        """The pool as status reads it, each worker's board slot read once (`read`)."""
        return PoolView(self.target, self.floor, self.ceiling, self.backoff_until > now,
                        self.totals, [WorkerView(w, read(w.slot)) for w in self.workers.values()])

    def stack_written(self, now: float, wait: float, since: float = 0.0) -> list[Worker]:
        """Hung workers asked for their stack `wait` seconds ago or more (counted from
        `since` at the earliest: the master's `Vigil`), not yet killed; each is marked
        killed."""
        due = [w for w in self.workers.values() if w.killed_at is not None and
               not w.kill_sent and now - max(w.killed_at, since) >= wait]
        for worker in due:
            worker.kill_sent = True
        return due

    def hung(self, read, now: float, timeout: float, busy_extra: float,
             grace: float, since: float = 0.0) -> list[tuple[Worker, str]]:
        """Workers to kill, with why: no heartbeat for `timeout` (plus `busy_extra` while busy
        with a message), or still draining `grace` after being retired; both counted from
        `since` at the earliest (the master's `Vigil`). `read` is the board's (slot -> its
        fields)."""
        found = []
        for worker in self.workers.values():
            if worker.killed_at is not None:
                continue
            info = read(worker.slot)
            age = now - max(info["heartbeat"], since)
            if age > timeout + (busy_extra if info["busy"] else 0):
                found.append((worker, f"no heartbeat for {age:.0f}s"))
            elif worker.state == DRAINING and now - max(worker.term_at, since) > grace:
                found.append((worker, "still draining"))
        return found

    def fork_failed(self, now: float) -> float:
        """A fork (or its socketpair) failed: wait before the next, 1s doubling to 30s."""
        self.fork_delay = min(FORK_RETRY_MAX, 2 * self.fork_delay or FORK_RETRY_MIN)
        self.backoff_until = max(self.backoff_until, now + self.fork_delay)
        return self.fork_delay

    def over_rss(self, limit: int) -> list[tuple[Worker, int]]:
        """Running workers whose resident memory is over `limit` bytes (0: no limit)."""
        fat = []
        for worker in self.running() if limit else ():
            try:
                rss = psutil.Process(worker.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > limit:
                fat.append((worker, rss))
        return fat

    def set_limits(self, floor: int, ceiling: int) -> None:
        self.ceiling = ceiling
        self.floor = max(min(1, ceiling), min(floor, ceiling))  # ceiling 0: no pool
        self.target = max(self.floor, min(self.target, ceiling))


class Vigil:
    """Whether the master itself ran: a master that was stopped, or whose VM was paused (the
    monotonic clock may jump then), finds every heartbeat old when it runs again, though no
    worker was due to beat. `watch` at each check: after a gap over
    `limit` it logs one warning, and heartbeats and drains count from then (`since`)."""

    def __init__(self, log):
        self.log, self.seen, self.since = log, None, 0.0

    def watch(self, now: float, limit: float) -> None:
        gap, self.seen = now - (self.seen or now), now
        if gap > limit:
            self.since = now
            self.log.warning("master: did not run for %.0fs (stopped, or its VM paused): "
                             "heartbeats count from now", gap)


@dataclass
class WorkerView:
    """One worker: the master's record of it and its board slot (`Board.read`), read once."""
    worker: Worker
    board: dict


@dataclass
class PoolView:
    target: int
    floor: int
    ceiling: int
    throttled: bool           # a start-up crash loop is being backed off
    totals: Counter           # counters of the workers that have exited
    workers: list[WorkerView]

    def running(self) -> list[WorkerView]:
        return [w for w in self.workers if w.worker.state == RUNNING]

    def counters(self) -> Counter:
        """Cumulative counters of the pool: exited workers' totals plus the live slots."""
        counters = Counter(self.totals)
        for view in self.workers:
            counters.update(view.board["counters"])
        return counters


@dataclass(frozen=True)
class Bounds:
    """Floors and ceilings of both pools; an SMTP ceiling of 0 means no SMTP pool."""
    smtp_floor: int
    smtp_ceiling: int
    scanner_floor: int
    scanner_ceiling: int

    @property
    def scanner_only(self) -> bool:
        """No SMTP pool of its own: Postfix (content_filter) feeds the scanner pool."""
        return self.smtp_ceiling == 0


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))


def fit(smtp: int, scanner: int, bounds: Bounds) -> tuple[int, int]:
    """THE sizing rule: the sizes nearest to (smtp, scanner) that keep it.

    Each pool stays within its floor and ceiling; scanner workers never outnumber SMTP workers
    (every hand-off needs an SMTP worker to wait on it): the scanner pool is capped at the SMTP
    ceiling and the SMTP pool rises to the scanner pool, never the other way round. Without an
    SMTP pool the feeder's concurrency is the scanner ceiling already (`configured_bounds`).
    """
    if bounds.scanner_only:
        return 0, _clamp(scanner, bounds.scanner_floor, bounds.scanner_ceiling)
    scanner = _clamp(scanner, bounds.scanner_floor,
                     min(bounds.scanner_ceiling, bounds.smtp_ceiling))
    return _clamp(max(smtp, scanner), bounds.smtp_floor, bounds.smtp_ceiling), scanner


def calm_size(scanner: int, bounds: Bounds) -> int:
    """The SMTP pool's size when calm: its floor, and never fewer than the scanner pool."""
    return fit(bounds.smtp_floor, scanner, bounds)[0]


def broken(smtp: int, scanner: int, bounds: Bounds, calm_ratio: float = 0.0) -> list[str]:
    """What (smtp, scanner) breaks of the rule, empty when it holds; with `calm_ratio` also
    the calm limit: SMTP <= max(SMTP floor, calm_ratio x scanner)."""
    out = []
    if not bounds.smtp_floor <= smtp <= bounds.smtp_ceiling:
        out.append(f"smtp {smtp} outside [{bounds.smtp_floor}, {bounds.smtp_ceiling}]")
    if not bounds.scanner_floor <= scanner <= bounds.scanner_ceiling:
        out.append(f"scanner {scanner} outside "
                   f"[{bounds.scanner_floor}, {bounds.scanner_ceiling}]")
    if fit(smtp, scanner, bounds)[0] > smtp:
        out.append(f"scanner {scanner} > smtp {smtp}")
    if calm_ratio and smtp > max(bounds.smtp_floor, calm_ratio * scanner):
        out.append(f"calm with smtp {smtp} > {calm_ratio:g} x scanner {scanner}")
    return out


def configured_bounds(smtp_min: int, smtp_max: int, scanner_min: int, scanner_max: int,
                      feeder_maxproc: int = 0) -> Bounds:
    """The bounds at start from min_workers and max_workers as configured, fitted to the rule
    (the SMTP floor raised to the scanner floor, the scanner ceiling capped at the SMTP one).
    `smtp_max` 0: no SMTP pool (both its bounds 0). `feeder_maxproc` (0: none) caps the
    scanner pool: Postfix never opens more connections to it than its transport's maxproc."""
    if smtp_max == 0:
        smtp_min = 0
    if feeder_maxproc:
        scanner_max = min(scanner_max, feeder_maxproc)
        scanner_min = min(scanner_min, scanner_max)
    asked = Bounds(smtp_min, smtp_max, scanner_min, scanner_max)
    smtp_floor, scanner_floor = fit(smtp_min, scanner_min, asked)
    return Bounds(smtp_floor, smtp_max, scanner_floor, fit(smtp_max, scanner_max, asked)[1])


def bounds_of(pools: dict[str, "Pool"]) -> Bounds:
    smtp, scanner = pools["smtp"], pools["scanner"]
    return Bounds(smtp.floor, smtp.ceiling, scanner.floor, scanner.ceiling)


def set_bounds(pools: dict[str, "Pool"], new: Bounds, old: Bounds) -> None:
    """New bounds (a reload): a floor the config changed is taken, a manual one is kept; then
    floors and targets are fitted to the rule."""
    for kind in ("smtp", "scanner"):
        pool = pools[kind]
        floor, was = getattr(new, f"{kind}_floor"), getattr(old, f"{kind}_floor")
        pool.set_limits(floor if floor != was else pool.floor, getattr(new, f"{kind}_ceiling"))
    smtp, scanner = pools["smtp"], pools["scanner"]
    smtp.floor, scanner.floor = fit(smtp.floor, scanner.floor, bounds_of(pools))
    smtp.target, scanner.target = fit(smtp.target, scanner.target, bounds_of(pools))


def resize(pools: dict[str, Pool], kind: str, spec: str) -> tuple[bool, str]:
    """Apply `N`, `+N` or `-N` to a pool's floor and target; (done, message).

    A manual size moves the floor, so only the ceilings and the rule limit it: a size that
    `fit` would change is refused, except that a scanner raise takes the SMTP pool with it."""
    if kind not in pools:
        return False, f"unknown pool {kind!r}: use smtp or scanner"
    if pools[kind].ceiling == 0:
        return False, (f"refused: no {kind} pool (scanner-only mode: smtp.listen = [] or "
                       f"smtp.max_workers = 0)")
    match = re.fullmatch(r"\s*([+-]?)(\d+)\s*", spec)
    if not match:
        return False, f"bad size {spec!r}: use N, +N or -N"
    pool, smtp, scanner = pools[kind], pools["smtp"], pools["scanner"]
    sign, amount = match.group(1), int(match.group(2))
    old = pool.target
    new = old + amount if sign == "+" else old - amount if sign == "-" else amount
    if new < 1:
        return False, f"refused: the {kind} pool needs at least 1 worker (asked for {new})"
    if new > pool.ceiling:
        return False, (f"refused: {kind} {new} is above the pool's ceiling {pool.ceiling} "
                       f"({kind}.max_workers"
                       + (" or scanner.feeder_maxproc)" if smtp.ceiling == 0 else ")"))
    manual = Bounds(1, smtp.ceiling, 1, scanner.ceiling)
    if kind == "smtp":
        if fit(new, scanner.target, manual)[0] != new:
            return False, (f"refused: {new} SMTP workers would be fewer than the "
                           f"{scanner.target} scanner workers (rule: scanner workers <= SMTP "
                           f"workers); lower the scanner pool first")
        smtp.floor = smtp.target = new
        return True, f"smtp pool {old} -> {new} workers"
    new_smtp, fitted = fit(smtp.target, new, manual)
    if fitted != new:
        return False, (f"refused: scanner {new} needs as many SMTP workers, above the SMTP "
                       f"ceiling {smtp.ceiling} (smtp.max_workers)")
    extra = ""
    if new_smtp != smtp.target:
        extra = f"; smtp pool raised {smtp.target} -> {new_smtp} with it (rule: scanner <= smtp)"
        smtp.floor = smtp.target = new_smtp
    scanner.floor = scanner.target = new
    return True, f"scanner pool {old} -> {new} workers{extra}"
