"""A soak scenario (`kind = "soak"`): one poolmgr node for a long time (an hour as shipped)
under steady legitimate mail, with what a real MX lives through on the way, and whether
anything grows or gets lost.

The node is the bench's poolmgr target (`targets.started`: greet test, DNSBL, recipient
validation, its scanner pool re-injecting into smtp-sink), sized by [server]; with `cluster` it
has [cluster] on a private Redis. The load generator (`benchmark.load`) runs the soak's phases
(`scenario.soak_phases`): `legit_rate` legitimate messages a second all along, and the `storm`
bots added for `storm_length` at `first_storm` and every `storm_every` after it. Meanwhile, at
fixed shares of the duration (`timeline`), `Soak.tick` does to the node what operations and
failures do: SIGHUP (reload) at 3%, SIGUSR2 (upgrade: a new master from then on, found by the
pidfile) at 5%, the next hop (smtp-sink) stopped for `next_hop_down` at 30% and at 70% (poolmgr
must answer 4xx meanwhile), Redis stopped for `redis_down` at 85%. Every `sample_every` it
samples the master and each pool: processes, RSS and PSS (psutil memory_full_info), open fds,
and the tracebacks in poolmgr's log so far.

Figures: messages sent, 250'd, 4xx'd, 5xx'd, failed, found at the sink by Message-ID and lost
(250'd yet not at the sink: must be 0; a 4xx'd message stays with its sender, which retries
it); per outage the replies to messages sent and answered while the next hop was down; per
storm the legitimate latency p50/p99 (messages started from the storm's start until its bots
are gone) beside the steady p99, the storm's onset (the first second its offered rate exceeds
the calm one by `storm_threshold`, `report.storm_onsets`) and its storm reaction (from the
onset to the first new SMTP worker accepting, from a status sample each second while a storm is
on; None when the pool did not grow); the memory and fd series, and their growth from `warmup`
to the end (the highest sample of the first `storm_every` against the highest of the last,
`growth`; master: its own figures; a pool: per worker, since the autoscaler changes the
pool's size), against `max_growth_pct`; tracebacks (0 expected); the events and when they
happened. Written to OUT/result.json and OUT/report.md, with connections.png and latency.png
(`report.plots`) and memory.png.
"""

__all__ = ["measure", "summary_lines", "timeline", "LOG_MARKS"]

import os
import signal
import time
from collections import Counter
from pathlib import Path

import psutil

from . import load as loadgen
from .report import first_new_worker, percentile, plots, save_result, storm_onsets
from .run import found_ids, generate
from .scenario import RELOAD_AT, UPGRADE_AT, Scenario, soak_storms
from .targets import settled, started, tree

TRACEBACK = b"Traceback (most recent call last)"
# What is counted in poolmgr's log: tracebacks, and that the reload and the upgrade happened
LOG_MARKS = {"tracebacks": TRACEBACK, "reloads": b"reload: configuration ",
             "upgrades": b"upgrade: serving; stopping the old master"}
POOLS = ("smtp", "scanner")
# What growth is measured of, per group of processes (fds: their floor, `Soak.note_fds`)
MEASURES = ("rss", "pss", "fds_floor")


def timeline(settings: dict) -> list[tuple[float, str]]:
    """The soak's events: (seconds from the start, event), in order."""
    length = settings["duration"]
    events = []
    if settings["reload"]:
        events.append((RELOAD_AT * length, "reload"))
    if settings["upgrade"]:
        events.append((UPGRADE_AT * length, "upgrade"))
    for share in (0.30, 0.70):
        events += [(share * length, "next_hop_down"),
                   (share * length + settings["next_hop_down"], "next_hop_up")]
    if settings["cluster"]:
        events += [(0.85 * length, "redis_down"),
                   (0.85 * length + settings["redis_down"], "redis_up")]
    return sorted(events)


class Soak:
    """What happens to the node during the load, and what is sampled of it (`tick`, called
    every second by `run.generate`)."""

    def __init__(self, scenario: Scenario, target, sink):
        self.settings = scenario.measure
        self.target, self.pm, self.sink = target, target.pm, sink
        self.due = timeline(self.settings)
        self.events: list[dict] = []
        self.samples: list[dict] = []
        self.next_sample = 0.0
        self.upgrading: int | None = None  # the old master's pid until the new one serves
        self.log_offset, self.log_tails, self.marks = 0, {}, Counter()
        self.fd_floor: dict[str, float] = {}
        # The SMTP pool each second around a storm (its workers' starts and sessions): the
        # storm reaction. From a little before the storm until its bots are well in.
        self.storms = [(start - 2, end + 15) for start, end in soak_storms(self.settings)]
        self.pool_samples: list[dict] = []

    def master_pid(self) -> int:
        """The master now: after a USR2 upgrade the successor, which wrote the pidfile."""
        try:
            return int((self.pm.dir / "poolmgr.pid").read_text().strip())
        except (OSError, ValueError):
            return self.pm.proc.pid

    def tick(self, t: float) -> dict:
        while self.due and self.due[0][0] <= t:
            due, name = self.due.pop(0)
            began = time.monotonic()
            detail = getattr(self, name)()
            # An outage begins once the next hop is down: a message sent while it was being
            # stopped may still have reached it (a 250 then is right, and no outage's).
            at = t + (time.monotonic() - began) if name.endswith("_down") else t
            self.event(at, name, detail)
            if name.endswith("_down"):  # an outage lasts as asked, however late it began
                up = next(i for i, (_, event) in enumerate(self.due)
                          if event == name[:-5] + "_up")
                self.due[up] = (self.due[up][0] + t - due, self.due[up][1])
                self.due.sort()
        if self.upgrading and self.pm.proc.poll() is not None and \
                self.master_pid() != self.upgrading:
            self.event(t, "upgraded", f"master {self.upgrading} -> {self.master_pid()}")
            self.upgrading = None
        if any(start <= t <= end for start, end in self.storms):
            self.pool_samples.append({"t": t, **self.target.sample()})
        if t >= self.next_sample:
            self.samples.append(self.sample(t))
            self.next_sample += self.settings["sample_every"]
        elif t >= 0:
            self.note_fds()
        return {"t": t}

    def event(self, t: float, name: str, detail: str) -> None:
        # To the millisecond, as the load's records: an outage's span rounded to a tenth could
        # take in the 250 of a message answered just after the next hop came back.
        self.events.append({"t": round(t, 3), "event": name, "detail": detail})
        print(f"poolmgr bench: soak t={t:.0f}s {name}: {detail}", flush=True)

    # -- the events
    def reload(self) -> str:
        pid = self.master_pid()
        os.kill(pid, signal.SIGHUP)
        return f"SIGHUP to master {pid}"

    def upgrade(self) -> str:
        self.upgrading = pid = self.master_pid()
        os.kill(pid, signal.SIGUSR2)
        return f"SIGUSR2 to master {pid}"

    def next_hop_down(self) -> str:
        self.sink.proc.terminate()  # not Sink.stop, which removes the messages
        self.sink.proc.wait(10)
        return f"smtp-sink on port {self.sink.port} stopped"

    def next_hop_up(self) -> str:
        self.sink.start()
        return f"smtp-sink on port {self.sink.port} started"

    def redis_down(self) -> str:
        self.target.redis.stop(keep=True)
        return f"redis-server on port {self.target.redis.port} stopped"

    def redis_up(self) -> str:
        self.target.redis.start()
        return f"redis-server on port {self.target.redis.port} started"

    def finish(self, t: float) -> None:
        """After the load: the events still due (what is down comes back), a last count of
        tracebacks."""
        for _, name in self.due:
            self.event(t, name, getattr(self, name)())
        self.due = []
        self.count_tracebacks()

    def stop_successor(self) -> None:
        """A master the upgrade started is no child of ours: stop it by its pid."""
        pid = self.master_pid()
        if pid != self.pm.proc.pid and psutil.pid_exists(pid):
            os.kill(pid, signal.SIGTERM)
            psutil.Process(pid).wait(60)

    # -- the samples
    def count_tracebacks(self) -> int:
        """Tracebacks (and reloads, upgrades: `LOG_MARKS`) in poolmgr's log, which the
        successor writes to too, read on from where the last count stopped (with each mark's
        end before, shorter than the mark, where one may have been cut)."""
        try:
            with open(self.pm.log_path, "rb") as handle:
                handle.seek(self.log_offset)
                new = handle.read()
        except OSError:
            return self.marks["tracebacks"]
        self.log_offset += len(new)
        for name, mark in LOG_MARKS.items():
            text = self.log_tails.get(name, b"") + new
            self.marks[name] += text.count(mark)
            self.log_tails[name] = text[-(len(mark) - 1):]
        return self.marks["tracebacks"]

    def groups(self) -> dict[str, list[int]]:
        """The pids of the master, each pool's running workers, and the master's whole tree."""
        status = self.pm.try_status()
        master = status["master"]["pid"] if status else self.master_pid()
        groups = {"master": [master]}
        for pool in POOLS:
            groups[pool] = [w["pid"] for w in status["pools"][pool]["worker_list"]
                            if w["state"] == "running"] if status else []
        groups["all"] = [p.pid for p in tree(master)]
        return groups

    def note_fds(self) -> None:
        """The fewest open fds (a pool: per worker) since the last sample: a session holds a
        socket or two, so the figure at one instant follows the sessions open; the floor is
        what stays when they are gone."""
        for name, pids in self.groups().items():
            counts = []
            for pid in pids:
                try:
                    counts.append(psutil.Process(pid).num_fds())
                except psutil.Error:
                    continue
            if counts:
                value = sum(counts) if name in ("master", "all") else sum(counts) / len(counts)
                self.fd_floor[name] = min(self.fd_floor.get(name, value), value)

    def sample(self, t: float) -> dict:
        self.note_fds()
        groups = self.groups()
        point = {"t": round(t, 1), "master_pid": groups["master"][0]}
        for name, pids in groups.items():
            figures = dict.fromkeys(("processes", "rss", "pss", "fds"), 0)
            for pid in pids:
                try:
                    proc = psutil.Process(pid)
                    memory = proc.memory_full_info()
                    fds = proc.num_fds()
                except psutil.Error:  # it ended meanwhile
                    continue
                figures["processes"] += 1
                figures["rss"] += memory.rss
                figures["pss"] += getattr(memory, "pss", memory.rss)
                figures["fds"] += fds
            figures["fds_floor"] = round(self.fd_floor.get(name, 0), 1)
            point[name] = figures
        self.fd_floor = {}
        point["tracebacks"] = self.count_tracebacks()
        return point


def per_process(point: dict, group: str, measure: str) -> float | None:
    """The master's own figure; a pool's per worker (the autoscaler changes its size)."""
    figures = point[group]
    if group == "master" or measure == "fds_floor":
        return figures[measure] if figures["processes"] else None
    return figures[measure] / figures["processes"] if figures["processes"] else None


def growth(samples: list[dict], warmup: float, end: float, period: float) -> dict:
    """Each group's and measure's growth in percent from the highest sample of the first
    `period` after `warmup` to the highest of the last `period` before `end`: {"master":
    {"rss": 1.2, ...}, "smtp": ...}. Peaks over a period, not two samples: memory has a
    sawtooth of its own (a storm's allocations; a recycled worker, forked afresh, shares all
    of the master's pages again, and the master's PSS drops until it has written to them),
    and two single samples measured where each fell in it (13.8% between minute 10, just
    after a recycle, and minute 60, with RSS flat). A leak raises the last period's peak."""
    window = [s for s in samples if warmup <= s["t"] <= end + 1]
    result: dict = {"from_s": window[0]["t"] if window else None,
                    "to_s": window[-1]["t"] if window else None, "period_s": period}
    first = [s for s in window if s["t"] < window[0]["t"] + period] if window else []
    last = [s for s in window if s["t"] > window[-1]["t"] - period] if window else []
    for group in ("master", *POOLS):
        result[group] = {}
        for measure in MEASURES:
            peaks = [max(values, default=None) for values in (
                [v for v in (per_process(s, group, measure) for s in part) if v is not None]
                for part in (first, last))]
            known = len(window) > 1 and None not in peaks and peaks[0]
            result[group][measure] = round(100 * (peaks[1] - peaks[0]) / peaks[0], 1) \
                if known else None
            # what the percentage is of: a few fds more is a large share of ten
            result[group][f"{measure}_from_to"] = [round(peaks[0], 1), round(peaks[1], 1)] \
                if known else None
    found = [result[g][m] for g in ("master", *POOLS) for m in MEASURES
             if result[g][m] is not None]
    result["max_pct"] = max(found) if found else None
    return result


def message_figures(messages: list[dict], found: set[str]) -> dict:
    outcomes = Counter(m["outcome"] or "unfinished" for m in messages)
    lost = [m["id"] for m in messages if m["outcome"] == "accepted" and m["id"] not in found]
    return {"sent": len(messages), "accepted": outcomes["accepted"],
            "deferred": outcomes["deferred"], "refused": outcomes["refused"],
            "failed": outcomes["failed"] + outcomes["unfinished"],
            "found_at_sink": sum(1 for m in messages if m["id"] in found),
            "lost": len(lost), "lost_ids": lost[:20],
            # the next hop has it, the client was told 4xx: its retry makes a duplicate
            "deferred_yet_at_sink": sum(1 for m in messages
                                        if m["outcome"] == "deferred" and m["id"] in found),
            "replies_not_250": dict(Counter(m["reply"][:40] for m in messages
                                            if m["outcome"] != "accepted").most_common(5))}


def windows(events: list[dict], down: str, up: str) -> list[tuple[float, float]]:
    starts = [e["t"] for e in events if e["event"] == down]
    ends = [e["t"] for e in events if e["event"] == up]
    return list(zip(starts, ends + [float("inf")] * (len(starts) - len(ends))))


def outage_figures(messages: list[dict], spans: list[tuple[float, float]]) -> list[dict]:
    """Per outage of the next hop: the replies to the messages sent and answered while it was
    down (one sent just before may have reached the next hop before it stopped: a 250 then is
    right, and not counted here)."""
    result = []
    for start, end in spans:
        replied = [m for m in messages if m["latency"] is not None and
                   start <= m["t"] and m["t"] + m["latency"] <= end]
        outcomes = Counter(m["outcome"] for m in replied)
        result.append({"from_s": start, "to_s": end, "replies": len(replied),
                       "accepted": outcomes["accepted"], "deferred": outcomes["deferred"],
                       "other": len(replied) - outcomes["accepted"] - outcomes["deferred"],
                       "deferred_reply": next((m["reply"] for m in replied
                                               if m["outcome"] == "deferred"), "")})
    return result


def storm_figures(scenario: Scenario, load: dict, outages: list[tuple[float, float]],
                  pool_samples: list[dict] = (), t0: float = 0.0) -> tuple[list[dict], dict]:
    """Per storm, the legitimate latency from its start until its bots are gone (their
    longest hold or patience), its onset and storm reaction; and the latency outside every
    storm and outage (steady)."""
    messages, bots = load["messages"], load["bots"]
    _, onsets = storm_onsets(load, scenario)
    settings = scenario.measure
    storms = soak_storms(settings)
    linger = max((v for p in settings["storm"] for k, v in scenario.profiles[p].items()
                  if k in ("hold", "give_up")), default=0.0)
    spans = [(start, min(end + linger, storms[n + 1][0] if n + 1 < len(storms)
                         else settings["duration"]))
             for n, (start, end) in enumerate(storms)]

    def latency(chosen: list[dict]) -> dict:
        accepted = [m["latency"] for m in chosen if m["outcome"] == "accepted"]
        return {"messages": len(chosen), "accepted": len(accepted),
                "p50_s": percentile(accepted, 0.50), "p99_s": percentile(accepted, 0.99)}

    result = []
    for n, (start, end) in enumerate(spans):
        mine = [m for m in messages if start <= m["t"] < end]
        onset = next((o for o in onsets if start - 1 <= o < storms[n][1]), None)
        _, accepting = first_new_worker(pool_samples, onset, t0)
        result.append({"storm": n + 1, "from_s": start, "to_s": round(end, 1),
                       "bot_connections": sum(1 for b in bots
                                              if storms[n][0] <= b["t"] < storms[n][1]),
                       "onset_s": onset, "storm_reaction_s": round(accepting - onset, 1)
                       if accepting is not None else None,
                       **latency(mine)})
    busy = spans + outages
    steady = [m for m in messages
              if not any(a <= m["t"] + (m["latency"] or 0) and m["t"] <= b for a, b in busy)]
    return result, latency(steady)


def measure(scenario: Scenario, out: Path) -> dict:
    """The soak against one poolmgr node; result.json and report.md in `out`."""
    settings = scenario.measure
    began = time.time()
    recipients = scenario.profiles["legit"]["recipients"]
    with started("poolmgr", scenario.server, recipients,
                 loadgen.listed_prefixes(scenario.processes),
                 cluster=settings["cluster"]) as (target, sink, _, work):
        soak = Soak(scenario, target, sink)
        try:
            load, _, t0 = generate(scenario, target.addresses, work, soak.tick)
            soak.finish(round(time.time() - t0, 1))
            accepted = sum(1 for m in load["messages"] if m["outcome"] == "accepted")
            arrived = settled(sink, expect=accepted)
        finally:
            soak.stop_successor()
    found = found_ids(arrived)
    outages = windows(soak.events, "next_hop_down", "next_hop_up")
    storms, steady = storm_figures(scenario, load, outages, soak.pool_samples, t0)
    figures = {"messages": message_figures(load["messages"], found),
               "outages": outage_figures(load["messages"], outages),
               "storms": storms, "steady": steady,
               "tracebacks": soak.marks["tracebacks"],
               "log": {name: soak.marks[name] for name in LOG_MARKS},
               "growth": growth(soak.samples, settings["warmup"], settings["duration"],
                                settings["storm_every"]),
               "max_growth_pct": settings["max_growth_pct"],
               "events": soak.events, "samples": soak.samples,
               "bot_connections": len(load["bots"])}
    growth_pct = figures["growth"]["max_pct"]
    figures["flat"] = growth_pct is not None and growth_pct <= settings["max_growth_pct"]
    result = save_result(out, scenario, began, figures)
    title = f"{scenario.name} / poolmgr"
    images = plots(out, load, [], title) + [memory_plot(out, figures, title)]
    write_report(out, scenario, figures, images)
    return result


def memory_plot(out: Path, f: dict, title: str) -> str:
    """memory.png: PSS and the fd floor of the master and per pool worker over time, with
    the events; returns its name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, fds) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    t = [p["t"] for p in f["samples"]]
    for group, label in (("master", "master"), ("smtp", "SMTP worker"),
                         ("scanner", "scanner worker")):
        memory.plot(t, [(per_process(p, group, "pss") or 0) / 2**20 for p in f["samples"]],
                    marker=".", label=label)
        fds.plot(t, [per_process(p, group, "fds_floor") or 0 for p in f["samples"]],
                 marker=".", label=label)
    for axis in (memory, fds):
        for event in f["events"]:
            axis.axvline(event["t"], color="grey", linewidth=0.6, linestyle=":")
        axis.legend(loc="upper left", fontsize=8)
    memory.set_ylabel("PSS, MiB")
    fds.set_ylabel("open fds (floor)")
    fds.set_xlabel("seconds (dotted: events)")
    memory.set_title(f"{title}: memory and file descriptors")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=90)
    plt.close(fig)
    return "memory.png"


def summary_lines(f: dict) -> list[str]:
    m, g = f["messages"], f["growth"]
    lines = [f"messages: sent {m['sent']}, 250'd {m['accepted']}, 4xx'd {m['deferred']}, "
             f"5xx'd {m['refused']}, failed {m['failed']}; at the sink {m['found_at_sink']}; "
             f"lost {m['lost']}",
             f"poolmgr's log: {f['tracebacks']} tracebacks; {f['log']['reloads']} reload(s) and "
             f"{f['log']['upgrades']} upgrade(s) done",
             f"growth from {_minutes(g['from_s'])} to {_minutes(g['to_s'])} (the peak of "
             f"the first {_minutes(g['period_s'])} against the last's; RSS, PSS, fds; "
             f"master, per pool worker): at most "
             f"{g['max_pct']}% (goal: {f['max_growth_pct']:g}%: "
             f"{'met' if f['flat'] else 'NOT met'})"]
    lines += [f"next hop down {o['from_s']:.0f}s..{o['to_s']:.0f}s: {o['deferred']} replies 4xx, "
              f"{o['accepted']} 250" for o in f["outages"]]
    lines += [f"storm {s['storm']} at {s['from_s']:.0f}s: legitimate p99 {s['p99_s']}s "
              f"({s['accepted']} of {s['messages']} accepted; {s['bot_connections']} bots); "
              f"onset {_seconds(s.get('onset_s'))}, storm reaction "
              f"{_seconds(s.get('storm_reaction_s'))} ('-': the SMTP pool did not grow)"
              for s in f["storms"]]
    lines.append(f"steady: legitimate p99 {f['steady']['p99_s']}s")
    return lines


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} minutes" if seconds >= 120 else f"{seconds:.0f}s"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:g}s"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def write_report(out: Path, scenario: Scenario, f: dict, images: list[str]) -> None:
    s, m = scenario.measure, f["messages"]
    storm = ", ".join(f"{profile} {rate:g}/s" for profile, rate in s["storm"].items())
    lines = [f"# poolmgr bench: {scenario.name} (a soak of {_minutes(s['duration'])})", "",
             *([scenario.description, ""] if scenario.description else []),
             f"{s['legit_rate']:g} legitimate messages/s; storms of {s['storm_length']:g}s "
             f"every {s['storm_every']:g}s ({storm}); "
             f"samples every {s['sample_every']:g}s; growth measured from {s['warmup']:g}s.", "",
             "## Messages", "", "| sent | 250 | 4xx | 5xx | failed | at the sink | lost |",
             "|---|---|---|---|---|---|---|",
             f"| {m['sent']} | {m['accepted']} | {m['deferred']} | {m['refused']} | "
             f"{m['failed']} | {m['found_at_sink']} | {m['lost']} |", "",
             "A 4xx'd message stays with its sender, which retries it; lost counts 250'd "
             "messages the next hop does not hold.", "",
             "## Events", "", "| t (s) | event | detail |", "|---|---|---|"]
    lines += [f"| {e['t']:.1f} | {e['event']} | {e['detail']} |" for e in f["events"]]
    lines += ["", "## Next hop down", "", "| from (s) | to (s) | replies | 4xx | 250 | 4xx text |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {o['from_s']:.1f} | {o['to_s']:.1f} | {o['replies']} | {o['deferred']} | "
              f"{o['accepted']} | {o['deferred_reply'] or '-'} |" for o in f["outages"]]
    lines += ["", "## Legitimate latency per storm", "",
              "| storm | from (s) | to (s) | bots | messages | accepted | p50 (s) | p99 (s) "
              "| onset (s) | storm reaction (s) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {x['storm']} | {x['from_s']} | {x['to_s']} | {x['bot_connections']} | "
              f"{x['messages']} | {x['accepted']} | {x['p50_s']} | {x['p99_s']} | "
              f"{_seconds(x.get('onset_s'))} | {_seconds(x.get('storm_reaction_s'))} |"
              for x in f["storms"]]
    st = f["steady"]
    lines += [f"| steady | | | | {st['messages']} | {st['accepted']} | {st['p50_s']} | "
              f"{st['p99_s']} | | |", "",
              "## Memory and file descriptors", "",
              "Master: its own; a pool: per worker. RSS and PSS in MiB at the sample; fds: the "
              "fewest open since the sample before (sessions hold sockets; the floor is what "
              "stays when they are gone).", "",
              "| t (s) | master RSS | master PSS | master fds | SMTP workers | RSS | PSS | fds "
              "| scanner workers | RSS | PSS | fds | tree RSS | tree PSS | tracebacks |",
              "|" + "---|" * 16]
    for p in f["samples"]:
        row = [str(p["t"]), _mib(p["master"]["rss"]), _mib(p["master"]["pss"]),
               str(p["master"]["fds_floor"])]
        for pool in POOLS:
            row += [str(p[pool]["processes"]), _mib(per_process(p, pool, "rss")),
                    _mib(per_process(p, pool, "pss")),
                    f"{per_process(p, pool, 'fds_floor') or 0:.1f}"]
        row += [_mib(p["all"]["rss"]), _mib(p["all"]["pss"]), str(p["tracebacks"])]
        lines.append("| " + " | ".join(row) + " |")
    g = f["growth"]
    lines += ["", f"Growth from {g['from_s']}s to {g['to_s']}s, the highest sample of the first "
                  f"{g['period_s']:g}s against the highest of the last {g['period_s']:g}s "
                  f"(goal: at most "
                  f"{f['max_growth_pct']:g}%):", "", "| | RSS (MiB) | PSS (MiB) | fds |",
              "|---|---|---|---|"]

    def cell(group: str, measure: str) -> str:
        span = g[group][f"{measure}_from_to"]
        if span is None:
            return "-"
        first, last = (_mib(v) for v in span) if measure != "fds_floor" else span
        return f"{g[group][measure]}% ({first} -> {last})"

    lines += [f"| {group} | {cell(group, 'rss')} | {cell(group, 'pss')} | "
              f"{cell(group, 'fds_floor')} |" for group in ("master", *POOLS)]
    lines += ["", *[f"- {line}" for line in summary_lines(f)], ""]
    lines += [f"![{name}]({name})" for name in images]
    (out / "report.md").write_text("\n".join(lines) + "\n")
