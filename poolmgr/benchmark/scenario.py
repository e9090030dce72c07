"""Bench scenarios: bounded phases of client arrivals, and what each client profile does.

A scenario is a TOML file (see bench/scenarios/):

    name = "smoke"
    description = "..."
    processes = 1              # load-generator processes (each holds < 20,000 sockets)
    drain = "20s"              # after the last phase, how long clients may finish

    [server]                   # the target's size (poolmgr: pool floors and ceilings)
    smtp_workers = 2
    smtp_max_workers = 4
    scanner_workers = 2
    max_sessions_per_worker = 2000
    stress = false             # poolmgr: stress mode switched on once started
    nodes = 1                  # poolmgr: nodes sharing one Redis ([cluster]); clients are
                               # spread over them round-robin, as senders over equal MX records

    [config.smtp]              # optional: further poolmgr settings, by section, as in
    listen_backlog = 4096      # poolmgr.toml (checked as poolmgr check would); the peers
                               # take the same listen backlog

    storm_threshold = 20       # connections/s above the calm rate that mark a storm's onset
    sample_every = "1s"        # poolmgr's status, sampled (storm reaction, pool sizes)

    [[phases]]
    name = "storm"
    duration = "10s"
    rates = { idle = 20, pregreet = 5, legit = 2 }   # new connections per second

    [profiles.idle]            # optional: each profile's knobs (defaults in PROFILES)
    hold = "60s"

A replay scenario (`kind = "replay"`) takes its arrivals from a mail log instead of phases:

    kind = "replay"
    maillog = "replay.log"     # relative to the scenario file; Postfix's or poolmgr's format
    speed = 1.0                # 2: arrivals twice as fast and holds half as long
    scale = 1.0                # 2: two clients for every session in the log
    tz = "UTC"                 # zone of syslog timestamps (default: local); year = 2026
    max_hold = "300s"          # no client holds longer

Each session the log shows (`plan.parse_maillog`, refused connections included) becomes one
client that connects at the session's offset from the first one: a legitimate session sends
a message; a nuisance one behaves as the profile its reason names (`REPLAY_PROFILES`: pregreet
talks first, dnsbl comes from a listed address, a rejected recipient is a dictionary attack,
anything else connects and holds, silent, for as long as the session lasted).

A source scenario (`kind = "source"`) measures the mail path's throughput with Postfix's own
load tool as the client (C, not Python), each target at its [server] sizes (poolmgr's
defaults unless given), relaying to smtp-sink (`benchmark.source`):

    kind = "source"
    sessions = 20              # smtp-source -s: sessions at once
    messages = 5000            # smtp-source -m: messages per round
    size = "1k"                # smtp-source -l: message size
    rounds = 5                 # bench compare: rounds of every target in turn (median)

A scanner-pool scenario (`kind = "scanner-pool"`, `benchmark.scanner_pool`) measures
messages/second through poolmgr's scanner pool alone, per check back-end and pool size:

    kind = "scanner-pool"
    checks = ["builtin", "clamd", "spamd"]   # each on its own, after builtin as configured
    workers = [1, 2, 4]        # scanner pool sizes (autoscaler off)
    clients = 0                # clients at once; 0: as many as the pool has workers
    duration = "10s"           # of each run
    runs = 2                   # runs of each size (the spread)
    size = "10k"               # message size

A cluster-overhead scenario (`kind = "cluster-overhead"`, `benchmark.cluster_overhead`)
measures what `[cluster]` with Redis costs one poolmgr node (sized by [server]): connections/s
with it and without, rounds taken in turn:

    kind = "cluster-overhead"
    rounds = 3                 # each round measures off and on (every other round: on first)
    duration = "5s"            # of each arm
    clients = 40               # clients at once, each connecting, reading the banner, QUIT

Both drive the load generator as a closed loop (`Scenario.loop`): every client makes one
connection after another, as fast as the server answers, for `duration`.

A content-filter scenario (`kind = "content-filter"`, `benchmark.content_filter`) puts
poolmgr's scanner pool alone (scanner-only, `[smtp] listen = []`) beside Debian's
amavisd-new, each in Postfix's content_filter place: `workers` scanner workers against
amavisd's `$max_servers`, fed by smtp-source with as many sessions (the `maxproc` of the
`scan` transport), both re-injecting into smtp-sink; `bench compare --targets
poolmgr,amavisd`:

    kind = "content-filter"
    checks = ["builtin", "clamd"]  # each a comparison: amavisd's checks bypassed beside
                                   # builtin, then both asking the same clamd
    workers = 4                # scanner workers = $max_servers = feeder_maxproc = smtp-source -s
    messages = 2000            # smtp-source -m: messages per round
    size = "10k"               # smtp-source -l: message size
    rounds = 3                 # rounds of every target in turn (the spread)

A soak scenario (`kind = "soak"`, `benchmark.soak`) runs one poolmgr node (sized by [server])
for a long time under steady legitimate mail, with storms, next-hop outages, a reload, a USR2
upgrade and (with `cluster`) a Redis restart on the way; its phases are made from its keys:

    kind = "soak"
    duration = "60m"           # the whole run
    legit_rate = 2.0           # legitimate messages per second, all along
    storm_every = "20m"        # a storm this often,
    first_storm = "5m"         # the first at this time (default: storm_every), inside warmup
    storm_length = "30s"       # each storm's arrivals last this long
    storm = { idle = 100, pregreet = 10, listed = 10, dictionary = 5 }  # connections/s
    next_hop_down = "60s"      # smtp-sink stopped this long, twice (at 30% and 70%)
    reload = true              # SIGHUP at 3% of the run
    upgrade = true             # USR2 at 5% of the run
    cluster = false            # [cluster] on a private Redis, restarted at 85% of the run
    redis_down = "10s"         # for this long
    sample_every = "1m"        # memory and fds of every poolmgr process
    warmup = "10m"             # growth is measured from here to the end
    max_growth_pct = 5.0       # the goal the report checks growth against

Every duration and count is bounded, so a run stops by itself. Each load-generator process
must hold its share of the connections open at once under the open-files limit
(RLIMIT_NOFILE, 20,000 here): `peak_connections` bounds that share from the scenario
(arrival rates x the longest a profile's connection lasts) before anything starts.

A storm's onset, from which the bench measures the autoscaler's reaction, is the first second
the offered rate (connections the load generator opened in it) exceeds the calm rate by
`storm_threshold`; the calm rate is the offered rate of the scenario's calmest phase (`calm`:
the seconds it spans), 0 for a scenario of one phase (nothing before its load).
"""

__all__ = ["Scenario", "Phase", "PROFILES", "load", "ScenarioError", "replay_profile",
           "pool_sizes", "SERVER_DEFAULTS", "from_dict", "KINDS", "soak_storms",
           "overridden", "RELOAD_AT", "UPGRADE_AT", "peak_connections", "OPEN_FILES"]

import math
import resource
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as poolmgr_config
from .. import plan as planner
from ..config import parse_duration, parse_size

# Each profile's knobs and their defaults.
PROFILES: dict[str, dict[str, Any]] = {
    "idle": {"hold": "60s"},                          # connects, never speaks
    "slowloris": {"hold": "60s", "interval": "5s"},   # one byte every interval
    "pregreet": {"hold": "30s"},                      # talks before the banner
    "impatient": {"give_up": "21s"},                  # spam, gives up when stalled
    "listed": {"give_up": "100s"},                    # spam from a DNSBL-listed address
    "dictionary": {"recipients": 5, "give_up": "60s"},  # random recipients
    "reconnector": {"reconnects": 5, "give_up": "60s"},  # reconnects at once when dropped
    "legit": {"timeout": "300s", "sizes": ["2k", "20k", "100k"],
              "recipients": ["bob@example.test"],
              "messages": 1},  # per connection; 0: one after another until the load ends
    "probe": {"give_up": "10s"},                      # banner, QUIT, close (a monitor's check)
}
BOTS = tuple(p for p in PROFILES if p != "legit")
DURATION_KNOBS = ("hold", "interval", "give_up", "timeout")
# The open files one process may hold here (a hard limit that root cannot raise), less what a
# load-generator process needs beside its connections.
OPEN_FILES = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
OPEN_FILES_SPARE = 200
SAMPLE_EVERY = 1.0  # seconds between samples of poolmgr's status (`sample_every`)
STORM_THRESHOLD = 20.0  # connections/s above the calm rate: a storm's onset
# How long a client that talks stays connected, for the planner's forecast of a scenario: the
# bench's poolmgr holds every new client's banner for its greet pause (2 s), and a dialogue
# on loopback takes well under a second.
SPOKEN_HOLD = 3.0


# A replay's bounds: clients in all, and the replayed span (after `speed`)
MAX_REPLAY_CLIENTS = 50_000
MAX_REPLAY_SPAN = 3600.0
# A nuisance reason of plan.parse_maillog -> the profile that replays it; others are "idle"
REPLAY_PROFILES = {"pregreet": "pregreet", "command_pipelining": "pregreet",
                   "bare_newline": "pregreet", "non_smtp_command": "pregreet",
                   "dnsbl": "listed", "denylisted": "listed", "blacklisted": "listed",
                   "bad_recipients": "dictionary"}


class ScenarioError(ValueError):
    pass


def replay_profile(session: planner.Session) -> str:
    """The profile a mail-log session is replayed as."""
    if session.legit:
        return "legit"
    if session.reason.startswith("reject_5"):  # smtpd refused a recipient
        return "dictionary"
    return REPLAY_PROFILES.get(session.reason, "idle")


@dataclass(frozen=True)
class Phase:
    name: str
    duration: float
    rates: dict[str, float]


@dataclass
class Scenario:
    name: str
    description: str
    phases: list[Phase]
    profiles: dict[str, dict[str, Any]]
    server: dict[str, int | bool]
    processes: int = 1
    drain: float = 20.0
    path: str = ""
    raw: dict = field(default_factory=dict)
    kind: str = "phases"
    # replay: [offset s, profile, hold s] per client, by offset
    arrivals: list[list] = field(default_factory=list)
    # source: smtp-source's sessions, messages, size, and the rounds of a compare
    source: dict[str, int] = field(default_factory=dict)
    # scanner-pool, cluster-overhead, content-filter: their settings (MEASURE_KEYS)
    measure: dict[str, Any] = field(default_factory=dict)
    # a closed loop for one run of the load generator: profile, clients, duration (s)
    loop: dict[str, Any] = field(default_factory=dict)
    # poolmgr settings beyond [server]'s, by section ([config.SECTION] in the file)
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    storm_threshold: float = STORM_THRESHOLD
    sample_every: float = SAMPLE_EVERY

    @property
    def calm(self) -> tuple[float, float] | None:
        """The calmest phase's span (start, end; seconds from the start), None with one phase
        or none (the calm rate is then 0)."""
        if len(self.phases) < 2:
            return None
        starts = [sum(p.duration for p in self.phases[:n]) for n in range(len(self.phases))]
        n = min(range(len(self.phases)), key=lambda k: sum(self.phases[k].rates.values()))
        return starts[n], starts[n] + self.phases[n].duration

    def sessions(self) -> list[planner.Session]:
        """The sessions the scenario offers, as the planner takes them (`forecast`): its
        arrivals spread evenly over each phase, each holding as long as its profile does (a
        silent bot: its hold; a client that talks: `SPOKEN_HOLD`); a replay's arrivals with
        their own holds. What a server makes of the load (a bot shed early) is not in it."""
        if self.kind == "replay":
            return [planner.Session(t, t + (SPOKEN_HOLD if profile == "legit" else hold),
                                    profile == "legit", "" if profile == "legit" else profile,
                                    "scenario", data=profile == "legit")
                    for t, profile, hold in self.arrivals]
        found, at = [], 0.0
        for phase in self.phases:
            for profile, rate in phase.rates.items():
                hold = self.profiles[profile].get("hold", SPOKEN_HOLD)
                legit = profile == "legit"
                found += [planner.Session(at + i / rate, at + i / rate + hold, legit,
                                          "" if legit else profile, "scenario", data=legit)
                          for i in range(int(rate * phase.duration))]
            at += phase.duration
        return sorted(found, key=lambda s: s.start)

    @property
    def listen_backlog(self) -> int:
        """The SMTP listen backlog the targets are given (poolmgr's default unless set)."""
        return int(self.config.get("smtp", {}).get(
            "listen_backlog", poolmgr_config.load(None).smtp.listen_backlog))

    @property
    def duration(self) -> float:
        if self.loop:
            return self.loop["duration"]
        if self.kind == "replay":
            return math.floor(self.arrivals[-1][0]) + 1.0 if self.arrivals else 0.0
        return sum(p.duration for p in self.phases)

    @property
    def onset(self) -> float | None:
        """When the first bots are due (seconds from the start), None without bots."""
        if self.kind == "replay":
            return next((a[0] for a in self.arrivals if a[1] != "legit"), None)
        return next((sum((p.duration for p in self.phases[:n]), 0.0)
                     for n, phase in enumerate(self.phases)
                     if any(r > 0 for k, r in phase.rates.items() if k != "legit")), None)

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "path": self.path,
                "kind": self.kind, "processes": self.processes, "drain": self.drain,
                "server": self.server,
                "phases": [{"name": p.name, "duration": p.duration, "rates": p.rates}
                           for p in self.phases],
                "arrivals": self.arrivals, "source": self.source, "measure": self.measure,
                "loop": self.loop, "profiles": self.profiles, "config": self.config,
                "storm_threshold": self.storm_threshold, "sample_every": self.sample_every}


SERVER_DEFAULTS = {"smtp_workers": 2, "smtp_max_workers": 8, "scanner_workers": 2,
                   "scanner_max_workers": 4, "max_sessions_per_worker": 2000, "stress": False,
                   "nodes": 1}


def pool_sizes(cfg) -> dict:
    """A poolmgr config's pool sizes as [server] keys (`bench run --config FILE`)."""
    return {"smtp_workers": cfg.smtp.min_workers, "smtp_max_workers": cfg.smtp.max_workers,
            "scanner_workers": cfg.scanner.min_workers,
            "scanner_max_workers": cfg.scanner.max_workers,
            "max_sessions_per_worker": cfg.smtp.max_sessions_per_worker}


def from_dict(data: dict, path: str = "") -> Scenario:
    where = path or "scenario"

    def fail(message: str):
        raise ScenarioError(f"{where}: {message}")

    kind = data.get("kind", "phases")
    if kind not in KINDS:
        fail(f"kind: {kind!r}: known kinds are {', '.join(KINDS)}")
    phases, arrivals, source, measure = [], [], {}, {}
    if kind == "replay":
        arrivals = replay(data, path, fail)
    elif kind == "source":
        source = source_settings(data, fail)
    elif kind in MEASURE_KEYS:
        measure = measure_settings(kind, data, fail)
    elif kind == "soak":
        measure = soak_settings(data, fail)
    for n, phase in enumerate(data.get("phases") or [], 1):
        rates = phase.get("rates") or {}
        unknown = sorted(set(rates) - set(PROFILES))
        if unknown:
            fail(f"phase {n}: unknown profile(s) {', '.join(unknown)}; known: "
                 f"{', '.join(PROFILES)}")
        try:
            duration = parse_duration(phase.get("duration", "0s"))
        except ValueError as exc:
            fail(f"phase {n}: duration: {exc}")
        if not 0 < duration <= 3600:
            fail(f"phase {n}: duration must be between 0 and 1h")
        if any(not isinstance(r, (int, float)) or r < 0 or r > 5000 for r in rates.values()):
            fail(f"phase {n}: rates are connections per second, 0..5000")
        phases.append(Phase(str(phase.get("name", f"phase{n}")), duration,
                            {k: float(v) for k, v in rates.items()}))
    if kind == "phases" and not phases:
        fail("no [[phases]]")
    if kind in ("source", "soak", *MEASURE_KEYS) and phases:
        fail(f"a {kind} scenario has no [[phases]]")
    if kind == "soak":
        phases = soak_phases(measure)
    if kind == "replay" and (phases or not arrivals):
        fail("a replay has no [[phases]]" if phases else "the mail log holds no sessions")
    profiles = {}
    for name, defaults in PROFILES.items():
        knobs = dict(defaults)
        given = (data.get("profiles") or {}).get(name) or {}
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            fail(f"profiles.{name}: unknown key(s) {', '.join(unknown)}")
        knobs.update(given)
        try:
            for key in DURATION_KNOBS:
                if key in knobs:
                    knobs[key] = parse_duration(knobs[key])
            if "sizes" in knobs:
                knobs["sizes"] = [parse_size(s) for s in knobs["sizes"]]
        except ValueError as exc:
            fail(f"profiles.{name}: {exc}")
        profiles[name] = knobs
    server = dict(SERVER_DEFAULTS)
    unknown = sorted(set(data.get("server") or {}) - set(SERVER_DEFAULTS))
    if unknown:
        fail(f"server: unknown key(s) {', '.join(unknown)}")
    server.update(data.get("server") or {})
    for key, value in server.items():
        if type(value) is not type(SERVER_DEFAULTS[key]):
            fail(f"server.{key}: {value!r} is not {type(SERVER_DEFAULTS[key]).__name__}")
    processes = int(data.get("processes", 1))
    if not 1 <= processes <= 16:
        fail("processes must be 1..16")
    settings = data.get("config") or {}
    if not isinstance(settings, dict) or any(not isinstance(v, dict) for v in settings.values()):
        fail("config: poolmgr settings by section, e.g. [config.smtp] listen_backlog = 4096")
    try:
        poolmgr_config.from_dict(settings, f"{where} [config]")
    except poolmgr_config.ConfigError as exc:
        fail("config: " + "; ".join(exc.errors))
    threshold = data.get("storm_threshold", STORM_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold <= 0:
        fail(f"storm_threshold: {threshold!r} is not a rate above 0 (connections/s)")
    # A soak's own sample_every is its memory sampling (SOAK_KEYS); its status tick stays 1s.
    every = data.get("sample_every", "1s") if kind != "soak" else "1s"
    try:
        every = parse_duration(every)
    except (TypeError, ValueError) as exc:
        fail(f"sample_every: {exc}")
    if not 0.1 <= every <= 60:
        fail(f"sample_every: {every:g}s is not within 0.1s..60s")
    drain = data.get("drain") or ("20s" if kind in ("phases", "soak", *MEASURE_KEYS) else
                                  max((a[2] for a in arrivals), default=0.0) + 20)
    plan = Scenario(str(data.get("name", "scenario")), str(data.get("description", "")),
                    phases, profiles, server, processes, parse_duration(drain), path, data,
                    kind, arrivals, source, measure, config=settings,
                    storm_threshold=float(threshold), sample_every=every)
    share = math.ceil(peak_connections(plan) / processes)
    if share > OPEN_FILES - OPEN_FILES_SPARE:
        fail(f"processes: {processes} load-generator process(es) would each hold up to "
             f"{share} connections at once, over the open-files limit of one process "
             f"({OPEN_FILES}, less {OPEN_FILES_SPARE} spare): raise processes to at least "
             f"{math.ceil(peak_connections(plan) / (OPEN_FILES - OPEN_FILES_SPARE))}")
    return plan


def lasts(profile: str, knobs: dict) -> float:
    """The longest one connection of a profile stays open, as the load generator runs it."""
    if profile == "reconnector":
        return knobs["give_up"] * (1 + int(knobs["reconnects"]))
    for key in ("hold", "give_up", "timeout"):
        if key in knobs:
            return float(knobs[key])
    return 0.0


def peak_connections(plan: Scenario) -> int:
    """A bound on the connections the load generator holds open at once: at each second, the
    arrivals of each profile within the longest its connections last (a closed loop: its
    clients; a replay: its arrivals within their holds)."""
    if plan.loop:
        return int(plan.loop["clients"])
    if plan.kind == "replay":
        events = sorted([(a[0], 1) for a in plan.arrivals] +
                        [(a[0] + (a[2] if a[1] != "legit" else
                                  lasts("legit", plan.profiles["legit"])), -1)
                         for a in plan.arrivals])
        live = best = 0
        for _, step in events:
            live += step
            best = max(best, live)
        return best
    spans, at = [], 0.0
    for phase in plan.phases:
        spans += [(at, at + phase.duration, rate, lasts(profile, plan.profiles[profile]))
                  for profile, rate in phase.rates.items() if rate > 0]
        at += phase.duration
    best = 0.0
    for second in range(int(at) + 1):
        best = max(best, sum(rate * max(0.0, min(end, second) - max(start, second - hold))
                             for start, end, rate, hold in spans))
    return math.ceil(best)


# A source scenario's keys: (default, least, most)
SOURCE_KEYS = {"sessions": (20, 1, 1000), "messages": (5000, 1, 1_000_000),
               "size": (1024, 0, 10_000_000), "rounds": (5, 1, 50)}


def source_settings(data: dict, fail) -> dict[str, int]:
    """smtp-source's settings of a source scenario, each within its bounds."""
    settings = {}
    for key, (default, least, most) in SOURCE_KEYS.items():
        value = data.get(key, default)
        try:
            value = parse_size(value) if key == "size" else int(value)
        except (TypeError, ValueError):
            fail(f"{key}: {value!r} is not a number")
        if not least <= value <= most:
            fail(f"{key}: {value} is not within {least}..{most}")
        settings[key] = value
    return settings


KINDS = ("phases", "replay", "source", "scanner-pool", "cluster-overhead", "soak",
         "content-filter")
# The scanner-pool, cluster-overhead and content-filter kinds' keys: (default, least, most);
# a list's bounds hold for each of its items
SCANNER_CHECKS = ("builtin", "clamd", "spamd")
# What both poolmgr and amavisd-new are set up to do in a content-filter scenario
CONTENT_FILTER_CHECKS = ("builtin", "clamd")
MEASURE_KEYS = {
    "scanner-pool": {"checks": (list(SCANNER_CHECKS), None, None),
                     "workers": ([1, 2, 4], 1, 64), "clients": (0, 0, 1000),
                     "duration": ("10s", 1, 600), "runs": (2, 1, 20),
                     "size": ("10k", 100, 10_000_000)},
    "cluster-overhead": {"rounds": (3, 1, 20), "duration": ("5s", 1, 600),
                         "clients": (40, 1, 1000)},
    "content-filter": {"checks": (list(CONTENT_FILTER_CHECKS), None, None),
                       "workers": (4, 1, 64), "messages": (2000, 1, 1_000_000),
                       "size": ("10k", 0, 10_000_000), "rounds": (3, 1, 50)},
}


def measure_settings(kind: str, data: dict, fail) -> dict[str, Any]:
    """A scanner-pool, cluster-overhead or content-filter scenario's settings, each within its
    bounds."""
    settings: dict[str, Any] = {}
    for key, (default, least, most) in MEASURE_KEYS[kind].items():
        value = data.get(key, default)
        if key == "checks":
            known = CONTENT_FILTER_CHECKS if kind == "content-filter" else SCANNER_CHECKS
            if not isinstance(value, list) or not value or any(c not in known for c in value):
                fail(f"checks: {value!r}: a list of {', '.join(known)}")
            settings[key] = list(dict.fromkeys(value))
            continue
        try:
            if isinstance(default, list):
                if not isinstance(value, list) or not value:
                    raise ValueError("not a list")
                value = [int(v) for v in value]
            else:
                value = parse_duration(value) if key == "duration" else \
                    parse_size(value) if key == "size" else int(value)
        except (TypeError, ValueError):
            fail(f"{key}: {value!r} is not a "
                 f"{'list of numbers' if isinstance(default, list) else 'number'}")
        if not all(least <= v <= most for v in (value if isinstance(value, list) else [value])):
            fail(f"{key}: {value} is not within {least}..{most}")
        settings[key] = value
    return settings


# A soak scenario's keys: (default, least, most); durations in seconds
RELOAD_AT, UPGRADE_AT = 0.03, 0.05  # a soak's reload and upgrade, as shares of the run
SOAK_KEYS = {"duration": ("60m", 10, 86400), "legit_rate": (2.0, 0.1, 100),
             "storm_every": ("20m", 5, 86400), "first_storm": ("20m", 1, 86400),
             "storm_length": ("30s", 1, 3600),
             "storm": ({"idle": 100, "pregreet": 10, "listed": 10, "dictionary": 5}, 0, 5000),
             "next_hop_down": ("60s", 1, 3600), "reload": (True, None, None),
             "upgrade": (True, None, None), "cluster": (False, None, None),
             "redis_down": ("10s", 1, 600), "sample_every": ("1m", 1, 3600),
             "warmup": ("10m", 0, 86400), "max_growth_pct": (5.0, 0, 1000)}
SOAK_DURATIONS = ("duration", "storm_every", "first_storm", "storm_length", "next_hop_down", "redis_down",
                  "sample_every", "warmup")


def soak_settings(data: dict, fail) -> dict[str, Any]:
    """A soak scenario's settings, each within its bounds."""
    settings: dict[str, Any] = {}
    for key, (default, least, most) in SOAK_KEYS.items():
        value = data.get(key, data.get("storm_every", default) if key == "first_storm" else default)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                fail(f"{key}: {value!r} is not true or false")
            settings[key] = value
            continue
        if key == "storm":
            if not isinstance(value, dict) or set(value) - set(BOTS) or any(
                    isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= most
                    for r in value.values()):
                fail(f"storm: {value!r}: connections per second (0..{most}) of "
                     f"{', '.join(BOTS)}")
            settings[key] = {k: float(v) for k, v in value.items()}
            continue
        try:
            value = parse_duration(value) if key in SOAK_DURATIONS else float(value)
        except (TypeError, ValueError):
            fail(f"{key}: {value!r} is not a {'duration' if key in SOAK_DURATIONS else 'number'}")
        if not least <= value <= most:
            fail(f"{key}: {value:g} is not within {least}..{most}")
        settings[key] = value
    if settings["warmup"] >= settings["duration"]:
        fail(f"warmup: {settings['warmup']:g}s is not shorter than the duration")
    if settings["upgrade"] and settings["warmup"] <= UPGRADE_AT * settings["duration"]:
        fail(f"warmup: {settings['warmup']:g}s is not after the upgrade (at "
             f"{UPGRADE_AT:.0%} of the run, {UPGRADE_AT * settings['duration']:g}s): growth "
             f"would span two generations")
    if settings["storm_length"] >= settings["storm_every"]:
        fail("storm_length: a storm must end before the next one starts (storm_every)")
    if 2 * settings["next_hop_down"] >= 0.4 * settings["duration"]:
        fail("next_hop_down: the two outages take more than 40% of the duration")
    if settings["duration"] - settings["warmup"] < 2 * settings["storm_every"]:
        fail(f"warmup: the run after it ({settings['duration'] - settings['warmup']:g}s) "
             f"must hold two storm periods (storm_every, {settings['storm_every']:g}s): "
             f"growth compares the first one's peak with the last one's")
    return settings


def soak_storms(settings: dict) -> list[tuple[float, float]]:
    """A soak's storms: (start, end) seconds, the first at first_storm, then every
    storm_every."""
    every, length, end = settings["storm_every"], settings["storm_length"], settings["duration"]
    starts = [settings["first_storm"] + k * every for k in range(math.ceil(end / every) + 1)]
    return [(start, min(end, start + length)) for start in starts if start < end]


def soak_phases(settings: dict) -> list[Phase]:
    """A soak's arrivals as the load generator's phases: steady legitimate mail, the storm's
    bots added during each storm."""
    steady = {"legit": settings["legit_rate"]}
    phases, at = [], 0.0
    for n, (start, end) in enumerate(soak_storms(settings), 1):
        if start > at:
            phases.append(Phase(f"steady{n}", start - at, steady))
        phases.append(Phase(f"storm{n}", end - start, {**steady, **settings["storm"]}))
        at = end
    if settings["duration"] > at:
        phases.append(Phase("steady", settings["duration"] - at, steady))
    return phases


def replay(data: dict, path: str, fail) -> list[list]:
    """A replay scenario's arrivals from its mail log: [offset s, profile, hold s] each."""
    if not data.get("maillog"):
        fail("a replay needs maillog = \"FILE\"")
    log = Path(path).parent / data["maillog"] if path else Path(data["maillog"])
    try:
        speed, scale = float(data.get("speed", 1.0)), float(data.get("scale", 1.0))
        max_hold = parse_duration(data.get("max_hold", "300s"))
        tz = planner.zone(data.get("tz"))
    except (TypeError, ValueError) as exc:
        fail(str(exc))
    if not 0.01 <= speed <= 100 or not 0.01 <= scale <= 100:
        fail("speed and scale are between 0.01 and 100")
    try:
        with open(log, encoding="utf-8", errors="replace") as handle:
            sessions = planner.parse_maillog(handle, data.get("year"), tz)
    except OSError as exc:
        fail(f"maillog {log}: {exc.strerror}")
    if not sessions:
        return []
    first = sessions[0].start
    span = (sessions[-1].start - first) / speed
    if span > MAX_REPLAY_SPAN or len(sessions) * scale > MAX_REPLAY_CLIENTS:
        fail(f"maillog {log}: {len(sessions)} sessions over {span:.0f}s at speed {speed:g} "
             f"and scale {scale:g}: at most {MAX_REPLAY_CLIENTS} clients over "
             f"{MAX_REPLAY_SPAN:.0f}s (raise speed, lower scale or cut the log)")
    # Syslog stamps whole seconds: the sessions of one second arrive spread over it.
    per_second = Counter(s.start for s in sessions if s.start == int(s.start))
    seen: Counter = Counter()
    arrivals, owed = [], 0.0
    for session in sessions:  # scale: the fraction carried over, so 0.5 keeps every other
        owed += scale
        copies, owed = int(owed), owed - int(owed)
        spread = seen[session.start] / per_second[session.start] if session.start in \
            per_second else 0.0
        seen[session.start] += 1
        hold = round(min(max_hold, max(0.05, session.hold / speed)), 3)
        arrivals += [[round((session.start + spread - first) / speed, 3),
                      replay_profile(session), hold]] * copies
    return sorted(arrivals, key=lambda a: a[0])


def overridden(data: dict, settings: list[str]) -> dict:
    """The scenario's TOML with `KEY=VALUE` settings (`bench run --set`) put in: VALUE is a
    TOML value (a bare word is a string), a dotted KEY reaches into a table
    (`server.smtp_workers=4`, `profiles.legit.timeout="60s"`)."""
    data = {**data}
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key.strip():
            raise ScenarioError(f"--set {setting!r}: expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        *tables, last = key.strip().split(".")
        where = data
        for name in tables:
            where[name] = {**(where.get(name) or {})}
            where = where[name]
        where[last] = value
    return data


def load(path: str, settings: list[str] = ()) -> Scenario:
    """A scenario file, with `settings` (KEY=VALUE, `overridden`) put in."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ScenarioError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    return from_dict(overridden(data, list(settings)), path)
