"""Throughput of the whole path, measured with Postfix's own load tools.

    python3 bench/smtp_source.py [--sessions 20] [--messages 2000] [--out bench/out]

Starts poolmgr (SMTP pool -> scanner pool -> next hop) with Postfix's `smtp-sink` as the next
hop, measures the RSS of poolmgr's whole process tree at rest, then runs
`smtp-source -s SESSIONS -m MESSAGES` against the SMTP port and reports messages/second, how
many the client saw accepted and how many reached smtp-sink. Prints the figures and writes
them to OUT/smtp_source.json so a later run can be compared with this one.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from poolmgr.testing import HELO, Poolmgr, Sink, wait_until  # noqa: E402


def tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def tree_uss(pid: int) -> int:
    """Memory unique to each process: RSS counts pages shared after fork once per process."""
    root = psutil.Process(pid)
    return sum(p.memory_full_info().uss for p in [root, *root.children(recursive=True)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s")
    parser.add_argument("--messages", type=int, default=2000, help="smtp-source -m")
    parser.add_argument("--size", type=int, default=0, help="smtp-source -l (message bytes)")
    parser.add_argument("--smtp-workers", type=int, default=2)
    parser.add_argument("--scanner-workers", type=int, default=2)
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="poolmgr-bench-"))
    sink = Sink(work).start()
    pm = Poolmgr(work / "poolmgr", {
        "smtp": {"min_workers": args.smtp_workers, "max_workers": max(8, args.smtp_workers)},
        "scanner": {"min_workers": args.scanner_workers,
                    "max_workers": max(4, args.scanner_workers),
                    "next_hop": f"smtp:127.0.0.1:{sink.port}", "max_requests": 100000},
    })
    try:
        pm.start()
        time.sleep(2)  # let the workers settle before measuring memory at rest
        rest_rss, rest_uss = tree_rss(pm.proc.pid), tree_uss(pm.proc.pid)
        command = ["smtp-source", "-s", str(args.sessions), "-m", str(args.messages), "-c",
                   "-M", HELO, "-f", "bench@example.org", "-t", "sink@example.test"]
        if args.size:
            command += ["-l", str(args.size)]
        started = time.monotonic()
        result = subprocess.run(command + [f"127.0.0.1:{pm.smtp_port}"], capture_output=True,
                                text=True, timeout=1800)
        elapsed = time.monotonic() - started
        wait_until(lambda: len(sink.messages()) >= args.messages, timeout=60,
                   what="every message at smtp-sink")
        counters = pm.status()["pools"]["smtp"]["counters"]
        figures = {
            "command": " ".join(command + ["127.0.0.1:PORT"]),
            "smtp_workers": args.smtp_workers, "scanner_workers": args.scanner_workers,
            "messages": args.messages, "sessions": args.sessions,
            "smtp_source_exit": result.returncode,
            "accepted_by_poolmgr": counters.get("messages_accepted", 0),
            "deferred_by_poolmgr": counters.get("messages_tempfailed", 0),
            "rejected_by_poolmgr": counters.get("messages_rejected", 0),
            "arrived_at_smtp_sink": len(sink.messages()),
            "seconds": round(elapsed, 2),
            "messages_per_second": round(args.messages / elapsed, 1),
            "rss_at_rest_mib": round(rest_rss / 2**20, 1),
            "uss_at_rest_mib": round(rest_uss / 2**20, 1),
            "rss_after_mib": round(tree_rss(pm.proc.pid) / 2**20, 1),
        }
    finally:
        pm.stop()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smtp_source.json").write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        print(f"{key:>24}: {value}")
    ok = figures["arrived_at_smtp_sink"] == figures["accepted_by_poolmgr"] == args.messages
    return 0 if ok and result.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
