"""`poolmgr bench run` and `bench compare`: one scenario against one target, or several.

The target runs in its own processes (`benchmark.targets`: poolmgr, Postfix, aiosmtpd, each
with `smtp-sink` as the next hop and a DNS server for the DNSBL zone); the load generator runs
in its own process(es) (`benchmark.load`). Every second the server side is sampled: RSS, PSS
and CPU seconds of the target's whole process tree (psutil), and poolmgr's status (pool sizes,
sessions, storm phase).

Before the load, the kernel's settings that bound a large storm are read and what the
scenario would run into is printed (`benchmark.kernel`); each second the target's accept
queue is sampled too, and the machine's accept-queue drops are counted over the run. Against
poolmgr, the planner's forecast of the scenario's peak sessions (`forecast`, from the
scenario alone, with the pool sizes and settings the run uses) is set beside what the run
measured.

Output in OUT: `result.json` (figures and the time series), `connections.png` (open
connections by profile and pool sizes over time), `latency.png` (legitimate latency over
time) and `report.md`, which embeds them (`benchmark.report`).

A source scenario (smtp-source, `benchmark.source`) and a content-filter one (poolmgr's scanner
pool beside amavisd-new, `benchmark.content_filter`) compare round by round instead.

`generate` runs the load generator's processes and gathers their records; the scanner-pool,
cluster-overhead and soak kinds (`benchmark.scanner_pool`, `benchmark.cluster_overhead`,
`benchmark.soak`) use it too.
"""

__all__ = ["run", "compare", "generate", "delivered_count", "found_ids", "merge_series"]

import json
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from .. import config as poolmgr_config
from .. import forecast
from ..testing.poolmgr import own_code_first
from . import content_filter, kernel, source
from . import load as loadgen
from .report import compare_report, figures, plots, reaction, report, source_report
from .scenario import Scenario, peak_connections
from .targets import TARGETS, check_target, settled, started, tree_usage

STOP_GRACE = 30.0  # seconds a load generator past its time has to write its records
MESSAGE_ID = re.compile(rb"<bench-\d+-\d+-\d+@partner\.example>")


def run(scenario: Scenario, target_name: str, out: Path) -> dict:
    """One scenario against one target (poolmgr: `[server] nodes` of them on one Redis)."""
    settings = kernel.settings()
    connections = peak_connections(scenario)
    for warning in kernel.warnings(settings, connections, scenario.listen_backlog,
                                   scenario.server["max_sessions_per_worker"]
                                   if target_name == "poolmgr" else None):
        print(f"poolmgr bench: warning: kernel: {warning}", file=sys.stderr)
    with started(target_name, scenario.server, scenario.profiles["legit"]["recipients"],
                 loadgen.listed_prefixes(scenario.processes),
                 settings=scenario.config) as (target, sink, dns, work):
        time.sleep(1.0)
        baseline_rss, baseline_pss, cpu_before = tree_usage(*target.pids)
        drops_before = kernel.drops()

        def sample(t: float) -> dict:
            rss, pss, cpu = tree_usage(*target.pids)
            return {"t": t, "rss": rss, "pss": pss, "cpu": round(cpu - cpu_before, 2),
                    "accept_queue": kernel.accept_queue(target.ports), **target.sample()}

        load, samples, t0 = generate(scenario, target.addresses, work, sample)
        _, _, cpu = tree_usage(*target.pids)
        cpu -= cpu_before
        drops_after = kernel.drops()
        verdicts = target.verdicts()
        extra = {**target.counters(), "dns_queries": len(dns.queries)}
        arrived = settled(sink)
    out.mkdir(parents=True, exist_ok=True)
    delivered = delivered_count(load["messages"], arrived)
    queued = [s["accept_queue"] for s in samples if s.get("accept_queue") is not None]
    accept = {"accept_queue_peak": max(queued, default=None),
              # the machine's counters: any listener's drops during the run (loopback only)
              "accept_queue_drops": drops_after.get("ListenDrops", 0) -
              drops_before.get("ListenDrops", 0) if drops_before else None,
              "accept_queue_overflows": drops_after.get("ListenOverflows", 0) -
              drops_before.get("ListenOverflows", 0) if drops_before else None,
              "syncookies_sent": drops_after.get("SyncookiesSent", 0) -
              drops_before.get("SyncookiesSent", 0) if drops_before else None}
    result = {"scenario": scenario.as_dict(), "target": target_name, "started": t0,
              "duration_s": round(time.time() - t0, 1), "kernel": settings,
              "figures": {**figures(load, samples, (baseline_rss, baseline_pss), cpu,
                                    delivered, verdicts),
                          "generator_processes_reported":
                              f"{load['processes_reported']}/{scenario.processes}",
                          **reaction(samples, target.decisions, load, scenario, t0),
                          **accept, **extra},
              "server_series": samples, "client_series": load["series"],
              # [start (s from t0), held (s), legitimate, profile, reached DATA]: input of
              # `poolmgr plan --bench`
              "connections": [[b["t"], b.get("held", 0.0), False, b["profile"], b["data"]]
                              for b in load["bots"]] +
                             [[m["t"], m["latency"] or 0.0, True, "legit", True]
                              for m in load["messages"]]}
    if target_name == "poolmgr" and scenario.kind in ("phases", "replay"):
        result["forecast"] = forecast_of(scenario, result)
        result["figures"].update(
            forecast_peak_sessions=result["forecast"]["predicted"]["peak_sessions"],
            forecast_error_pct=result["forecast"]["figures"][0]["error_pct"],
            forecast_within_tolerance=result["forecast"]["within_tolerance"])
    images = plots(out, load, samples, f"{scenario.name} / {target_name}")
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    report(out, result, images)
    return result


def forecast_of(scenario: Scenario, result: dict) -> dict:
    """The planner's forecast of the scenario (its offered sessions, the run's pool sizes and
    settings) and how it compares with what the run measured (`poolmgr plan --scenario FILE
    --check result.json` prints the same)."""
    cfg = poolmgr_config.from_dict(scenario.config)
    predicted = forecast.forecast(scenario.sessions(), forecast.sizes_of_bench(result),
                                  result["figures"].get("handoff_mean_s") or 1.0, cfg)
    rows, ok = forecast.compare(predicted, forecast.measured(result))
    return {"predicted": {"peak_sessions": predicted.peak_sessions,
                          "smtp_workers": predicted.smtp_workers,
                          "scanner_workers": predicted.scanner_workers},
            "figures": rows, "within_tolerance": ok, "lines": predicted.lines}


def generate(scenario: Scenario, addresses: list[list], work: Path,
             sample=None) -> tuple[dict, list[dict], float]:
    """The load generator's processes (`scenario.processes`) against `addresses`, from one
    second from now (t0) until they end (bounded by the scenario's duration and drain);
    `sample(t)`, if given, is called every `scenario.sample_every` meanwhile (t: seconds
    from t0) and returns a server sample. Returns the merged records (series, bots,
    messages), the samples, t0."""
    samples: list[dict] = []
    procs: list[subprocess.Popen] = []
    t0 = time.time() + 1.0
    for index in range(scenario.processes):
        spec = work / f"load{index}.json"
        spec.write_text(json.dumps({"scenario": scenario.as_dict(), "targets": addresses,
                                    "index": index, "processes": scenario.processes,
                                    "t0": t0}))
        (work / f"result{index}.json").unlink(missing_ok=True)  # not a run before's
        procs.append(subprocess.Popen([sys.executable, "-m", "poolmgr.benchmark.load",
                                       str(spec), str(work / f"result{index}.json")],
                                      env=own_code_first()))
    limit = time.time() + scenario.duration + scenario.drain + 60
    every = scenario.sample_every if sample is not None else 0.2
    due = time.time()
    try:
        while any(p.poll() is None for p in procs) and time.time() < limit:
            if sample is not None:
                samples.append(sample(round(time.time() - t0, 2)))
            # On a steady beat, however long a sample took (a slow one does not push the
            # next ones, nor a soak's events, later and later), each a little off it at
            # random so that the beat does not lock onto the phase of the load's own
            # periodic arrivals.
            due = max(due + every, time.time() + every / 10)
            due += random.uniform(-0.1, 0.1) * every
            time.sleep(max(0.0, due - time.time()))
    finally:  # past the limit, or the bench stopped: TERM writes what it has, then KILL
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE  # one grace for all, not one each
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    load = {"series": [], "bots": [], "messages": [], "processes_reported": 0}
    for index in range(scenario.processes):
        path = work / f"result{index}.json"
        if path.exists():
            part = json.loads(path.read_text())
            load["processes_reported"] += 1
            for key in ("series", "bots", "messages"):
                load[key] += part[key]
    if load["processes_reported"] < scenario.processes:
        print(f"poolmgr bench: warning: {scenario.processes - load['processes_reported']} of "
              f"{scenario.processes} load-generator processes wrote no records",
              file=sys.stderr)
    load["series"] = merge_series(load["series"])
    return load, samples, t0


def found_ids(arrived: list[bytes]) -> set[str]:
    """The Message-IDs of the load generator's messages among those the next hop holds."""
    return {m.group(0).decode() for data in arrived for m in MESSAGE_ID.finditer(data)}


def delivered_count(messages: list[dict], arrived: list[bytes]) -> int:
    """How many of the load generator's messages the next hop holds, by Message-ID."""
    found = found_ids(arrived)
    return sum(1 for m in messages if m["id"] in found)


def merge_series(series: list[dict]) -> list[dict]:
    """Several generator processes' per-second points, summed by whole second. A process
    whose ticker missed a second (its loop busy with connections) counts there as at its last
    point before, not as nothing; a second it ticked twice, as its last point in it."""
    last: dict[tuple, dict] = {}  # (process, second) -> its last point in that second
    for point in series:
        last[(point.get("process", 0), int(point["t"]))] = point
    if not last:
        return []
    seconds = range(min(s for _, s in last), max(s for _, s in last) + 1)
    merged = {second: {"t": second, "open": Counter(), "legit": Counter()}
              for second in seconds}
    for process in {p for p, _ in last}:
        mine = sorted(s for p, s in last if p == process)
        held = None
        for second in seconds:
            if (process, second) in last:
                held = last[(process, second)]
            elif second > mine[-1]:
                break  # the process has ended
            if held is not None:
                merged[second]["open"].update(held["open"])
                merged[second]["legit"].update(held["legit"])
    return [{"t": p["t"], "open": dict(p["open"]), "legit": dict(p["legit"])}
            for p in merged.values()]


def compare(scenario: Scenario, targets: list[str], out: Path) -> dict:
    """The same scenario against each target in turn; one table and one plot side by side."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise SystemExit(f"poolmgr bench: unknown target(s) {', '.join(unknown)}; "
                         f"known: {', '.join(TARGETS)}")
    for target in targets:  # before anything starts
        check_target(target, scenario.kind == "content-filter")
    out.mkdir(parents=True, exist_ok=True)
    if scenario.kind == "source":
        table = source.rounds(scenario, targets, out)
        source_report(out, scenario, table, targets)
        return table
    if scenario.kind == "content-filter":
        table = content_filter.rounds(scenario, targets, out)
        content_filter.write_report(out, scenario, table, targets)
        return table
    results = {t: run(scenario, t, out / t) for t in targets}
    table = {t: r["figures"] for t, r in results.items()}
    compare_report(out, scenario, table, targets)
    return table
