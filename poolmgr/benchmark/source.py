"""`poolmgr bench source`: Postfix's own load tool through a target, in messages/second.

The target starts as for `bench run` (`targets.started`: poolmgr's two pools, Postfix or
aiosmtpd, each relaying to the same smtp-sink). After two seconds at rest its process tree is
measured (RSS, PSS), then `smtp-source -s SESSIONS -m MESSAGES [-l SIZE]` sends from 127.0.0.1,
a client every target trusts (Postfix's mynetworks, poolmgr's allowlist), so the figure is the
mail path's, not the defences'. Figures: messages/second over smtp-source's run, what
smtp-source saw (its exit status), what the target accepted (poolmgr's counters), what reached
smtp-sink (and the header fields one message carried there), the tree's memory at rest and
after, and each worker's (the root's children) after, written to OUT/result.json. With
`content_filter` (`targets.started`) the target is a content filter (poolmgr's scanner pool
alone, or amavisd-new) and the CPU seconds of the clamd it asks are measured too
(`benchmark.content_filter`).

`rounds` runs it for each target in turn, round after round (a noisy machine shows in the
spread, and each round's ratio is measured under the same conditions), for `bench run` and
`bench compare` of a source scenario (`kind = "source"`, bench/scenarios/throughput.toml).
"""

__all__ = ["source", "rounds"]

import json
import shutil
import statistics
import subprocess
import time
from email.parser import BytesHeaderParser
from pathlib import Path

from ..testing import HELO
from .scenario import SERVER_DEFAULTS
from .targets import children_pss, settled, started, tree_usage

RECIPIENT = "bob@example.test"


def source(target_name: str, sessions: int, messages: int, size: int, out: Path,
           server: dict | None = None, content_filter: dict | None = None) -> dict:
    """Run smtp-source against the target (poolmgr at `server` sizes, default
    SERVER_DEFAULTS; a content filter with `content_filter`); returns the figures (also in
    OUT/result.json)."""
    command = [shutil.which("smtp-source") or "/usr/sbin/smtp-source", "-s", str(sessions),
               "-m", str(messages), "-c", "-M", HELO, "-f", "bench@example.org", "-t", RECIPIENT]
    if size:
        command += ["-l", str(size)]
    clamd = (content_filter or {}).get("clamd")
    backend = [clamd.proc.pid] if clamd else []  # shared by the targets: not in their trees
    with started(target_name, server or SERVER_DEFAULTS, [RECIPIENT],
                 content_filter=content_filter) as (target, sink, dns, work):
        time.sleep(2)  # let the workers settle before measuring memory at rest
        rest_rss, rest_pss, cpu_before = tree_usage(target.pid)
        backend_before = tree_usage(*backend)[2]
        begun = time.monotonic()
        result = subprocess.run(command + [f"127.0.0.1:{target.port}"], capture_output=True,
                                text=True, timeout=1800)
        elapsed = time.monotonic() - begun
        delivered = settled(sink, expect=messages)
        arrived = len(delivered)
        after_rss, after_pss, cpu = tree_usage(target.pid)
        backend_cpu = tree_usage(*backend)[2] - backend_before
        workers_pss = children_pss(target.pid)
        counters = target.counters()
    mib = 2 ** 20
    figures = {
        "target": target_name, "command": " ".join(command[1:] + ["127.0.0.1:PORT"]),
        "sessions": sessions, "messages": messages, "size": size,
        "smtp_source_exit": result.returncode,
        "seconds": round(elapsed, 2), "messages_per_second": round(messages / elapsed, 1),
        **counters, "arrived_at_sink": arrived,
        "rss_at_rest_mib": round(rest_rss / mib, 1), "pss_at_rest_mib": round(rest_pss / mib, 1),
        "rss_after_mib": round(after_rss / mib, 1), "pss_after_mib": round(after_pss / mib, 1),
        "pss_workers_after_mib": [round(p / mib, 1) for p in workers_pss],
        "cpu_seconds": round(cpu - cpu_before, 2),
        "backend_cpu_seconds": round(backend_cpu, 2),
        # what one message carried at the next hop (smtp-sink's, the target's, smtp-source's)
        "header_names": header_names(delivered[0]) if delivered else [],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def header_names(message: bytes) -> list[str]:
    """The names of a message's header fields, in order, each once."""
    return list(dict.fromkeys(BytesHeaderParser().parsebytes(message).keys()))


def rounds(scenario, targets: list[str], out: Path) -> dict:
    """A source scenario: every target in turn, `rounds` times; per target its runs and the
    median, and for poolmgr against each peer the ratio of each round and their median."""
    settings = scenario.source
    runs: dict[str, list[dict]] = {t: [] for t in targets}
    for number in range(1, settings["rounds"] + 1):
        for target in targets:
            runs[target].append(source(target, settings["sessions"], settings["messages"],
                                       settings["size"], out / target / f"round{number}",
                                       scenario.server))
    table = {}
    for target, results in runs.items():
        rates = [r["messages_per_second"] for r in results]
        table[target] = {
            "messages_per_second": statistics.median(rates),
            "messages_per_second_runs": rates,
            "all_arrived": all(r["arrived_at_sink"] == r["messages"] and
                               r["smtp_source_exit"] == 0 for r in results),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in results),
            "cpu_ms_per_message": round(1000 * statistics.median(
                r["cpu_seconds"] / r["messages"] for r in results), 3),
            "pss_after_mib": statistics.median(r["pss_after_mib"] for r in results)}
        if "scanner_workers" in results[0]:
            table[target]["pools_after"] = [f"{r['smtp_workers']}+{r['scanner_workers']}"
                                            for r in results]
    if "poolmgr" in runs:
        ours = [r["messages_per_second"] for r in runs["poolmgr"]]
        for target, results in runs.items():
            ratios = [round(a / r["messages_per_second"], 3) for a, r in zip(ours, results)]
            table[target]["poolmgr_ratio_runs"] = ratios
            table[target]["poolmgr_ratio"] = round(statistics.median(ratios), 3)
    return table
