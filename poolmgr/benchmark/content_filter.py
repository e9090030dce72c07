"""A content-filter scenario (`kind = "content-filter"`): poolmgr's scanner pool alone beside
Debian's amavisd-new, each in the place where Postfix's content_filter hands it mail.

For each comparison in `checks` (`builtin`: poolmgr's builtin check beside amavisd with virus
and spam checks bypassed; `clamd`: both asking the same clamd, started once for the scenario),
`rounds` rounds of every target in turn (`bench compare --targets poolmgr,amavisd`; the order
reversed every other round): a fresh target with `workers` workers (poolmgr scanner-only,
fixed, `feeder_maxproc` = workers; amavisd `$max_servers` = workers) and `smtp-source -s
WORKERS -m MESSAGES -l SIZE`, the feeder at its maxproc, through it to smtp-sink
(`benchmark.source`, `benchmark.targets`).

Figures per round and target: messages/second, CPU ms per message (the target's process tree,
plus clamd's when asked), PSS of each worker and of the whole tree after the round, and
whether every message reached smtp-sink; per comparison the medians and spreads (min..max
over the rounds), poolmgr's ratios to amavisd round by round, and whether issue 25's goals
hold (GOALS): poolmgr's tree at most half of amavisd's PSS, and at least 5x its
messages/second. Written to OUT/compare.json and OUT/compare.md.
"""

__all__ = ["rounds", "write_report", "GOALS"]

import json
import os
import statistics
from pathlib import Path

from ..testing import Clamd
from .scenario import Scenario
from .source import source

# Issue 25's goals for poolmgr over amavisd-new, same number of workers: (figure, bound, how)
GOALS = (("pss_after_mib", 0.5, "at most"), ("messages_per_second", 5.0, "at least"))
PEER = "amavisd"


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": min(values),
            "max": max(values), "runs": values}


def one_round(scenario: Scenario, target: str, check: str, clamd, out: Path) -> dict:
    s = scenario.measure
    f = source(target, s["workers"], s["messages"], s["size"], out,
               content_filter={"workers": s["workers"],
                               "clamd": clamd if check == "clamd" else None})
    total_cpu = f["cpu_seconds"] + f["backend_cpu_seconds"]
    return {**f, "cpu_ms_per_message": round(1000 * total_cpu / f["messages"], 3),
            "all_arrived": f["arrived_at_sink"] == f["messages"] and f["smtp_source_exit"] == 0}


def rounds(scenario: Scenario, targets: list[str], out: Path) -> dict:
    """Every comparison, round after round of every target in turn; per comparison the
    rounds' figures, each target's medians and spreads, and poolmgr's ratios to amavisd."""
    s = scenario.measure
    table: dict = {}
    clamd = None
    try:
        if "clamd" in s["checks"]:
            clamd = Clamd().start()
            # amavisd's children run as the amavis user: let them reach the socket
            os.chmod(clamd.dir, 0o711)
        for check in s["checks"]:
            runs: dict[str, list[dict]] = {t: [] for t in targets}
            for number in range(1, s["rounds"] + 1):
                # the order reversed every other round: neither target always runs first
                for target in targets if number % 2 else targets[::-1]:
                    f = one_round(scenario, target, check, clamd,
                                  out / check / target / f"round{number}")
                    runs[target].append(f)
                    print(f"poolmgr bench: {check}, round {number}, {target}: "
                          f"{f['messages_per_second']} msgs/s, {f['cpu_ms_per_message']} CPU "
                          f"ms/msg, PSS {f['pss_after_mib']} MiB "
                          f"({f['arrived_at_sink']}/{f['messages']} at smtp-sink)", flush=True)
            table[check] = summary(runs)
    finally:
        if clamd is not None:
            clamd.stop()
    return table


def summary(runs: dict[str, list[dict]]) -> dict:
    figures = {}
    for target, results in runs.items():
        workers = [p for r in results for p in r["pss_workers_after_mib"]]
        figures[target] = {
            "messages_per_second": spread([r["messages_per_second"] for r in results]),
            "cpu_ms_per_message": spread([r["cpu_ms_per_message"] for r in results]),
            "pss_after_mib": spread([r["pss_after_mib"] for r in results]),
            "pss_worker_after_mib": {"min": min(workers, default=0.0),
                                     "max": max(workers, default=0.0)},
            "workers": [len(r["pss_workers_after_mib"]) for r in results],
            "all_arrived": all(r["all_arrived"] for r in results),
            "rounds": results}
    if "poolmgr" in runs and PEER in runs:
        ratios = {key: spread([round(ours[key] / theirs[key], 3) if theirs[key] else 0.0
                               for ours, theirs in zip(runs["poolmgr"], runs[PEER])])
                  for key in ("messages_per_second", "cpu_ms_per_message", "pss_after_mib")}
        figures["poolmgr_over_amavisd"] = ratios
        figures["goals"] = {key: {"bound": bound, "how": how,
                                  "met": ratios[key]["median"] <= bound if how == "at most"
                                  else ratios[key]["median"] >= bound,
                                  "every_round": all(r <= bound if how == "at most" else
                                                     r >= bound for r in ratios[key]["runs"])}
                            for key, bound, how in GOALS}
    return figures


LABELS = {"builtin": "checks: poolmgr `builtin`; amavisd virus and spam checks bypassed",
          "clamd": "checks: both ask the same clamd (poolmgr `builtin` + `clamd`; amavisd "
                   "`ClamAV-clamd`, spam checks bypassed)"}


def write_report(out: Path, scenario: Scenario, table: dict, targets: list[str]) -> None:
    """compare.md and compare.json: each comparison's rounds, medians, spreads and ratios."""
    s = scenario.measure
    lines = [f"# poolmgr bench compare: {scenario.name}", "", scenario.description, "",
             f"`smtp-source -s {s['workers']} -m {s['messages']} -l {s['size']}` from 127.0.0.1 "
             f"into each target in turn ({', '.join(targets)}), {s['rounds']} round(s) of each, "
             f"{s['workers']} workers each, both relaying to smtp-sink. PSS after the round; "
             "CPU of the target's tree plus clamd's when asked.", ""]
    for check, figures in table.items():
        lines += [f"## {LABELS[check]}", "",
                  "| round | target | msgs/s | CPU ms/msg | PSS per worker, MiB | PSS of the "
                  "tree, MiB | at smtp-sink |", "|---|---|---|---|---|---|---|"]
        for number in range(s["rounds"]):
            for target in targets:
                r = figures[target]["rounds"][number]
                workers = r["pss_workers_after_mib"]
                lines.append(f"| {number + 1} | {target} | {r['messages_per_second']} | "
                             f"{r['cpu_ms_per_message']} | "
                             f"{min(workers, default=0)}..{max(workers, default=0)} "
                             f"({len(workers)}) | {r['pss_after_mib']} | "
                             f"{r['arrived_at_sink']}/{r['messages']} |")
        ratios = figures.get("poolmgr_over_amavisd")
        lines += ["", "| figure | " + " | ".join(targets) +
                  (" | poolmgr / amavisd |" if ratios else " |"),
                  "|---|" + "---|" * (len(targets) + bool(ratios))]

        def row(label: str, cells: list[str], ratio: str = "") -> str:
            return f"| {label} | " + " | ".join(cells + ([ratio] if ratios else [])) + " |"

        for key, label in (("messages_per_second", "msgs/s, median (min..max)"),
                           ("cpu_ms_per_message", "CPU ms per message, median (min..max)"),
                           ("pss_after_mib", "PSS of the tree, MiB, median (min..max)")):
            lines.append(row(label, [_spread(figures[t][key]) for t in targets],
                             _spread(ratios[key]) if ratios else ""))
        worker = {t: figures[t]["pss_worker_after_mib"] for t in targets}
        lines.append(row("PSS per worker, MiB (min..max)",
                         [f"{worker[t]['min']}..{worker[t]['max']}" for t in targets]))
        lines.append(row("every message reached smtp-sink",
                         ["yes" if figures[t]["all_arrived"] else "NO" for t in targets]))
        for key, goal in figures.get("goals", {}).items():
            name = "PSS of the tree" if key == "pss_after_mib" else "msgs/s"
            lines.append(f"\nGoal: poolmgr's {name} {goal['how']} {goal['bound']:g}x amavisd's: "
                         f"**{'met' if goal['met'] else 'NOT met'}** (median ratio "
                         f"{ratios[key]['median']:g}; "
                         f"{'every round' if goal['every_round'] else 'not every round'}).")
        lines.append("")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps(table, indent=1) + "\n")


def _spread(s: dict) -> str:
    return f"{s['median']:g} ({s['min']:g}..{s['max']:g})"
