"""The autoscaler: a pure function from a stats snapshot and the config to pool targets.

`decide(snapshot, state, cfg)` returns new targets for both pools, the new `State` and the
decisions taken, each with its reason; it does no I/O and reads no clock, so it is tested over
synthetic traces. The master calls it every `autoscale.interval` and applies the targets.

SMTP pool, by storm phase:
- calm: a storm is entered when pressure (the larger of session occupancy and accept-queue
  fill) reaches `storm_enter_occupancy` while the nuisance ratio is at least
  `storm_nuisance_ratio`, or at once, whatever the nuisance, when the pool's session slots
  would be gone within `lead_time` at the rate the live sessions grow (`ahead` >= 1; the net
  growth, so that many short sessions, a busy but calm hour, do not count);
- storm: while pressure stays at or above `storm_enter_occupancy` the pool grows by `step`
  workers per interval (twice that while the accept queue keeps growing), and while `ahead`
  is 1 or more by as many as the sessions expected within `lead_time` need, up to its
  ceiling. So the pool has free slots before its workers are full, a flood does not wait in
  the accept queue while the pool grows one worker at a time, and no more workers start than
  the sessions will fill (each costs its own memory). At
  the ceiling stress mode is asked for, and given back once pressure falls under
  `storm_exit_occupancy`. Pressure under `storm_exit_occupancy` for `cooldown` ends the storm;
- retreat: one worker is retired per interval (the master retires the oldest), none sooner than
  `min_worker_lifetime` after the pool last grew, until the pool is at its calm size: its
  floor, and at least as many workers as the scanner pool. A new storm interrupts the retreat.
Scanner pool, by legitimate volume: +1 when busyness or the hand-off wait has stayed high for
`scanner_grow_after`, -1 after `scanner_shrink_after` of low busyness; slow to shrink, since
a load-driven pool that flaps "goes bad all the way".
Without an SMTP pool (scanner-only mode, its ceiling 0: Postfix's content_filter feeds the
scanner pool) there is no pressure and no storm: only the scanner pool is sized, within a
ceiling that the feeder's maxproc caps (`pools.configured_bounds`).

Every size goes through the one sizing rule, `pools.fit` (each pool within its floor and
ceiling, scanner <= SMTP), and `check_rules` checks each decision against it plus, when calm,
SMTP <= max(SMTP floor, `calm_ratio` x scanner).

`Autoscaler` is what the master keeps of it between intervals, as one typed record: on or
off, `decide`'s `State`, the counters at the last interval (`Mark`, for the next interval's
differences), the last snapshot and the decisions `poolmgr status` shows. The master hands it
each interval's snapshot (`status.snapshot`) and applies the targets `Autoscaler.run` returns.
"""

__all__ = ["Snapshot", "State", "decide", "check_rules", "CALM", "STORM", "RETREAT", "Mark",
           "Autoscaler"]

import collections
import math
from dataclasses import dataclass, field

from .pools import Bounds, broken, calm_size, fit

CALM, STORM, RETREAT = "calm", "storm", "retreat"
DECISIONS_KEPT = 20  # the last decisions `poolmgr status` shows


@dataclass(frozen=True)
class Snapshot:
    now: float
    smtp: int                 # SMTP pool target (what the master converges to)
    scanner: int              # scanner pool target
    smtp_floor: int
    smtp_ceiling: int
    scanner_floor: int
    scanner_ceiling: int
    sessions: int = 0         # live SMTP sessions
    slots: int = 0            # running SMTP workers x max_sessions_per_worker
    accept_queue: int = 0     # connections waiting in the SMTP accept queue
    listen_backlog: int = 1   # the accept queue's length limit
    nuisance_ratio: float = 0.0
    scanner_busy: int = 0     # scanner workers busy with a message now
    handoff_wait: float = 0.0  # mean hand-off wait over the last interval, seconds
    handoff_queue: float = 0.0  # mean hand-offs waiting for a scanner worker, same interval
    growth: float = 0.0       # live SMTP sessions gained per second over the last interval
    per_worker: int = 0       # session slots of one SMTP worker (max_sessions_per_worker)

    @property
    def occupancy(self) -> float:
        return self.sessions / self.slots if self.slots else 0.0

    @property
    def pressure(self) -> float:
        return max(self.occupancy, self.accept_queue / max(1, self.listen_backlog))

    def ahead(self, lead_time: float) -> float:
        """Sessions in `lead_time` at the current growth, over the slots of the pool's target
        (workers asked for count as they start)."""
        capacity = self.smtp * self.per_worker
        if not capacity or lead_time <= 0:
            return 0.0
        return (self.sessions + max(0.0, self.growth) * lead_time) / capacity

    @property
    def bounds(self) -> Bounds:
        return Bounds(self.smtp_floor, self.smtp_ceiling, self.scanner_floor,
                      self.scanner_ceiling)


@dataclass(frozen=True)
class State:
    phase: str = CALM
    since: float = 0.0              # when the phase began
    quiet_since: float | None = None  # pressure under the exit mark since
    last_accept_queue: int = 0
    smtp_grown: float = float("-inf")
    scanner_changed: float = float("-inf")
    scanner_high_since: float | None = None
    scanner_low_since: float | None = None
    stress: bool = False            # stress mode asked for by the autoscaler


def decide(snap: Snapshot, state: State, cfg) -> tuple[int, int, State, list[str]]:
    """(smtp target, scanner target, new state, decisions) for one interval."""
    now, pressure, nuisance, bounds = snap.now, snap.pressure, snap.nuisance_ratio, snap.bounds
    smtp, scanner = fit(snap.smtp, snap.scanner, bounds)
    phase, since, quiet_since, stress = state.phase, state.since, state.quiet_since, state.stress
    smtp_grown, scanner_changed = state.smtp_grown, state.scanner_changed
    decisions: list[str] = []
    ahead = snap.ahead(cfg.lead_time)
    why = (f"occupancy {snap.occupancy:.2f}, backlog {snap.accept_queue}/{snap.listen_backlog}, "
           f"nuisance {nuisance:.2f}")
    if snap.growth > 0:
        why += f", sessions +{snap.growth:.0f}/s (ahead {ahead:.2f})"
    hot = pressure >= cfg.storm_enter_occupancy or ahead >= 1
    quiet = max(pressure, ahead) < cfg.storm_exit_occupancy
    if bounds.scanner_only:  # Postfix's smtpd holds the sessions: no pool here to storm
        hot, quiet = False, True

    # -- storm phases
    if phase != STORM and hot and (nuisance >= cfg.storm_nuisance_ratio or ahead >= 1):
        decisions.append(f"storm begins: {why}")
        phase, since, quiet_since = STORM, now, None
    elif phase == STORM:
        quiet_since = (quiet_since if quiet_since is not None else now) if quiet else None
        if quiet_since is not None and now - quiet_since >= cfg.cooldown:
            decisions.append(f"storm over after {now - since:.0f}s: pressure under "
                             f"{cfg.storm_exit_occupancy:g} for {cfg.cooldown:g}s; {why}")
            phase, since, quiet_since = RETREAT, now, None

    # -- SMTP pool
    old_smtp = smtp
    if phase == STORM and hot and smtp < snap.smtp_ceiling:
        step = 0
        if pressure >= cfg.storm_enter_occupancy:
            step = cfg.step * (2 if snap.accept_queue > state.last_accept_queue > 0 else 1)
        if ahead >= 1:  # room for the sessions lead_time brings
            step = max(step, 1, math.ceil(smtp * ahead) - smtp)
        smtp = min(snap.smtp_ceiling, smtp + step)
        decisions.append(f"smtp {old_smtp} -> {smtp}: {why}")
    elif phase == RETREAT:
        target = calm_size(scanner, bounds)
        if smtp > target and now - smtp_grown >= cfg.min_worker_lifetime:
            smtp -= 1
            decisions.append(f"smtp {old_smtp} -> {smtp}: retiring surplus workers; {why}")
        if smtp <= target:
            decisions.append(f"calm: smtp pool back at {smtp}")
            phase, since = CALM, now
    if smtp > old_smtp:
        smtp_grown = now

    # -- stress mode: at the ceiling under pressure; given back when pressure falls
    want_stress = stress
    if phase == STORM and hot and smtp >= snap.smtp_ceiling:
        want_stress = True
    elif quiet or phase != STORM:
        want_stress = False
    if want_stress != stress and cfg.stress:
        decisions.append(f"stress mode {'on' if want_stress else 'off'}: {why}")
        stress = want_stress

    # -- scanner pool: legitimate volume only. Hand-offs waiting for their turn count as busy
    # workers: each of them would keep one more busy.
    busy = (snap.scanner_busy + snap.handoff_queue) / scanner if scanner else 0.0
    high = busy >= cfg.scanner_busy_high or snap.handoff_wait >= cfg.handoff_wait_high
    high_since = (state.scanner_high_since if state.scanner_high_since is not None else now) \
        if high else None
    low_since = (state.scanner_low_since if state.scanner_low_since is not None else now) \
        if busy <= cfg.scanner_busy_low and not high else None
    old_scanner = scanner
    scanner_why = f"busy {snap.scanner_busy}/{scanner}, {snap.handoff_queue:.1f} hand-offs " \
        f"waiting, hand-off wait {snap.handoff_wait:.2f}s"
    if high_since is not None and now - high_since >= cfg.scanner_grow_after and \
            fit(smtp, scanner + 1, bounds)[1] > scanner:
        raised, scanner = fit(smtp, scanner + 1, bounds)
        high_since = now
        if raised > smtp:
            decisions.append(f"smtp {smtp} -> {raised}: to keep scanner <= smtp")
            smtp, smtp_grown = raised, now
        decisions.append(f"scanner {old_scanner} -> {scanner}: {scanner_why}")
    elif low_since is not None and now - low_since >= cfg.scanner_shrink_after and \
            scanner > snap.scanner_floor and now - scanner_changed >= cfg.min_worker_lifetime:
        scanner -= 1
        low_since = now
        decisions.append(f"scanner {old_scanner} -> {scanner}: idle for "
                         f"{cfg.scanner_shrink_after:g}s ({scanner_why})")
    if scanner != old_scanner:
        scanner_changed = now
    if phase == CALM and smtp > calm_size(scanner, bounds):
        phase, since = RETREAT, now  # e.g. the scanner pool shrank: walk the SMTP pool down

    new = State(phase, since, quiet_since, snap.accept_queue, smtp_grown, scanner_changed,
                high_since, low_since, stress)
    return smtp, scanner, new, decisions


def check_rules(snap: Snapshot, smtp: int, scanner: int, phase: str, cfg) -> list[str]:
    """The rules a decision must keep; returns the broken ones (empty when all hold)."""
    return broken(smtp, scanner, snap.bounds, cfg.calm_ratio if phase == CALM else 0.0)



@dataclass(frozen=True)
class Mark:
    """The SMTP pool's cumulative counters at the last interval: the next snapshot's
    differences (hand-off rate and wait, session growth, hand-off queueing) are taken from it."""
    handoffs: int = 0
    wait_ms: int = 0          # total hand-off time, milliseconds
    sessions: int = 0         # live sessions
    at: float | None = None   # monotonic clock; None before the first interval
    queue_us: int = 0         # total time hand-offs waited for a scanner worker, microseconds


@dataclass
class Autoscaler:
    """The autoscaler as the master keeps it: `decide`'s state and what status shows."""
    enabled: bool
    state: State = field(default_factory=State)
    ran_at: float = 0.0       # monotonic: when `run` last ran
    phase_since: float = 0.0  # wall clock: when the storm phase last changed
    mark: Mark = field(default_factory=Mark)
    last: Snapshot | None = None
    decisions: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=DECISIONS_KEPT))
    decision_count: int = 0   # since start (a metric)

    def due(self, now: float, interval: float) -> bool:
        return self.enabled and now - self.ran_at >= interval

    def run(self, snap: Snapshot, mark: Mark, cfg, wall: float) -> tuple[int, int, list[str]]:
        """One interval: (smtp target, scanner target, decisions), each decision kept with
        the wall clock `wall` for status."""
        before = self.state
        smtp, scanner, self.state, decisions = decide(snap, before, cfg)
        self.ran_at, self.last, self.mark = snap.now, snap, mark
        if self.state.phase != before.phase:
            self.phase_since = wall
        self.decision_count += len(decisions)
        self.decisions.extend({"time": round(wall, 1), "decision": d} for d in decisions)
        return smtp, scanner, decisions

    def switch(self, on: bool, now: float, wall: float) -> bool:
        """On or off; True when it changed. Off starts the next `on` from calm."""
        if on == self.enabled:
            return False
        self.enabled = on
        if not on:
            self.state, self.phase_since = State(since=now), wall
        return True
