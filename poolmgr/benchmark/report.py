"""The bench's figures and reports: what one run measured, as numbers, plots and Markdown.

`figures` turns the load generator's records and the server samples into the figures of
`result.json`, and `reaction` adds the autoscaler's reaction to the storm (its onset by the
offered rate, `storm_onset`; poolmgr: when the SMTP pool grew, the storm reaction, which is the
time from the onset to the first new SMTP worker accepting, `first_new_worker`; how far it grew,
stress mode, when it was back at its floor, samples that broke a pool rule); `reaction_line` says it in one line; `plots` and `report` write `connections.png`, `latency.png` and `report.md`;
`compare_report` puts several targets' figures side by side (`compare.md`, `compare.json`,
`compare.png`).
"""

__all__ = ["figures", "reaction", "reaction_line", "plots", "report", "compare_report",
           "source_report", "percentile", "save_result", "first_new_worker", "storm_onset",
           "storm_onsets", "offered"]

import json
import re
import time
from collections import Counter
from pathlib import Path

import psutil

from .scenario import Scenario


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def figures(load: dict, samples: list[dict], baseline: tuple[int, int], cpu: float,
            delivered: int, verdicts: dict) -> dict:
    messages, bots = load["messages"], load["bots"]
    outcomes = Counter(m["outcome"] or "unfinished" for m in messages)
    accepted = [m for m in messages if m["outcome"] == "accepted"]
    latencies = [m["latency"] for m in accepted]
    span = (max(m["t"] + m["latency"] for m in accepted) - min(m["t"] for m in accepted)
            if accepted else 0.0)
    problems = Counter(f"{m['outcome'] or 'unfinished'}: {m['reply'][:40] or '-'}"
                       for m in messages if m["outcome"] != "accepted")
    ended = Counter(b["ended"] or "cancelled" for b in bots)
    shed = [b for b in bots if not b["data"]]
    by_profile: dict[str, list[dict]] = {}
    for bot in bots:
        by_profile.setdefault(bot["profile"], []).append(bot)
    peak_sessions = max((s.get("sessions", 0) for s in samples), default=0)
    peak_open = max((sum(v for k, v in p["open"].items() if k != "legit")
                     for p in load["series"]), default=0)
    peak_rss = max((s["rss"] for s in samples), default=0)
    peak_pss = max((s["pss"] for s in samples), default=0)
    baseline_rss, baseline_pss = baseline
    held = peak_sessions or peak_open
    return {
        "legit_sent": len(messages), "legit_outcomes": dict(outcomes),
        "legit_problems": dict(problems.most_common(8)),
        "legit_accepted_per_s": round(len(accepted) / span, 1) if span > 0 else None,
        "legit_delivered_pct": round(100 * delivered / len(messages), 2) if messages else None,
        "legit_accepted_pct": round(100 * outcomes["accepted"] / len(messages), 2)
        if messages else None,
        "latency_p50_s": percentile(latencies, 0.50),
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_p99_s": percentile(latencies, 0.99),
        "latency_max_s": percentile(latencies, 1.0),
        "bot_connections": len(bots),
        "bots_shed_before_data_pct": round(100 * len(shed) / len(bots), 2) if bots else None,
        # Idle, slowloris, pregreet and impatient bots never try DATA: the profiles that do
        # (listed, dictionary, reconnector) show whether the defences shed them.
        "bots_shed_before_data_pct_by_profile": {
            profile: round(100 * sum(1 for b in group if not b["data"]) / len(group), 2)
            for profile, group in sorted(by_profile.items())},
        "bots_ended": dict(ended.most_common()),
        "bots_greeted": sum(1 for b in bots if b.get("greeted")),
        "connect_failed": ended["connect_failed"],
        "spam_accepted": ended["spam_accepted"],
        "server_verdicts": verdicts,
        "peak_sessions_held": peak_sessions, "peak_client_connections": peak_open,
        "rss_baseline_bytes": baseline_rss, "rss_peak_bytes": peak_rss,
        "rss_per_held_session_bytes": round((peak_rss - baseline_rss) / held) if held else None,
        "pss_baseline_bytes": baseline_pss, "pss_peak_bytes": peak_pss,
        "pss_per_held_session_bytes": round((peak_pss - baseline_pss) / held) if held else None,
        "cpu_seconds": round(cpu, 2),
    }


SMTP_GROWS = re.compile(r"smtp (\d+) -> (\d+)")
FIRST_MESSAGE = re.compile(r"-0@partner\.example>$")


def offered(load: dict) -> Counter:
    """Connections the load generator opened in each whole second from t0: every bot
    connection (a reconnector's each), every legitimate connection (its first message)."""
    per = Counter(int(b["t"]) for b in load["bots"])
    per.update(int(m["t"]) for m in load["messages"] if FIRST_MESSAGE.search(m["id"]))
    return per


def storm_onsets(load: dict, scenario: Scenario) -> tuple[float, list[int]]:
    """(calm rate, onsets): the offered rate over the scenario's calmest phase (0 with one
    phase), and each second whose offered connections exceed it by the scenario's
    storm_threshold after a second that did not (a storm's onset)."""
    per = offered(load)
    calm = 0.0
    if scenario.calm is not None:
        start, end = scenario.calm
        calm = sum(per[s] for s in range(int(start), int(end))) / max(1.0, end - start)
    stormy = {s for s in per if per[s] > calm + scenario.storm_threshold}
    return round(calm, 2), sorted(s for s in stormy if s - 1 not in stormy)


def storm_onset(load: dict, scenario: Scenario) -> tuple[float, int | None]:
    """(calm rate, the first storm's onset or None)."""
    calm, onsets = storm_onsets(load, scenario)
    return calm, onsets[0] if onsets else None


def first_new_worker(samples: list[dict], onset: float | None, t0: float
                     ) -> tuple[float | None, float | None]:
    """(started, accepting): when the first SMTP worker started at or after `onset` was
    started, and the first sample (`t`, seconds from t0) in which one such worker holds
    sessions; None where there is none (no onset, the pool never grew)."""
    started = None
    if onset is None:
        return None, None
    for s in samples:
        new = [(begun - t0, held) for begun, held in s.get("smtp_worker_sessions",
                                                           {}).values()
               if begun - t0 >= onset]
        if new and started is None:
            started = min(t for t, _ in new)
        if any(held for _, held in new):
            return started, s["t"]
    return started, None


def reaction(samples: list[dict], decisions: list, load: dict, scenario: Scenario,
             t0: float) -> dict:
    """The autoscaler's reaction, from poolmgr's samples and decisions (times in seconds from
    t0): all None for a target without pools. The storm's onset is `storm_onset`'s; the
    storm reaction is the time from it to the first sample in which an SMTP worker started
    after it holds sessions (the first new worker accepting; samples are `sample_every`
    apart, a second by default); the storm ends when the last bot connection has closed
    (the client series); the pool is back at its floor at the first sample after that with
    no worker above the floor, none draining and the autoscaler calm."""
    calm, onset = storm_onset(load, scenario)
    per = offered(load)
    # What the load generator managed to offer (on a busy machine, less than the scenario
    # asks): its busiest second, and when its last bot connection began.
    arrived = {"offered_peak_per_s": max(per.values(), default=0),
               "last_bot_arrival_s": round(max((b["t"] for b in load["bots"]), default=0.0),
                                           1) if load["bots"] else None}
    pooled = [s for s in samples if "smtp_workers" in s]
    if not pooled:
        return {"calm_rate": calm, "storm_onset_s": onset, **arrived, **dict.fromkeys((
            "storm_end_s", "onset_to_first_smtp_worker_s", "first_smtp_grow",
            "first_new_smtp_worker_started_s", "first_new_smtp_worker_accepting_s",
            "storm_reaction_s", "peak_smtp_workers", "stress_on_s", "storm_end_to_floor_s",
            "samples_checked", "samples_breaking_rules", "rule_breaks"))}
    grows = [(round(d.time - t0, 1), d.decision) for d in decisions
             if (m := SMTP_GROWS.match(d.decision)) and int(m[2]) > int(m[1])]
    grows = [g for g in grows if onset is None or g[0] >= onset]
    started, accepting = first_new_worker(pooled, onset, t0)
    busy = [p["t"] for p in load["series"] if any(v for k, v in p["open"].items()
                                                  if k != "legit")]
    end = max(busy) + 1 if busy else None
    floor = next((s["t"] for s in pooled if end is not None and s["t"] >= end and
                  s["smtp_workers"] == s["smtp_floor"] and not s["smtp_draining"] and
                  s["phase"] == "calm"), None)
    stress = [s["t"] for s in pooled if s["stress"]]
    broken = [s for s in pooled if s["rule_breaks"]]
    return {
        "calm_rate": calm, "storm_onset_s": onset, **arrived, "storm_end_s": end,
        "onset_to_first_smtp_worker_s": round(grows[0][0] - onset, 1)
        if grows and onset is not None else None,
        "first_smtp_grow": grows[0][1] if grows else None,
        "first_new_smtp_worker_started_s": round(started, 1) if started is not None else None,
        "first_new_smtp_worker_accepting_s": accepting,
        "storm_reaction_s": round(accepting - onset, 1) if accepting is not None else None,
        "peak_smtp_workers": max(s["smtp_workers"] for s in pooled),
        "stress_on_s": [stress[0], stress[-1]] if stress else None,
        "storm_end_to_floor_s": round(floor - end, 1) if grows and floor is not None else None,
        "samples_checked": len(pooled), "samples_breaking_rules": len(broken),
        "rule_breaks": [f"t={s['t']}s: {'; '.join(s['rule_breaks'])}" for s in broken[:5]],
    }


def reaction_line(f: dict) -> str | None:
    """The autoscaler's reaction in one line, or None for a target without pools."""
    if f.get("peak_smtp_workers") is None:
        return None
    floor = ("not back at the floor by the end of the run" if f["storm_end_to_floor_s"] is None
             else f"back at the floor {f['storm_end_to_floor_s']}s after it ended")
    grew = (f"first SMTP worker added {_seconds(f['onset_to_first_smtp_worker_s'])} after the "
            f"storm began, accepting after {_seconds(f['storm_reaction_s'])} (storm "
            f"reaction), peak {f['peak_smtp_workers']} SMTP workers, {floor}"
            if f["first_smtp_grow"]
            else f"SMTP pool never grew (peak {f['peak_smtp_workers']} workers)")
    stress = (f"stress mode on t={f['stress_on_s'][0]}s..{f['stress_on_s'][1]}s"
              if f["stress_on_s"] else "stress mode off")
    return (f"autoscaler: {grew}; {stress}; {f['samples_breaking_rules']} of "
            f"{f['samples_checked']} samples broke a pool rule; hand-offs to the scanner pool "
            f"{f.get('handoffs_to_scanner')}")


def plots(out: Path, load: dict, samples: list[dict], title: str) -> list[str]:
    """connections.png and latency.png; returns the file names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    profiles = sorted({k for p in load["series"] for k in p["open"]})
    t = [p["t"] for p in load["series"]]
    for profile in profiles:
        ax.plot(t, [p["open"].get(profile, 0) for p in load["series"]], label=profile)
    ax.set_xlabel("seconds")
    ax.set_ylabel("open client connections")
    if any("smtp_workers" in s for s in samples):
        right = ax.twinx()
        right.step([s["t"] for s in samples], [s.get("smtp_workers", 0) for s in samples],
                   "k--", where="post", label="SMTP workers")
        right.step([s["t"] for s in samples], [s.get("scanner_workers", 0) for s in samples],
                   "k:", where="post", label="scanner workers")
        right.set_ylabel("workers")
        top = max(max(s.get("smtp_workers", 0), s.get("scanner_workers", 0)) for s in samples)
        right.set_ylim(0, top + 1)
        right.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(f"{title}: connections and pool sizes")
    fig.tight_layout()
    fig.savefig(out / "connections.png", dpi=90)
    plt.close(fig)
    names.append("connections.png")
    fig, ax = plt.subplots(figsize=(9, 3.5))
    done = [m for m in load["messages"] if m["latency"] is not None]
    for outcome, marker in (("accepted", "o"), ("deferred", "x"), ("refused", "s"),
                            ("failed", "^")):
        points = [m for m in done if (m["outcome"] or "failed") == outcome]
        if points:
            ax.scatter([m["t"] for m in points], [m["latency"] for m in points], s=10,
                       marker=marker, label=outcome)
    ax.set_xlabel("seconds (message start)")
    ax.set_ylabel("latency, seconds")
    ax.set_title(f"{title}: legitimate latency")
    if done:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=90)
    plt.close(fig)
    names.append("latency.png")
    return names


def report(out: Path, result: dict, images: list[str]) -> None:
    f = result["figures"]
    lines = [f"# poolmgr bench: {result['scenario']['name']} against {result['target']}", "",
             result["scenario"]["description"], "",
             f"Run {time.strftime('%Y-%m-%d %H:%M', time.localtime(result['started']))}, "
             f"{result['duration_s']:.0f}s, {psutil.cpu_count()} cores.", "",
             "| figure | value |", "|---|---|"]
    rows = [("legitimate messages sent", f["legit_sent"]),
            ("legitimate delivered (at the next hop)", f"{f['legit_delivered_pct']}%"),
            ("legitimate outcomes", f["legit_outcomes"]),
            ("legitimate accepted per second", f["legit_accepted_per_s"]),
            ("why not accepted", f["legit_problems"] or "-"),
            ("latency p50 / p95 / p99", f"{f['latency_p50_s']} / {f['latency_p95_s']} / "
                                        f"{f['latency_p99_s']} s"),
            ("bot connections", f["bot_connections"]),
            ("bots shed before DATA", f"{f['bots_shed_before_data_pct']}%"),
            ("how bot connections ended", f["bots_ended"]),
            ("bot connections greeted (banner received)", f["bots_greeted"]),
            ("spam accepted", f["spam_accepted"]),
            ("server verdicts", f["server_verdicts"] or "-"),
            ("peak sessions held", f["peak_sessions_held"]),
            ("peak RSS of the server tree", f"{f['rss_peak_bytes'] / 2**20:.1f} MiB"),
            ("RSS per held session", f"{(f['rss_per_held_session_bytes'] or 0) / 1024:.1f} KiB"),
            ("peak PSS of the server tree", f"{f['pss_peak_bytes'] / 2**20:.1f} MiB"),
            ("PSS per held session", f"{(f['pss_per_held_session_bytes'] or 0) / 1024:.1f} KiB"),
            ("CPU seconds (server tree)", f["cpu_seconds"]),
            ("accept queue: peak waiting / drops (machine-wide ListenDrops)",
             f"{_value(f.get('accept_queue_peak'))} / {_value(f.get('accept_queue_drops'))}"),
            ("DNS queries answered", f["dns_queries"])]
    if "failed_after_connect" in f:
        rows += [("sessions failed after CONNECT (log) / any step",
                  f"{f['failed_after_connect']} / {f['sessions_failed']}"),
                 ("anvil fallbacks: `no answer` lines (log) / counted by the workers",
                  f"{f['anvil_no_answer']} / {_value(f.get('anvil_fallbacks_counted'))}")]
    if f.get("forecast_peak_sessions") is not None:
        rows += [("planner's forecast of peak sessions (from the scenario) / error",
                  f"{f['forecast_peak_sessions']} / {_value(f['forecast_error_pct'])}%")]
    if f.get("storm_onset_s") is not None or f.get("calm_rate") is not None:
        rows += [("calm rate / storm onset (offered connections/s above calm + threshold)",
                  f"{f['calm_rate']}/s / {_seconds(f['storm_onset_s'])}"),
                 ("offered: busiest second / last bot connection began",
                  f"{f.get('offered_peak_per_s')}/s / t={_seconds(f.get('last_bot_arrival_s'))}")]
    if f.get("peak_smtp_workers") is not None:
        rows += [("storm onset / end (t)",
                  f"{_seconds(f['storm_onset_s'])} / {_seconds(f['storm_end_s'])}"),
                 ("onset to the first added SMTP worker",
                  f"{_seconds(f['onset_to_first_smtp_worker_s'])} "
                  f"({f['first_smtp_grow'] or 'the pool never grew'})"),
                 ("storm reaction: onset to the first new SMTP worker accepting",
                  f"{_seconds(f['storm_reaction_s'])} (started "
                  f"t={_seconds(f['first_new_smtp_worker_started_s'])}, accepting by "
                  f"t={_seconds(f['first_new_smtp_worker_accepting_s'])})"),
                 ("peak SMTP workers", f["peak_smtp_workers"]),
                 ("stress mode on (t from, to)", " .. ".join(map(_seconds, f["stress_on_s"]))
                  if f["stress_on_s"] else "-"),
                 ("storm end to the SMTP floor", _seconds(f["storm_end_to_floor_s"])),
                 ("samples that broke a pool rule",
                  f"{f['samples_breaking_rules']} of {f['samples_checked']}"
                  + (f": {'; '.join(f['rule_breaks'])}" if f["rule_breaks"] else "")),
                 ("hand-offs to the scanner pool / scanned",
                  f"{f['handoffs_to_scanner']} / {f['scanned']}")]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += [""] + [f"![{name}]({name})" for name in images]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:g}s"


def _value(value) -> str:
    return "-" if value is None else str(value)


COMPARE_ROWS = (("legitimate delivered %", "legit_delivered_pct", "{}"),
                ("legitimate accepted / s", "legit_accepted_per_s", "{}"),
                ("latency p50 s", "latency_p50_s", "{}"),
                ("latency p99 s", "latency_p99_s", "{}"),
                ("bots shed before DATA %", "bots_shed_before_data_pct", "{}"),
                ("spam accepted", "spam_accepted", "{}"),
                ("bot connections", "bot_connections", "{}"),
                ("bots greeted", "bots_greeted", "{}"),
                ("peak sessions held", "peak_sessions_held", "{}"),
                ("peak RSS MiB", "rss_peak_bytes", "{:.1f}"),
                ("RSS per held session KiB", "rss_per_held_session_bytes", "{:.1f}"),
                ("peak PSS MiB", "pss_peak_bytes", "{:.1f}"),
                ("PSS per held session KiB", "pss_per_held_session_bytes", "{:.1f}"),
                ("CPU seconds", "cpu_seconds", "{}"),
                ("accept queue peak", "accept_queue_peak", "{}"),
                ("accept-queue drops (machine)", "accept_queue_drops", "{}"),
                ("connect failed (client)", "connect_failed", "{}"),
                ("failed after CONNECT (log)", "failed_after_connect", "{}"),
                ("anvil no-answer lines (log)", "anvil_no_answer", "{}"),
                ("offered: busiest second", "offered_peak_per_s", "{}"),
                ("last bot connection began, s", "last_bot_arrival_s", "{}"),
                ("storm reaction s", "storm_reaction_s", "{}"),
                ("forecast peak sessions", "forecast_peak_sessions", "{}"),
                ("forecast error %", "forecast_error_pct", "{}"))


RATIO_KEYS = ("legit_delivered_pct", "latency_p50_s", "latency_p99_s", "peak_sessions_held",
              "rss_per_held_session_bytes", "pss_per_held_session_bytes", "cpu_seconds")


def source_report(out: Path, scenario: Scenario, table: dict, targets: list[str]) -> None:
    """compare.md and compare.json of a source scenario: messages/second by target, each
    round, and poolmgr's ratio to each peer."""
    s = scenario.source
    rows = [("messages/second, median", lambda f: f"{f['messages_per_second']:.1f}"),
            ("messages/second, each round",
             lambda f: ", ".join(f"{r:.0f}" for r in f["messages_per_second_runs"])),
            ("poolmgr / this target, median of the rounds' ratios",
             lambda f: f"{f['poolmgr_ratio']:.2f}" if "poolmgr_ratio" in f else "-"),
            ("poolmgr / this target, each round",
             lambda f: ", ".join(f"{r:.2f}" for r in f.get("poolmgr_ratio_runs", [])) or "-"),
            ("every message reached smtp-sink", lambda f: "yes" if f["all_arrived"] else "NO"),
            ("CPU ms per message, median", lambda f: f"{f['cpu_ms_per_message']}"),
            ("PSS after the run, MiB (median)", lambda f: f"{f['pss_after_mib']}"),
            ("workers after each round (SMTP+scanner)",
             lambda f: ", ".join(f.get("pools_after", [])) or "-")]
    lines = [f"# poolmgr bench compare: {scenario.name}", "", scenario.description, "",
             f"`smtp-source -s {s['sessions']} -m {s['messages']} -l {s['size']}` from "
             f"127.0.0.1, {s['rounds']} rounds of every target in turn ({', '.join(targets)}), "
             "each relaying to smtp-sink.", "",
             "| figure | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    lines += [f"| {label} | " + " | ".join(show(table[t]) for t in targets) + " |"
              for label, show in rows]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps(table, indent=1) + "\n")


def compare_report(out: Path, scenario: Scenario, table: dict, targets: list[str]) -> None:
    """compare.md (one table), compare.json and compare.png for figures by target."""

    def cell(figures: dict, key: str, fmt: str) -> str:
        value = figures.get(key)
        if value is None:
            return "-"
        if key in ("rss_peak_bytes", "pss_peak_bytes"):
            value = value / 2**20
        elif key.endswith("_per_held_session_bytes"):
            value = value / 1024
        return fmt.format(value)

    lines = [f"# poolmgr bench compare: {scenario.name}", "", scenario.description, "",
             "| figure | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    lines += [f"| {label} | " + " | ".join(cell(table[t], key, fmt) for t in targets) + " |"
              for label, key, fmt in COMPARE_ROWS]
    if "poolmgr" in targets and len(targets) > 1:
        peers = [t for t in targets if t != "poolmgr"]
        lines += ["", "Each peer's figure over poolmgr's (above 1: the peer's is higher):", "",
                  "| figure | " + " | ".join(peers) + " |", "|---|" + "---|" * len(peers)]
        for label, key, _ in COMPARE_ROWS:
            if key in RATIO_KEYS:
                ours = table["poolmgr"].get(key)
                lines.append(f"| {label} | " + " | ".join(
                    f"{table[t][key] / ours:.2f}" if ours and table[t].get(key) is not None
                    else "-" for t in peers) + " |")
    image = compare_plot(out, scenario.name, table, targets)
    lines += ["", f"![{image}]({image})", ""]
    lines += [f"Each target's report: [{t}]({t}/report.md)" for t in targets]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps(table, indent=1) + "\n")


def compare_plot(out: Path, name: str, table: dict, targets: list[str]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("legit_delivered_pct", "legitimate delivered %"), ("latency_p99_s", "p99 s"),
            ("peak_sessions_held", "peak sessions"), ("rss_per_held_session_bytes",
                                                      "RSS / session, bytes"),
            ("cpu_seconds", "CPU s")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.6))
    for ax, (key, label) in zip(axes, keys):
        values = [table[t].get(key) or 0 for t in targets]
        ax.bar(range(len(targets)), values, color=[f"C{i}" for i in range(len(targets))])
        ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"{name}: side by side")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=90)
    plt.close(fig)
    return "compare.png"


def save_result(out: Path, scenario, started: float, figures: dict) -> dict:
    """`result.json` of a kind that measures poolmgr alone (scanner-pool, cluster-overhead):
    the scenario, when and how long, and the kind's figures. Returns the result."""
    result = {"scenario": scenario.as_dict(), "target": "poolmgr", "kind": scenario.kind,
              "started": started, "duration_s": round(time.time() - started, 1),
              "figures": figures}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
