"""`poolmgr top`: a live terminal view of the pools, refreshed every second; `q` quits.

`frame` turns two successive status snapshots into the lines shown (pure, so `--once` and the
curses loop print the same thing); `run` is the curses loop around it.
"""

__all__ = ["frame", "run"]

import curses
import time
from typing import Callable

from .status import Status

BAR = 20


def _bar(fraction: float) -> str:
    filled = max(0, min(BAR, round(fraction * BAR)))
    return "[" + "#" * filled + "." * (BAR - filled) + f"] {fraction * 100:3.0f}%"


def _rate(now: dict, before: dict | None, key: str, seconds: float) -> float:
    if before is None or seconds <= 0:
        return 0.0
    return max(0, now.get(key, 0) - before.get(key, 0)) / seconds


def frame(status: Status, before: Status | None = None, seconds: float = 1.0) -> list[str]:
    master, pools = status.master, status.pools
    smtp, scanner = pools["smtp"], pools["scanner"]
    auto, stress = status.autoscale, status.stress
    clock = time.strftime("%H:%M:%S")
    lines = [f"poolmgr top -- master pid {master.pid}, up {master.uptime:.0f}s, "
             f"generation {master.generation}, {master.state}    {clock}   (q quits)"]
    phase = auto.phase if auto.enabled else "off"
    since = time.strftime("%H:%M:%S", time.localtime(auto.since))
    lines.append(f"autoscale {phase} since {since}; pressure {auto.pressure:.2f}, "
                 f"accept queue {auto.backlog}/{auto.backlog_max}; stress "
                 + (f"on ({stress.source})" if stress.on else "off"))
    lines.append("")
    lines.append(f"{'pool':<8} {'workers':>9} {'target':>6} {'floor':>5} {'ceiling':>7} "
                 f"{'load':>9}  occupancy")
    scanner_only = status.scanner.scanner_only
    if scanner_only:  # Postfix's smtpd holds the sessions; its content_filter feeds the pool
        feeder = status.scanner.feeder_maxproc
        lines.append(f"{'smtp':<8} {'none':>9}  scanner-only, fed by Postfix (feeder_maxproc "
                     f"{feeder if feeder else 'not set'})")
    else:
        lines.append(f"{'smtp':<8} {smtp.workers:>4}+{smtp.draining:<4} {smtp.target:>6} "
                     f"{smtp.floor:>5} {smtp.ceiling:>7} {smtp.sessions:>9}  "
                     f"{_bar(smtp.sessions / (smtp.slots or 1))}")
    lines.append(f"{'scanner':<8} {scanner.workers:>4}+{scanner.draining:<4} "
                 f"{scanner.target:>6} {scanner.floor:>5} {scanner.ceiling:>7} "
                 f"{scanner.busy:>9}  {_bar(scanner.busy / (scanner.workers or 1))}")
    lines.append("")
    # Traffic: the SMTP pool's, or the scanner pool's when only Postfix feeds it.
    kind, done = ("scanner", "scanned") if scanner_only else ("smtp", "messages_accepted")
    counters = pools[kind].counters
    old = before.pools[kind].counters if before else None
    totals = f"scanned {counters.get('scanned', 0)}" if scanner_only else (
        f"accepted {counters.get('messages_accepted', 0)}, rejected "
        f"{counters.get('messages_rejected', 0)}, deferred "
        f"{counters.get('messages_tempfailed', 0)}")
    lines.append(f"connections/s {_rate(counters, old, 'connections', seconds):7.1f}   "
                 f"messages/s {_rate(counters, old, done, seconds):6.1f}   {totals}")
    nuisance = status.nuisance
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(
        nuisance.by_reason.items(), key=lambda kv: -kv[1])[:6]) or "none"
    lines.append(f"nuisance ratio {nuisance.ratio:.2f} over {nuisance.window:g}s ({reasons})")
    lines.append(status.scanner.summary())
    lines.append("")
    lines.append("last decisions:")
    for entry in auto.decisions[-8:]:
        stamp = time.strftime("%H:%M:%S", time.localtime(entry.time))
        lines.append(f"  {stamp} {entry.decision}")
    return lines


def run(fetch: Callable[[], Status], interval: float = 1.0) -> int:
    """The live view; `fetch` returns a status snapshot."""
    def loop(screen) -> int:
        curses.curs_set(0)
        screen.timeout(int(interval * 1000))
        before, taken = None, time.monotonic()
        while True:
            status = fetch()
            now = time.monotonic()
            lines = frame(status, before, now - taken)
            before, taken = status, now
            screen.erase()
            height, width = screen.getmaxyx()
            for row, line in enumerate(lines[:height - 1]):
                screen.addnstr(row, 0, line, width - 1)
            screen.refresh()
            key = screen.getch()
            if key in (ord("q"), ord("Q"), 27):
                return 0

    try:
        return curses.wrapper(loop)
    except KeyboardInterrupt:
        return 0
