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

    [[phases]]
    name = "storm"
    duration = "10s"
    rates = { idle = 20, pregreet = 5, legit = 2 }   # new connections per second

    [profiles.idle]            # optional: each profile's knobs (defaults in PROFILES)
    hold = "60s"

Every duration and count is bounded, so a run stops by itself.

Exports: Scenario, Phase, PROFILES, load, ScenarioError.
"""

import tomllib
from dataclasses import dataclass, field
from typing import Any

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
              "recipients": ["bob@example.test"], "messages": 1},  # messages per connection
}
BOTS = tuple(p for p in PROFILES if p != "legit")
DURATION_KNOBS = ("hold", "interval", "give_up", "timeout")


class ScenarioError(ValueError):
    pass


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

    @property
    def duration(self) -> float:
        return sum(p.duration for p in self.phases)

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "path": self.path,
                "processes": self.processes, "drain": self.drain, "server": self.server,
                "phases": [{"name": p.name, "duration": p.duration, "rates": p.rates}
                           for p in self.phases],
                "profiles": self.profiles}


SERVER_DEFAULTS = {"smtp_workers": 2, "smtp_max_workers": 8, "scanner_workers": 2,
                   "scanner_max_workers": 4, "max_sessions_per_worker": 2000, "stress": False,
                   "nodes": 1}


def from_dict(data: dict, path: str = "") -> Scenario:
    where = path or "scenario"

    def fail(message: str):
        raise ScenarioError(f"{where}: {message}")

    phases = []
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
    if not phases:
        fail("no [[phases]]")
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
    return Scenario(str(data.get("name", "scenario")), str(data.get("description", "")),
                    phases, profiles, server, processes,
                    parse_duration(data.get("drain", "20s")), path, data)


def load(path: str) -> Scenario:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ScenarioError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    return from_dict(data, path)
