"""A scanner-pool scenario (`kind = "scanner-pool"`): messages/second through poolmgr's
scanner pool, per check back-end and pool size.

For each back-end in `checks` (builtin alone; clamd and spamd each after builtin, as a real
config runs them), each pool size N in `workers` and each of `runs`: a fresh poolmgr whose
pools are fixed at N workers (autoscaler off) re-injects into smtp-sink, and the load
generator's closed loop (`clients` legitimate clients, N if 0, each sending one `size` message
after another on its connection for `duration`) sends straight to scanner.listen. clamd (a
local EICAR signature only) and spamd (local tests only, as many children as the largest pool)
are started once for the scenario (`poolmgr.testing`).

Figures per run: messages sent, accepted, failed, delivered (found at smtp-sink by Message-ID),
messages/second (accepted over the time from the start to the last reply), latency p50 and
p99, CPU seconds of poolmgr's tree and of the back-end daemon; per back-end and size the rates
of every run and their median. Where a back-end's figure stops growing with the pool size is
the pool size past which more scanner workers buy nothing on this machine. Written to
OUT/result.json and OUT/report.md.
"""

__all__ = ["measure", "summary_lines"]

import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ..testing import Clamd, Poolmgr, Sink, Spamd
from .report import percentile, save_result
from .run import delivered_count, generate
from .scenario import Scenario
from .targets import settled, tree_usage

RECIPIENT = "bob@example.test"
# A worker's recycling (scanner.max_requests) is not what this measures: as in the targets.
MAX_REQUESTS = 1_000_000


def node(work: Path, checks: list[str], workers: int, sink: Sink, daemons: dict) -> Poolmgr:
    """A poolmgr with both pools fixed at `workers`, its scanner relaying to the sink."""
    scanner = {"checks": checks, "min_workers": workers, "max_workers": workers,
               "next_hop": f"smtp:127.0.0.1:{sink.port}", "quarantine": "",
               "max_requests": MAX_REQUESTS}
    for name in ("clamd", "spamd"):
        if name in checks:
            scanner[name] = {"address": daemons[name].address}
    return Poolmgr(work, {"scanner": scanner,
                          "smtp": {"min_workers": workers, "max_workers": workers},
                          "autoscale": {"enabled": False}})


def one_run(scenario: Scenario, checks: list[str], workers: int, daemons: dict,
            work: Path) -> dict:
    settings = scenario.measure
    sink = Sink(work).start()
    pm = node(work / "poolmgr", checks, workers, sink, daemons)
    clients = settings["clients"] or workers
    legit = {**scenario.profiles["legit"], "sizes": [settings["size"]],
             "recipients": [RECIPIENT], "messages": 0}
    looped = dataclasses.replace(
        scenario, drain=60.0, profiles={**scenario.profiles, "legit": legit},
        loop={"profile": "legit", "clients": clients, "duration": settings["duration"]})
    backend = [d.proc.pid for name, d in daemons.items() if name in checks]
    try:
        pm.start()
        _, _, cpu_before = tree_usage(pm.proc.pid)
        _, _, backend_before = tree_usage(*backend)
        load, _, _ = generate(looped, [["127.0.0.1", pm.scanner_port]], work)
        _, _, cpu = tree_usage(pm.proc.pid)
        _, _, backend_cpu = tree_usage(*backend)
        messages = load["messages"]
        accepted = [m for m in messages if m["outcome"] == "accepted"]
        arrived = settled(sink, expect=len(accepted))
    finally:
        pm.stop()
        sink.stop()
    # From the load's start (t0) to the last reply: the messages in flight at the end count.
    elapsed = max((m["t"] + m["latency"] for m in accepted), default=settings["duration"])
    latencies = [m["latency"] for m in accepted]
    return {"clients": clients, "sent": len(messages), "accepted": len(accepted),
            "failed": len(messages) - len(accepted),
            "delivered": delivered_count(accepted, arrived),
            "seconds": round(elapsed, 2), "per_second": round(len(accepted) / elapsed, 1),
            "latency_p50_s": percentile(latencies, 0.5),
            "latency_p99_s": percentile(latencies, 0.99),
            "cpu_seconds": round(cpu - cpu_before, 2),
            "backend_cpu_seconds": round(backend_cpu - backend_before, 2)}


def measure(scenario: Scenario, out: Path) -> dict:
    """Every back-end, pool size and run in turn; result.json and report.md in `out`."""
    settings = scenario.measure
    work = Path(tempfile.mkdtemp(prefix="poolmgr-bench-scanner-pool-"))
    daemons: dict = {}
    figures: dict = {}
    started = time.time()
    try:
        if "clamd" in settings["checks"]:
            daemons["clamd"] = Clamd(work).start()
        if "spamd" in settings["checks"]:
            daemons["spamd"] = Spamd(max_children=max(settings["workers"])).start()
        for name in settings["checks"]:
            checks = ["builtin"] if name == "builtin" else ["builtin", name]
            per_size = figures[name] = {}
            for workers in settings["workers"]:
                runs = []
                for number in range(1, settings["runs"] + 1):
                    run_dir = work / f"{name}-{workers}-{number}"
                    run_dir.mkdir()
                    runs.append(one_run(scenario, checks, workers, daemons, run_dir))
                    shutil.rmtree(run_dir, ignore_errors=True)
                    r = runs[-1]
                    print(f"poolmgr bench: {'+'.join(checks)}: {workers} scanner worker(s), "
                          f"run {number}: {r['per_second']} msgs/s ({r['accepted']} accepted, "
                          f"{r['failed']} failed, {r['delivered']} delivered in "
                          f"{r['seconds']}s)", flush=True)
                rates = [r["per_second"] for r in runs]
                per_size[str(workers)] = {"checks": checks, "per_second": rates,
                                          "median": round(statistics.median(rates), 1),
                                          "runs": runs}
    finally:
        for daemon in daemons.values():
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    result = save_result(out, scenario, started, figures)
    write_report(out, scenario, figures)
    return result


def summary_lines(figures: dict) -> list[str]:
    """One line per back-end: each pool size's median and its runs."""
    return [f"{name}: " + ", ".join(f"{n} worker(s) {v['median']} msgs/s (runs {v['per_second']})"
                                    for n, v in per_size.items())
            for name, per_size in figures.items()]


def write_report(out: Path, scenario: Scenario, figures: dict) -> None:
    s = scenario.measure
    sizes = [str(n) for n in s["workers"]]
    clients = f"{s['clients']} client(s)" if s["clients"] else "as many clients as workers"
    lines = [f"# poolmgr bench: {scenario.name} (scanner pool)", "",
             *([scenario.description, ""] if scenario.description else []),
             f"Messages of {s['size']} bytes straight to scanner.listen for {s['duration']:g}s "
             f"a run, {s['runs']} run(s) of each pool size, {clients} at once; autoscaler off, "
             "next hop smtp-sink.", "",
             "| back-end | " + " | ".join(f"{n} worker(s), msgs/s" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for name, per_size in figures.items():
        lines.append(f"| {'+'.join(per_size[sizes[0]]['checks'])} | " + " | ".join(
            f"{per_size[n]['median']} ({', '.join(map(str, per_size[n]['per_second']))})"
            for n in sizes) + " |")
    runs = [r for per_size in figures.values() for v in per_size.values() for r in v["runs"]]
    lines += ["", "Median of the runs (each run in brackets). Messages sent / accepted / "
              f"delivered at smtp-sink over all runs: {sum(r['sent'] for r in runs)} / "
              f"{sum(r['accepted'] for r in runs)} / {sum(r['delivered'] for r in runs)}.", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
