"""Messages per second through the scanner pool, per check back-end and pool size: a real
poolmgr whose scanner pool is fixed at N workers (autoscaler off) re-injects into Postfix's
smtp-sink; N SMTP clients (threads, one connection each) send one 10 KB message after another
straight to scanner.listen for a fixed time. The daemons are started for the run (clamd with a
local EICAR signature only, spamd with local tests only; see poolmgr.testing).

    PYTHONPATH=. python3 bench/scanner_pool.py [--checks builtin,clamd,spamd]
        [--workers 1,2,4] [--seconds 10] [--runs 2] [--size 10240] [--out FILE]

Prints one line per (checks, workers, run) and writes everything as JSON (default
bench/out/scanner_pool.json). Where spamd's figure stops growing with the pool size is the
pool size past which more scanner workers buy nothing on this machine.
"""

import argparse
import json
import smtplib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from poolmgr.testing import Clamd, Poolmgr, Sink, Spamd

HELO = "bench.example"


def sample_message(size: int) -> bytes:
    header = (b"From: <alice@example.org>\r\nTo: <bob@example.test>\r\nSubject: bench\r\n"
              b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench@example.org>\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return (header + line * ((size - len(header)) // len(line) + 1))[:size] + b"\r\n"


def blast(port: int, clients: int, seconds: float, data: bytes) -> tuple[int, int, float]:
    """`clients` connections sending for `seconds`: (accepted, failed, elapsed)."""
    accepted, failed = [0] * clients, [0] * clients
    start = time.monotonic() + 0.5
    deadline = start + seconds

    def client(i: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=60) as smtp:
            while time.monotonic() < start:
                time.sleep(0.01)
            while time.monotonic() < deadline:
                try:
                    smtp.sendmail("alice@example.org", ["bob@example.test"], data)
                    accepted[i] += 1
                except smtplib.SMTPException:
                    failed[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(accepted), sum(failed), time.monotonic() - start


def run_pool(checks: list[str], workers: int, daemons: dict, seconds: float, data: bytes,
             workdir: Path) -> dict:
    sink = Sink(workdir).start()
    scanner = {"checks": checks, "min_workers": workers, "max_workers": workers,
               "next_hop": f"smtp:127.0.0.1:{sink.port}", "quarantine": ""}
    if "clamd" in checks:
        scanner["clamd"] = {"address": daemons["clamd"].address}
    if "spamd" in checks:
        scanner["spamd"] = {"address": daemons["spamd"].address}
    pm = Poolmgr(workdir / f"pm-{'-'.join(checks)}-{workers}", {
        "scanner": scanner, "smtp": {"min_workers": workers, "max_workers": workers},
        "autoscale": {"enabled": False}})
    try:
        pm.start()
        accepted, failed, elapsed = blast(pm.scanner_port, workers, seconds, data)
    finally:
        if pm.proc is not None:
            pm.proc.terminate()
            pm.proc.wait(30)
        sink.stop()
    return {"accepted": accepted, "failed": failed, "seconds": round(elapsed, 2),
            "per_second": round(accepted / elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", default="builtin,clamd,spamd",
                        help="comma-separated back-ends, each measured on its own "
                             "(builtin is always run first, as in a real config)")
    parser.add_argument("--workers", default="1,2,4", help="scanner pool sizes")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--runs", type=int, default=2, help="runs per pool size (spread)")
    parser.add_argument("--size", type=int, default=10 * 1024, help="message size in bytes")
    parser.add_argument("--out", type=Path, default=Path("bench/out/scanner_pool.json"))
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.workers.split(",")]
    data = sample_message(args.size)
    results: dict = {"size": args.size, "seconds": args.seconds, "figures": {}}
    workdir = Path(tempfile.mkdtemp(prefix="poolmgr-bench-scanner-"))
    daemons: dict = {}
    try:
        names = args.checks.split(",")
        if "clamd" in names:
            daemons["clamd"] = Clamd(workdir).start()
        if "spamd" in names:
            daemons["spamd"] = Spamd(max_children=max(sizes)).start()
        for name in names:
            checks = ["builtin"] if name == "builtin" else ["builtin", name]
            per_size = results["figures"][name] = {}
            for workers in sizes:
                rates = []
                for run in range(args.runs):
                    figures = run_pool(checks, workers, daemons, args.seconds, data, workdir)
                    rates.append(figures["per_second"])
                    print(f"{'+'.join(checks)}: {workers} scanner worker(s), run {run + 1}: "
                          f"{figures['per_second']} msgs/s ({figures['accepted']} accepted, "
                          f"{figures['failed']} failed in {figures['seconds']}s)", flush=True)
                per_size[workers] = {"per_second": rates, "median": statistics.median(rates)}
    finally:
        for daemon in daemons.values():
            daemon.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.out}")
    for name, per_size in results["figures"].items():
        print(f"{name}: " + ", ".join(f"{n} worker(s) {v['median']} msgs/s "
                                       f"(runs {v['per_second']})" for n, v in per_size.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
