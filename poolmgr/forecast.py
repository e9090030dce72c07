"""What a recommended config will do under the load a bench run (or a mail log) offered.

`poolmgr plan` recommends pool sizes; this module says what the pools will then do, so that a
second bench run can check it (the loop: `poolmgr plan --bench first.json --write-config
FILE`, `poolmgr bench run SCENARIO --config FILE`, `poolmgr plan --bench first.json --check
second.json`). `peak` is the most sessions open at once, found by sweeping the sessions' start
and end events (not an average); `by_profile` shows it per client profile beside Little's law
(sessions open = arrival rate x mean hold); `simulate` replays the sessions open at each
`autoscale.interval` through the autoscaler itself (`autoscale.decide`: storm entry at
`storm_enter_occupancy` while the nuisance ratio is high, `step` workers per interval, the
one sizing rule, the scanner pool by busyness) with the recommended bounds, and returns the
peak pool sizes it reaches. `measured` reads the same figures from a bench result; `compare`
gives the error of each, and a forecast holds when every error is within TOLERANCE.
"""

__all__ = ["TOLERANCE", "Forecast", "peak", "by_profile", "simulate", "forecast", "sizes_of",
           "sizes_of_bench", "measured", "compare", "render", "render_check", "config_text"]

import bisect
from collections import defaultdict
from dataclasses import dataclass

from . import config
from .autoscale import Snapshot, State, decide
from .plan import Session
from .pools import Bounds, configured_bounds, fit

TOLERANCE = 0.20   # the bar: predicted within 20% of what the second run measures
MAX_TICKS = 200_000  # a longer log is simulated around its peak (two days at 1 s)


@dataclass
class Forecast:
    peak_sessions: int
    peak_at: float                # when (seconds from the first session)
    smtp_workers: int             # the autoscaler's peak SMTP pool
    scanner_workers: int          # and scanner pool
    config: dict                  # [smtp] and [scanner] sizes forecast with
    lines: list[str]


def peak(sessions: list[Session]) -> tuple[int, float]:
    """(most sessions open at once, when): a sweep over start (+1) and end (-1) events; a
    session that ends when another starts is not open beside it."""
    events = sorted([(s.end, -1) for s in sessions] + [(s.start, 1) for s in sessions])
    live = best = 0
    when = events[0][0] if events else 0.0
    for at, step in events:
        live += step
        if live > best:
            best, when = live, at
    return best, when


def _open_at(sessions: list[Session]):
    """A function t -> sessions open at t (started at or before t, ending after it)."""
    starts = sorted(s.start for s in sessions)
    ends = sorted(s.end for s in sessions)
    return lambda t: bisect.bisect_right(starts, t) - bisect.bisect_right(ends, t)


def by_profile(sessions: list[Session], at: float) -> list[str]:
    """Per profile (a bench client's, or a log's nuisance reason), the sessions open at `at`
    beside Little's law over the arrivals in the mean hold before it."""
    groups: dict[str, list[Session]] = defaultdict(list)
    for s in sessions:
        groups["legit" if s.legit else s.reason or "nuisance"].append(s)
    lines = []
    for name, group in sorted(groups.items(), key=lambda g: -len(g[1])):
        now = sum(1 for s in group if s.start <= at < s.end)
        hold = sum(s.hold for s in group) / len(group)
        window = max(1.0, hold)
        rate = sum(1 for s in group if at - window < s.start <= at) / window
        lines.append(f"  {name}: {now} open; Little's law: {rate:.2f}/s over the last "
                     f"{window:.0f}s x mean hold {hold:.1f}s = {rate * hold:.0f}")
    return lines


def simulate(sessions: list[Session], bounds: Bounds, per_worker: int, rules,
             scan_seconds: float, backlog: int) -> tuple[int, int, list[str]]:
    """(peak SMTP workers, peak scanner workers, decisions) of the autoscaler under the
    sessions' load: each interval it sees the sessions open (as many as the running workers'
    slots hold; the rest wait in the accept queue, up to `backlog`), the share of them that
    is nuisance, and the scanner workers busy with a hand-off (each handed-off session keeps
    one busy for its last `scan_seconds`). New workers take their sessions from the next
    interval on."""
    if not sessions:
        return bounds.smtp_floor, bounds.scanner_floor, []
    interval = rules.interval
    open_at = _open_at(sessions)
    legit_at = _open_at([s for s in sessions if s.legit])
    handoffs = [s for s in sessions if s.data]
    scanning_at = _open_at([Session(s.end - scan_seconds, s.end, True) for s in handoffs])
    done = sorted(s.end for s in handoffs)
    first, last = sessions[0].start, max(s.end for s in sessions)
    ticks = int((last - first) / interval) + 1
    if ticks > MAX_TICKS:  # the window around the peak
        first = max(first, peak(sessions)[1] - MAX_TICKS * interval / 2)
        ticks = MAX_TICKS
    smtp, scanner = fit(bounds.smtp_floor, bounds.scanner_floor, bounds)
    state, high_smtp, high_scanner, decisions = State(), smtp, scanner, []
    before = None  # sessions held an interval ago: the growth the master sees
    for k in range(ticks):
        now = first + k * interval
        live, slots = open_at(now), smtp * per_worker
        held = min(live, slots)
        demand = scanning_at(now)
        finished = bisect.bisect_right(done, now) - bisect.bisect_right(done, now - interval)
        snap = Snapshot(
            now=now, smtp=smtp, scanner=scanner, smtp_floor=bounds.smtp_floor,
            smtp_ceiling=bounds.smtp_ceiling, scanner_floor=bounds.scanner_floor,
            scanner_ceiling=bounds.scanner_ceiling, sessions=held, slots=slots,
            accept_queue=min(live - held, backlog), listen_backlog=backlog,
            nuisance_ratio=(live - legit_at(now)) / live if live else 0.0,
            scanner_busy=min(demand, scanner), handoff_queue=max(0, demand - scanner),
            handoff_wait=scan_seconds * max(1.0, demand / scanner) if finished else 0.0,
            growth=(held - before) / interval if before is not None else 0.0,
            per_worker=per_worker)
        before = held
        smtp, scanner, state, taken = decide(snap, state, rules)
        decisions += [f"t={now - sessions[0].start:.0f}s: {d}" for d in taken]
        high_smtp, high_scanner = max(high_smtp, smtp), max(high_scanner, scanner)
    return high_smtp, high_scanner, decisions


def forecast(sessions: list[Session], sizes: dict, scan_seconds: float,
             cfg: config.Config | None = None) -> Forecast:
    """The forecast for pool `sizes` ({"smtp": {min_workers, max_workers,
    max_sessions_per_worker}, "scanner": {min_workers, max_workers}}), with the autoscaler's
    settings and the listen backlog of `cfg` (default: poolmgr's defaults)."""
    cfg = cfg or config.load(None)
    smtp, scanner = sizes["smtp"], sizes["scanner"]
    bounds = configured_bounds(smtp["min_workers"], smtp["max_workers"],
                               scanner["min_workers"], scanner["max_workers"])
    top, at = peak(sessions)
    first = sessions[0].start if sessions else 0.0
    per_worker = smtp["max_sessions_per_worker"]
    smtp_peak, scanner_peak, decisions = simulate(sessions, bounds, per_worker, cfg.autoscale,
                                                  scan_seconds, cfg.smtp.listen_backlog)
    lines = [f"peak concurrent sessions: {top} at t={at - first:.0f}s (sweep over the "
             f"sessions' starts and ends), by profile:", *by_profile(sessions, at),
             f"autoscaler replayed over the load with SMTP {bounds.smtp_floor}.."
             f"{bounds.smtp_ceiling} x {per_worker} sessions, scanner {bounds.scanner_floor}.."
             f"{bounds.scanner_ceiling}, {scan_seconds:g}s per hand-off: peak "
             f"{smtp_peak} SMTP workers, {scanner_peak} scanner workers "
             f"({len(decisions)} decisions)"]
    lines += [f"  {d}" for d in decisions[:8]] + (["  ..."] if len(decisions) > 8 else [])
    return Forecast(top, round(at - first, 1), smtp_peak, scanner_peak,
                    {"smtp": dict(smtp), "scanner": dict(scanner)}, lines)


def sizes_of(plan: dict, per_worker: int) -> dict:
    """A plan's recommended pool sizes as [smtp] and [scanner] settings."""
    return {"smtp": {**plan["smtp"], "max_sessions_per_worker": per_worker},
            "scanner": dict(plan["scanner"])}


def sizes_of_bench(result: dict) -> dict:
    """The pool sizes a bench run ran with (its scenario's [server], or --config)."""
    server = result["scenario"]["server"]
    return {"smtp": {"min_workers": server["smtp_workers"],
                     "max_workers": max(server["smtp_workers"], server["smtp_max_workers"]),
                     "max_sessions_per_worker": server["max_sessions_per_worker"]},
            "scanner": {"min_workers": server["scanner_workers"],
                        "max_workers": max(server["scanner_workers"],
                                           server.get("scanner_max_workers", 4))}}


def measured(result: dict) -> dict:
    """What a bench run measured of the forecast figures."""
    f = result["figures"]
    return {"peak_sessions": f["peak_sessions_held"],
            "smtp_workers": f.get("peak_smtp_workers"),
            "scanner_workers": max((s.get("scanner_workers", 0)
                                    for s in result.get("server_series", [])), default=None)}


FIGURES = (("peak_sessions", "peak concurrent sessions"), ("smtp_workers", "peak SMTP workers"),
           ("scanner_workers", "peak scanner workers"))


def compare(predicted: Forecast, seen: dict) -> tuple[list[dict], bool]:
    """Each figure predicted and measured with the error in % of the measured value; and
    whether every error is within TOLERANCE."""
    rows = []
    for key, label in FIGURES:
        want, got = getattr(predicted, key), seen.get(key)
        error = None if not got else (want - got) / got
        rows.append({"figure": key, "label": label, "predicted": want, "measured": got,
                     "error_pct": None if error is None else round(100 * error, 1)})
    ok = all(r["error_pct"] is not None and abs(r["error_pct"]) <= 100 * TOLERANCE
             for r in rows)
    return rows, ok


def render(predicted: Forecast, sizes: str = "the recommended sizes") -> list[str]:
    return ["", f"forecast with {sizes}:", *predicted.lines]


def render_check(rows: list[dict], ok: bool) -> list[str]:
    out = [f"{'figure':<26} {'predicted':>9} {'measured':>9} {'error':>7}"]
    for r in rows:
        error = "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"
        out.append(f"{r['label']:<26} {r['predicted']:>9} {r['measured'] or '-':>9} "
                   f"{error:>7}")
    out.append(f"within {TOLERANCE:.0%}: {'yes' if ok else 'no'}")
    return out


def config_text(sizes: dict, source: str) -> str:
    """The pool sizes as a poolmgr config file (`poolmgr check` accepts it)."""
    lines = [f"# poolmgr plan: recommended pool sizes for the load of {source}"]
    for section in ("smtp", "scanner"):
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {config.toml_value(value)}" for key, value in
                  sizes[section].items()]
    return "\n".join(lines) + "\n"
