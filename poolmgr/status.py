"""What `poolmgr status` reports, as typed records, and how the master assembles them.

The records (dataclasses) are the one description of the status: the master builds a `Status`
(`collect`), the control socket carries it as JSON (`Status.to_json`, the documented
`status --json` shape), and every reader (`cli`, `top`, `metrics`, the bench) turns the JSON
back into records (`Status.from_json`) and reads attributes, so a renamed field fails where it
is read, not at run time in another process. `snapshot` assembles the autoscaler's input from
the same sources.

The master hands over what it knows as one typed record, `MasterView` (its pools as
`pools.PoolView`s with each worker's board slot read once, the nuisance window, the autoscaler's
record, anvil's and the cluster's figures): `collect`, `snapshot` and `summary` read that
record, never the master itself.
"""

__all__ = ["Status", "PoolStatus", "WorkerStatus", "MasterStatus", "NuisanceStatus",
           "StressStatus", "StormStatus", "AutoscaleStatus", "Decision", "AnvilStatus",
           "ClusterStatus", "ScannerStatus", "CheckStatus", "DnsblStatus", "collect", "snapshot",
           "NuisanceTotal", "MasterView", "summary"]

import dataclasses
import os
import time
import types
import typing
from collections import Counter
from dataclasses import dataclass, field

import psutil

from . import autoscale, log
from .board import DNSBL_SITES_COUNTED, LATENCY_BUCKETS
from .pools import PoolView
from .scanner.verdict import KINDS as VERDICT_KINDS

MIN_CLOSED_FOR_RATIO = 20  # fewer closed sessions in the window: their ratio is noise


@dataclass
class WorkerStatus:
    pid: int
    number: int
    generation: int
    state: str            # running or draining
    age: float            # seconds since it was started
    sessions: int
    busy: int
    heartbeat_age: float
    rss: int


@dataclass
class PoolStatus:
    workers: int          # running
    draining: int
    target: int
    floor: int
    ceiling: int
    sessions: int
    slots: int            # SMTP: running workers x max_sessions_per_worker; scanner: workers
    busy: int
    rss: int
    throttled: bool       # a start-up crash loop is being backed off
    counters: dict[str, int]
    worker_list: list[WorkerStatus]
    sessions_by_state: dict[str, int] | None = None  # SMTP: suspect, transaction, other


@dataclass
class MasterStatus:
    pid: int
    uptime: float
    config: str
    generation: int
    state: str
    rss: int
    log_dropped: int = 0  # log lines the master dropped (its log could not take them)


@dataclass
class NuisanceTotal:
    legit: int
    by_reason: dict[str, int]
    health_checks: int = 0  # a load balancer's own sessions (smtp.proxy_protocol)


@dataclass
class NuisanceStatus:
    window: float
    ratio: float
    legit: int
    nuisance: int
    by_reason: dict[str, int]
    total: NuisanceTotal


@dataclass
class StressStatus:
    on: bool = False
    source: str = ""
    since: float | None = None


@dataclass
class StormStatus:
    active: bool
    phase: str
    since: float


@dataclass
class Decision:
    time: float
    decision: str


@dataclass
class AutoscaleStatus:
    enabled: bool
    phase: str
    since: float
    pressure: float = 0.0
    occupancy: float = 0.0
    backlog: int = 0          # connections waiting in the SMTP accept queue (a contract name);
    #                           with several smtp.listen addresses, the fullest queue's
    backlog_max: int = 0      # the accept queue's limit, smtp.listen_backlog
    nuisance_ratio: float = 0.0
    handoff_wait: float = 0.0
    handoff_queue: float = 0.0  # hand-offs waiting for a scanner worker, mean over the interval
    decisions: list[Decision] = field(default_factory=list)


@dataclass
class AnvilStatus:
    clients: int
    connections: int
    greet_passes: int = 0   # clients whose greet test pass holds (the host's cache)
    dnsbl_answers: int = 0  # DNSBL answers cached by the host
    client_names: int = 0   # client names (defence.peername) cached by the host
    fallbacks: int = 0      # SMTP workers' requests it did not answer in time: not limited


@dataclass
class ClusterStatus:
    """`[cluster]`: the shared Redis as the master's monitor sees it (cluster.Monitor)."""
    state: str = "off"     # off (no [cluster] redis or sentinels), starting, shared or degraded
    redis: str = ""        # the URL without its password, or redis+sentinel://SENTINELS/NAME
    master: str = ""       # with sentinels: HOST:PORT of the master they named last
    node: str = ""
    since: float = 0.0     # wall clock of the last change of state
    error: str = ""        # why it is degraded
    nodes: list[str] = field(default_factory=list)  # nodes seen in the last NODE_SEEN
    top_clients: dict[str, int] = field(default_factory=dict)  # cluster-wide connections
    latency: float = 0.0   # the monitor's last round trip to Redis, seconds
    reaped: int = 0        # dead workers' and nodes' connections taken off by this node

    def summary(self) -> str:
        """`cluster: shared (redis URL, node mx1); nodes mx1, mx2; top clients 192.0.2.7 3`"""
        if self.state == "off":
            return "cluster: off (this host only)"
        master = f", master {self.master}" if self.master else ""
        text = f"cluster: {self.state} (redis {self.redis}{master}, node {self.node}"
        text += f"; {self.error})" if self.state == "degraded" else ")"
        clients = ", ".join(f"{ip} {n}" for ip, n in self.top_clients.items()) or "none"
        return (f"{text}; nodes {', '.join(self.nodes) or 'none'}; top clients {clients}; "
                f"round trip {self.latency * 1000:.1f} ms")


@dataclass
class CheckStatus:
    """One check back-end of the scanner pool, since start."""
    runs: int
    failed: int
    seconds: float        # total time spent in it
    buckets: list[int]    # runs within each bound of board.LATENCY_BUCKETS (not cumulative)


@dataclass
class ScannerStatus:
    """The scanner pool's verdicts by kind (scanner/verdict.py KINDS) and its checks; what
    feeds it: poolmgr's own SMTP pool, or only Postfix (`scanner_only`, no SMTP pool) with
    the maxproc of its content_filter transport (`feeder_maxproc`, 0: not given)."""
    verdicts: dict[str, int] = field(default_factory=dict)
    checks: dict[str, CheckStatus] = field(default_factory=dict)
    scanner_only: bool = False
    feeder_maxproc: int = 0

    def summary(self) -> str:
        """`scanner verdicts: clean 12, ...; checks: clamd 13 runs, 0 failed, 2 ms avg; ...`"""
        verdicts = ", ".join(f"{kind} {n}" for kind, n in self.verdicts.items())
        checks = "; ".join(f"{name} {c.runs} runs, {c.failed} failed, "
                           f"{c.seconds / c.runs * 1000 if c.runs else 0:.0f} ms avg"
                           for name, c in self.checks.items())
        return f"scanner verdicts: {verdicts or 'none'}; checks: {checks or 'none'}"


@dataclass
class DnsblStatus:
    """DNSBL answers that were error codes (127.255.255.x, or outside 127/8), since start:
    they never score. `by_site`: per configured domain (the first board.DNSBL_SITES_COUNTED
    sites of dnsbl_sites; counted by position, so a reload that reorders the sites moves
    earlier counts to the site now at that position)."""
    errors: int = 0
    by_site: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """`dnsbl: 3 error answers (zen.spamhaus.org 3)`"""
        sites = ", ".join(f"{site} {n}" for site, n in self.by_site.items() if n)
        return f"dnsbl: {self.errors} error answers" + (f" ({sites})" if sites else "")


@dataclass
class Status:
    version: str
    master: MasterStatus
    pools: dict[str, PoolStatus]
    nuisance: NuisanceStatus
    stress: StressStatus
    storm: StormStatus
    autoscale: AutoscaleStatus
    anvil: AnvilStatus
    scanner: ScannerStatus = field(default_factory=ScannerStatus)
    cluster: ClusterStatus = field(default_factory=ClusterStatus)
    dnsbl: DnsblStatus = field(default_factory=DnsblStatus)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Status":
        return _load(cls, data)


def _load(kind, value):
    """Records from their JSON form, by the type hints; unknown keys (newer masters) skipped."""
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: _load(hints[f.name], value[f.name])
                       for f in dataclasses.fields(kind) if f.name in value})
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if value is None:
        return None
    if origin is list:
        return [_load(args[0], item) for item in value]
    if origin is dict:
        return {key: _load(args[1], item) for key, item in value.items()}
    if origin in (typing.Union, types.UnionType):
        return _load(next(a for a in args if a is not type(None)), value)
    return value


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.Error, OSError):  # OSError: out of files (EMFILE) reading /proc
        return 0


# -- what the master hands over

@dataclass
class MasterView:
    """The master's state as status and the autoscaler read it (`Master.view`)."""
    now: float                # monotonic
    started: float            # wall clock of the master's start
    config: str
    generation: int
    stopping: str             # "", "graceful" or "fast"
    pools: dict[str, PoolView]
    per_worker: int           # smtp.max_sessions_per_worker
    accept_queue: tuple[int, int]  # (waiting, limit) of the fullest SMTP accept queue
    listen_backlog: int       # smtp.listen_backlog
    nuisance: dict            # NuisanceWindow.summary()
    autoscaler: autoscale.Autoscaler
    stress: StressStatus
    anvil: AnvilStatus
    cluster: ClusterStatus
    checks: list[str]         # scanner.checks
    dnsbl_sites: list[str] = field(default_factory=list)  # defence.dnsbl_sites' domains
    feeder_maxproc: int = 0   # scanner.feeder_maxproc


def _pool(kind: str, pool: PoolView, view: MasterView) -> PoolStatus:
    listing, by_state = [], Counter()
    for w in sorted(pool.workers, key=lambda w: (w.worker.state, w.worker.number)):
        info, worker = w.board, w.worker
        by_state.update(suspect=info["suspect"], transacting=info["transacting"])
        listing.append(WorkerStatus(worker.pid, worker.number, worker.generation, worker.state,
                                    round(view.now - worker.started, 1), info["sessions"],
                                    info["busy"], round(view.now - info["heartbeat"], 1),
                                    _rss(worker.pid)))
    running = len(pool.running())
    sessions = sum(w.sessions for w in listing)
    per_worker = view.per_worker if kind == "smtp" else 1
    result = PoolStatus(running, len(pool.workers) - running, pool.target, pool.floor,
                        pool.ceiling, sessions, running * per_worker,
                        sum(w.busy for w in listing), sum(w.rss for w in listing),
                        pool.throttled, dict(pool.counters()), listing)
    if kind == "smtp":  # live sessions by state (see FrontSession.looks_like_nuisance)
        result.sessions_by_state = {
            "suspect": by_state["suspect"], "transaction": by_state["transacting"],
            "other": max(0, sessions - by_state["suspect"] - by_state["transacting"])}
    return result


def _nuisance(view: MasterView, counters: dict) -> NuisanceStatus:
    """The sliding-window ratio, plus all-time counts by reason since start."""
    window = view.nuisance
    total = NuisanceTotal(counters.get("legit", 0), {
        key.removeprefix("nuisance_"): value for key, value in counters.items()
        if key.startswith("nuisance_") and value}, counters.get("health_checks", 0))
    return NuisanceStatus(window["window"], window["ratio"], window["legit"],
                          window["nuisance"], window["by_reason"], total)


def _autoscale(view: MasterView) -> AutoscaleStatus:
    scaler = view.autoscaler
    snap = scaler.last
    result = AutoscaleStatus(scaler.enabled, scaler.state.phase, round(scaler.phase_since, 1),
                             backlog_max=view.listen_backlog,
                             decisions=[Decision(**d) for d in scaler.decisions])
    if snap is not None:
        result.pressure, result.occupancy = round(snap.pressure, 3), round(snap.occupancy, 3)
        result.backlog, result.backlog_max = snap.accept_queue, snap.listen_backlog
        result.nuisance_ratio = round(snap.nuisance_ratio, 3)
        result.handoff_wait = round(snap.handoff_wait, 3)
        result.handoff_queue = round(snap.handoff_queue, 2)
    return result


def collect(view: MasterView) -> Status:
    pools = {kind: _pool(kind, pool, view) for kind, pool in view.pools.items()}
    phase = view.autoscaler.state.phase
    return Status(
        version=__import__("poolmgr").__version__,
        master=MasterStatus(os.getpid(), round(time.time() - view.started, 1), view.config,
                            view.generation,
                            f"stopping ({view.stopping})" if view.stopping else "running",
                            _rss(os.getpid()), log.dropped()),
        pools=pools, nuisance=_nuisance(view, pools["smtp"].counters),
        stress=dataclasses.replace(view.stress),
        storm=StormStatus(phase == autoscale.STORM, phase,
                          round(view.autoscaler.phase_since, 1)),
        autoscale=_autoscale(view),
        anvil=dataclasses.replace(view.anvil,
                                  fallbacks=pools["smtp"].counters.get("anvil_fallbacks", 0)),
        scanner=_scanner(view, pools["scanner"].counters), cluster=view.cluster,
        dnsbl=_dnsbl(view.dnsbl_sites, pools["smtp"].counters))


def _dnsbl(sites: list[str], counters: dict) -> DnsblStatus:
    by_site = Counter()
    for position, domain in enumerate(sites[:DNSBL_SITES_COUNTED]):
        by_site[domain] += counters.get(f"dnsbl_errors_{position}", 0)  # a domain listed twice
    return DnsblStatus(counters.get("dnsbl_errors", 0), dict(by_site))


def _scanner(view: MasterView, counters: dict) -> ScannerStatus:
    checks = {}
    for name in view.checks:
        prefix = f"check_{name}_"
        checks[name] = CheckStatus(
            counters.get(prefix + "count", 0), counters.get(prefix + "failed", 0),
            counters.get(prefix + "us", 0) / 1e6,
            [counters.get(f"{prefix}le_{i}", 0) for i in range(len(LATENCY_BUCKETS))])
    return ScannerStatus({kind: counters.get(f"verdict_{kind}", 0) for kind in VERDICT_KINDS},
                         checks, view.pools["smtp"].ceiling == 0, view.feeder_maxproc)


def window_ratio(window: dict) -> float:
    """The closed sessions' nuisance ratio, once enough sessions closed to mean anything."""
    closed = window["legit"] + window["nuisance"]
    return window["ratio"] if closed >= MIN_CLOSED_FOR_RATIO else 0.0


def snapshot(view: MasterView) -> tuple[autoscale.Snapshot, autoscale.Mark]:
    """The autoscaler's input, and the mark for the next interval's differences."""
    smtp, scanner, mark, now = (view.pools["smtp"], view.pools["scanner"],
                                view.autoscaler.mark, view.now)
    running = smtp.running()
    sessions = sum(w.board["sessions"] for w in running)
    suspect = sum(w.board["suspect"] for w in running)
    live_ratio = suspect / sessions if sessions else 0.0
    counters = smtp.counters()
    new = autoscale.Mark(counters.get("handoffs", 0), counters.get("handoff_wait_ms", 0),
                         sessions, now, counters.get("handoff_queue_us", 0))
    done = new.handoffs - mark.handoffs
    elapsed = now - mark.at if mark.at is not None else 0.0
    queued, limit = view.accept_queue
    snap = autoscale.Snapshot(
        now=now, smtp=smtp.target, scanner=scanner.target, smtp_floor=smtp.floor,
        smtp_ceiling=smtp.ceiling, scanner_floor=scanner.floor,
        scanner_ceiling=scanner.ceiling, sessions=sessions,
        slots=len(running) * view.per_worker, accept_queue=queued,
        listen_backlog=limit, nuisance_ratio=max(window_ratio(view.nuisance), live_ratio),
        scanner_busy=sum(w.board["busy"] for w in scanner.running()),
        handoff_wait=(new.wait_ms - mark.wait_ms) / 1000 / done if done > 0 else 0.0,
        handoff_queue=(new.queue_us - mark.queue_us) / 1e6 / elapsed if elapsed > 0 else 0.0,
        growth=(sessions - mark.sessions) / elapsed if elapsed > 0 else 0.0,
        per_worker=view.per_worker)
    return snap, new


def summary(view: MasterView) -> str:
    """`smtp 2/2 workers, scanner 2/2, calm`: running/target, then the storm phase (systemd's
    STATUS=); `no smtp pool, scanner 2/2, calm` in scanner-only mode."""
    smtp, scanner = view.pools["smtp"], view.pools["scanner"]
    words = [f"smtp {len(smtp.running())}/{smtp.target} workers" if smtp.ceiling else
             "no smtp pool", f"scanner {len(scanner.running())}/{scanner.target}",
             view.autoscaler.state.phase if view.autoscaler.enabled else "autoscale off"]
    if view.stress.on:
        words.append("stress mode")
    if view.stopping:
        words.append(f"stopping ({view.stopping})")
    return ", ".join(words)
