"""`poolmgr plan`: capacity planning from a Postfix mail log or a bench result.

`parse_maillog` reads smtpd and postscreen lines (Postfix's, or poolmgr's own, which follow
the same format: poolmgr's SMTP worker writes postscreen's PREGREET, DNSBL rank... lines in its
smtpd session, and they name that session's nuisance reason) into sessions. Classic syslog
timestamps carry neither year nor zone: they are read in the zone given (`--tz`, default the
local one) and the year given; ISO timestamps (rsyslog's RFC 3339 format) carry their own
offset. Each session has: start, end, and whether the session was legitimate (it delivered:
`data=N` accepted in the disconnect line) or nuisance, with a reason, and whether it was
refused at connect. Every connection offered counts, not only those smtpd saw: postscreen's
`CONNECT from` opens one, its tests (PREGREET, DNSBL rank, HANGUP...) name its reason, `PASS
NEW/OLD` hands it on to smtpd (counted there), and `NOQUEUE: reject: CONNECT from ...: all
screening ports busy` or `too many connections` refuses it; so does smtpd's (and poolmgr's)
`Connection concurrency|rate limit exceeded` or `NOQUEUE: reject: CONNECT from ...`. `per_minute` reports
arrivals, nuisance ratio, hold times and peak concurrency per minute; `recommend` sizes the
pools with the arithmetic shown, by Little's law: concurrency = arrival rate x hold time.
"""

__all__ = ["Session", "zone", "parse_maillog", "sessions_from_bench", "per_minute", "recommend",
           "render"]

import math
import re
import statistics
from dataclasses import dataclass
from datetime import datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_SYSLOG = re.compile(r"^(?P<ts>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d(?:\.\d+)?) \S+ "
                     r"(?P<prog>[\w/.-]+)\[(?P<pid>\d+)\]: (?P<msg>.*)$")
_ISO = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:[+-]\d\d:?\d\d|Z)?) \S+ "
                  r"(?P<prog>[\w/.-]+)\[(?P<pid>\d+)\]: (?P<msg>.*)$")
_CLIENT = r"(?:[^\s\[]*)\[(?P<ip>[^\]]+)\]"
_SMTPD_CONNECT = re.compile(r"^connect from " + _CLIENT)
_SMTPD_DISCONNECT = re.compile(r"^disconnect from " + _CLIENT + r"(?P<stats>.*)$")
_SMTPD_LOST = re.compile(r"^(?:lost connection|timeout) after (?P<cmd>\S+) from " + _CLIENT)
# smtpd's `unknown[ip]: 550`, or postscreen's `[ip]:port: 550` (poolmgr's enforced clients)
_SMTPD_REJECT = re.compile(r"^NOQUEUE: reject: (?P<stage>\S+) from " + _CLIENT +
                           r"(?::\d+)?: (?P<code>\d{3})")
# anvil's limits as Postfix's smtpd (and poolmgr's) log them: the connection is refused
_SMTPD_LIMIT = re.compile(r"^(?:warning: )?Connection (?:concurrency|rate) limit exceeded: "
                          r"\d+ from " + _CLIENT)
# postscreen refusing a connection outright: `NOQUEUE: reject: CONNECT from [ip]:port: all
# screening ports busy` (or `too many connections`); no test ran, nothing is handed on.
_PS_REFUSED = re.compile(r"^(?:NOQUEUE: )?reject: connect from \[(?P<ip>[^\]]+)\]:"
                         r"(?P<port>\d+): (?P<why>.*)$", re.I)
_PS_CONNECT = re.compile(r"^CONNECT from \[(?P<ip>[^\]]+)\]:(?P<port>\d+)")
_PS_END = re.compile(r"^(?:DISCONNECT|PASS (?:NEW|OLD)) \[(?P<ip>[^\]]+)\]:(?P<port>\d+)")
_PS_EVENT = re.compile(r"^(?P<what>PREGREET|DNSBL rank|HANGUP|COMMAND PIPELINING|"
                       r"COMMAND COUNT LIMIT|BARE NEWLINE|NON-SMTP COMMAND|DENYLISTED|"
                       r"BLACKLISTED)\b.*?\[(?P<ip>[^\]]+)\]:(?P<port>\d+)")
_DATA = re.compile(r"\bdata=(\d+)(?:/(\d+))?")
_COMMANDS = re.compile(r"\bcommands=(\d+)(?:/(\d+))?")


@dataclass
class Session:
    start: float
    end: float
    legit: bool
    reason: str = ""   # nuisance reason; "" for legit
    source: str = "smtpd"
    refused: bool = False  # turned away at connect (busy, too many connections, denylisted)
    data: bool = False     # a message was handed to the scanner pool (or the queue)

    @property
    def hold(self) -> float:
        return max(0.0, self.end - self.start)


def zone(name: str | None) -> tzinfo | None:
    """The time zone called `name` (IANA, e.g. "Europe/Berlin"); None for "" or "local"."""
    if not name or name == "local":
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def _timestamp(text: str, year: int, tz: tzinfo | None) -> float:
    if text[:4].isdigit():
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    else:
        stamp = datetime.strptime(f"{year} {text}", "%Y %b %d %H:%M:%S" +
                                  (".%f" if "." in text else ""))
    if stamp.tzinfo is None and tz is not None:
        stamp = stamp.replace(tzinfo=tz)
    return stamp.timestamp()  # naive: local time, as the syslog daemon wrote it


def _ps_reason(what: str) -> str:
    """"DNSBL rank" -> "dnsbl", "COMMAND PIPELINING" -> "command_pipelining"."""
    return what.lower().replace(" rank", "").replace(" ", "_")


def parse_maillog(lines, year: int | None = None, tz: tzinfo | None = None) -> list[Session]:
    """Sessions from smtpd and postscreen lines; other lines are ignored.

    Timestamps without a zone are read in `tz` (None: the local zone)."""
    year = year or datetime.now(tz).year
    open_smtpd: dict[tuple[str, str], list[tuple[float, str]]] = {}
    open_ps: dict[tuple[str, str], tuple[float, str]] = {}
    sessions: list[Session] = []
    for line in lines:
        match = _SYSLOG.match(line) or _ISO.match(line)
        if not match:
            continue
        prog, pid, msg = match["prog"], match["pid"], match["msg"]
        try:
            when = _timestamp(match["ts"], year, tz)
        except ValueError:
            continue
        if prog.endswith("/smtpd"):
            if m := _SMTPD_CONNECT.match(msg):
                open_smtpd.setdefault((pid, m["ip"]), []).append((when, ""))
            elif m := _PS_EVENT.match(msg):  # poolmgr's: postscreen's tests in smtpd's session
                stack = open_smtpd.get((pid, m["ip"]))
                if stack and not stack[-1][1]:
                    stack[-1] = (stack[-1][0], _ps_reason(m["what"]))
            elif m := _SMTPD_LIMIT.match(msg):
                stack = open_smtpd.get((pid, m["ip"]))
                if stack:
                    stack[-1] = (stack[-1][0], "refused")
            elif m := _SMTPD_REJECT.match(msg):
                stack = open_smtpd.get((pid, m["ip"]))
                if stack:
                    reason = "refused" if m["stage"].upper() == "CONNECT" else \
                        f"reject_{m['code']}"
                    stack[-1] = (stack[-1][0], stack[-1][1] or reason)
            elif m := _SMTPD_LOST.match(msg):
                stack = open_smtpd.get((pid, m["ip"]))
                if stack and not stack[-1][1]:
                    kind = "lost" if msg.startswith("lost") else "timeout"
                    reason = ("lost_after_connect" if m["cmd"] == "CONNECT" and kind == "lost"
                              else f"{kind}_after_{m['cmd'].lower()}")
                    stack[-1] = (stack[-1][0], reason)
            elif m := _SMTPD_DISCONNECT.match(msg):
                stack = open_smtpd.get((pid, m["ip"]))
                if not stack:
                    continue
                started, reason = stack.pop(0)
                data = _DATA.search(m["stats"])
                delivered = bool(data) and int(data[1]) > 0
                commands = _COMMANDS.search(m["stats"])
                if not delivered and not reason:
                    reason = ("lost_after_connect" if commands and commands[1] == "0" and
                              not commands[2] else "no_delivery")
                sessions.append(Session(started, when, delivered, "" if delivered else reason,
                                        refused=reason == "refused", data=delivered))
        elif prog.endswith("/postscreen"):
            if m := _PS_CONNECT.match(msg):
                open_ps[(m["ip"], m["port"])] = (when, "")
            elif m := _PS_REFUSED.match(msg):
                entry = open_ps.pop((m["ip"], m["port"]), None)
                why = "busy" if "busy" in m["why"] else "refused"
                sessions.append(Session(entry[0] if entry else when, when, False,
                                        f"refused_{why}" if why == "busy" else why,
                                        "postscreen", refused=True))
            elif m := _PS_EVENT.match(msg):
                key = (m["ip"], m["port"])
                if key in open_ps and not open_ps[key][1]:
                    open_ps[key] = (open_ps[key][0], _ps_reason(m["what"]))
            elif m := _PS_END.match(msg):
                entry = open_ps.pop((m["ip"], m["port"]), None)
                if entry and (entry[1] or msg.startswith("DISCONNECT")):
                    # a client that passed goes on to smtpd and is counted there
                    sessions.append(Session(entry[0], when, False, entry[1] or "hangup",
                                            "postscreen"))
    # Connections the log ends in the middle of were offered too.
    end = max((s.end for s in sessions), default=0.0)
    for started, reason in open_ps.values():
        sessions.append(Session(started, max(end, started), False, reason or "open",
                                "postscreen"))
    return sorted(sessions, key=lambda s: s.start)


def sessions_from_bench(result: dict) -> list[Session]:
    """Sessions as a bench run's clients saw them (`connections` in result.json), by start;
    a bot's reason is its profile."""
    base = result.get("started", 0.0)
    sessions = []
    for t, held, legit, *more in result.get("connections", []):
        profile, data = (more + ["bot", legit])[:2]  # results before profiles were recorded
        sessions.append(Session(base + t, base + t + held, legit, "" if legit else profile,
                                "bench", data=data))
    return sorted(sessions, key=lambda s: s.start)


def per_minute(sessions: list[Session]) -> list[dict]:
    if not sessions:
        return []
    first = math.floor(sessions[0].start / 60) * 60
    last = max(s.end for s in sessions)
    minutes = []
    events = sorted([(s.start, 1) for s in sessions] + [(s.end, -1) for s in sessions])
    buckets: dict[int, list[Session]] = {}
    for session in sessions:
        buckets.setdefault(int((session.start - first) // 60), []).append(session)
    i, live = 0, 0
    t = first
    while t <= last:
        inside = buckets.get(int((t - first) // 60), [])
        peak = live
        while i < len(events) and events[i][0] < t + 60:
            live += events[i][1]
            peak = max(peak, live)
            i += 1
        nuisance = sum(1 for s in inside if not s.legit)
        holds = [s.hold for s in inside]
        minutes.append({
            "minute": t, "connections": len(inside), "legit": len(inside) - nuisance,
            "refused": sum(1 for s in inside if s.refused),
            "nuisance_ratio": round(nuisance / len(inside), 3) if inside else 0.0,
            "hold_mean_s": round(statistics.fmean(holds), 2) if holds else 0.0,
            "hold_p95_s": round(sorted(holds)[int(0.95 * (len(holds) - 1))], 2) if holds else 0.0,
            "peak_concurrency": peak})
        t += 60
    return minutes


def recommend(sessions: list[Session], sessions_per_worker: int = 2000,
              scan_seconds: float = 1.0, headroom: float = 2.0) -> dict:
    """Pool sizes from the busiest and the typical minute, with the arithmetic."""
    minutes = per_minute(sessions)
    if not minutes:
        return {"minutes": [], "lines": ["no smtpd or postscreen sessions found"]}
    busiest = max(minutes, key=lambda m: m["connections"])
    typical = sorted(minutes, key=lambda m: m["connections"])[len(minutes) // 2]
    lines = []

    def concurrency(minute: dict, label: str) -> float:
        rate = minute["connections"] / 60
        value = rate * minute["hold_mean_s"]
        lines.append(f"{label} minute: {minute['connections']} connections = {rate:.2f}/s x "
                     f"mean hold {minute['hold_mean_s']:.1f}s = {value:.1f} concurrent sessions "
                     f"(Little's law; peak seen {minute['peak_concurrency']})")
        return max(value, minute["peak_concurrency"])

    peak = concurrency(busiest, "busiest")
    calm = concurrency(typical, "typical")
    ceiling = max(2, math.ceil(peak * headroom / sessions_per_worker))
    floor = max(2, math.ceil(calm * headroom / sessions_per_worker))
    lines.append(f"SMTP pool: ceiling = ceil({peak:.1f} x {headroom:g} headroom / "
                 f"{sessions_per_worker} sessions per worker) = {ceiling} (at least 2); floor "
                 f"= ceil({calm:.1f} x {headroom:g} / {sessions_per_worker}) = {floor}")
    legit_rate = busiest["legit"] / 60
    scanners = max(2, math.ceil(legit_rate * scan_seconds * headroom))
    lines.append(f"scanner pool: {busiest['legit']} legitimate sessions in the busiest minute = "
                 f"{legit_rate:.2f}/s x {scan_seconds:g}s per scan x {headroom:g} headroom = "
                 f"{legit_rate * scan_seconds * headroom:.1f} -> {scanners} workers "
                 f"(at least 2)")
    floor = max(floor, scanners)
    ceiling = max(ceiling, floor)
    lines.append(f"rule: scanner <= SMTP, so the SMTP floor is at least {scanners}")
    total = len(sessions)
    nuisance = sum(1 for s in sessions if not s.legit)
    refused = sum(1 for s in sessions if s.refused)
    lines.insert(0, f"offered load: {total} connections, {refused} refused at connect "
                    f"({refused / total:.0%}), {total - nuisance} legitimate")
    return {"minutes": minutes, "sessions": total, "refused": refused,
            "nuisance_ratio": round(nuisance / total, 3) if total else 0.0,
            "smtp": {"min_workers": floor, "max_workers": ceiling},
            "scanner": {"min_workers": scanners, "max_workers": max(scanners, 2 * scanners)},
            "lines": lines}


def render(plan: dict, tz: tzinfo | None = None) -> str:
    out = []
    if plan.get("minutes"):
        out.append(f"{plan['sessions']} sessions, nuisance ratio {plan['nuisance_ratio']:.2f}")
        out.append(f"{'minute':<17} {'conns':>6} {'refused':>7} {'legit':>6} {'nuisance':>8} "
                   f"{'hold mean':>9} {'hold p95':>8} {'peak conc.':>10}")
        for m in plan["minutes"]:
            stamp = datetime.fromtimestamp(m["minute"], tz).strftime("%Y-%m-%d %H:%M")
            out.append(f"{stamp:<17} {m['connections']:>6} {m['refused']:>7} {m['legit']:>6} "
                       f"{m['nuisance_ratio']:>8.2f} {m['hold_mean_s']:>8.1f}s "
                       f"{m['hold_p95_s']:>7.1f}s {m['peak_concurrency']:>10}")
        out.append("")
    out += plan["lines"]
    if "smtp" in plan:
        out += ["", "recommended:", "[smtp]", f"min_workers = {plan['smtp']['min_workers']}",
                f"max_workers = {plan['smtp']['max_workers']}", "[scanner]",
                f"min_workers = {plan['scanner']['min_workers']}",
                f"max_workers = {plan['scanner']['max_workers']}"]
    return "\n".join(out)
