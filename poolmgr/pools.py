"""A pool of one kind of worker, and the sizing rule between the two pools.

One `Pool` class serves both pools; they differ only by kind, the worker's `main` and config.
A pool has a floor (where manual resizes and `min_workers` put it), a ceiling (`max_workers`)
and a target the master converges to. `resize` applies `N`, `+N` or `-N` to a pool while
keeping the rule: never more scanner workers than SMTP workers.

Exports: Pool, Worker, resize, RUNNING, DRAINING.
"""

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

RUNNING, DRAINING = "running", "draining"
STARTUP_WINDOW = 5.0  # a worker that fails within this many seconds failed at start-up
MAX_BACKOFF = 60.0


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
    killed_at: float | None = None


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

    def set_limits(self, floor: int, ceiling: int) -> None:
        self.ceiling = ceiling
        self.floor = max(1, min(floor, ceiling))
        self.target = max(self.floor, min(self.target, ceiling))


def resize(pools: dict[str, Pool], kind: str, spec: str) -> tuple[bool, str]:
    """Apply `N`, `+N` or `-N` to a pool's floor and target; (done, message)."""
    if kind not in pools:
        return False, f"unknown pool {kind!r}: use smtp or scanner"
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
                       f"({kind}.max_workers)")
    extra = ""
    if kind == "smtp" and new < scanner.target:
        return False, (f"refused: {new} SMTP workers would be fewer than the {scanner.target} "
                       f"scanner workers (rule: scanner workers <= SMTP workers); "
                       f"lower the scanner pool first")
    if kind == "scanner" and new > smtp.target:
        if new > smtp.ceiling:
            return False, (f"refused: scanner {new} needs as many SMTP workers, above the SMTP "
                           f"ceiling {smtp.ceiling} (smtp.max_workers)")
        extra = f"; smtp pool raised {smtp.target} -> {new} with it (rule: scanner <= smtp)"
        smtp.floor = smtp.target = new
    pool.floor = pool.target = new
    return True, f"{kind} pool {old} -> {new} workers{extra}"
