"""spamd throughput: messages per second for one message (10 KB of plain text by default) with
1, 2, 4, 8 concurrent clients, each a thread calling the spamd back-end's `check` in a loop.
spamd is a private local-tests-only instance (poolmgr.testing.Spamd) with --max-children equal
to the largest concurrency, all children preforked.

Prints a table and writes the figures as JSON (--json, default
bench/results/spamd_throughput.json) for a later run to be compared with.

    PYTHONPATH=. python3 bench/spamd_throughput.py [--seconds 5] [--clients 1,2,4,8]
"""

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

from poolmgr import config
from poolmgr.scanner.backends.base import CheckFailed, Message
from poolmgr.scanner.backends.spamd import Backend
from poolmgr.testing import Spamd

HERE = Path(__file__).resolve().parent

HEADER = (b"Received: from h.example.org\r\n"
          b"\tby mx.example.net with ESMTP id Q; Fri, 27 Nov 2026 10:00:00 +0000\r\n"
          b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
          b"From: Alice <alice@example.org>\r\n"
          b"To: Bob <bob@example.net>\r\n"
          b"Subject: quarterly report\r\n"
          b"Message-ID: <20261127100000.1@example.org>\r\n"
          b"MIME-Version: 1.0\r\n"
          b"Content-Type: text/plain; charset=us-ascii\r\n\r\n")

PARAGRAPH = (b"The quarterly figures are in: sales grew in the north and held steady in the\r\n"
             b"south, while costs for shipping rose again. Please read the attached notes\r\n"
             b"before Thursday's meeting and send me your questions by Wednesday noon.\r\n\r\n")


def message(size: int) -> Message:
    body = PARAGRAPH * (max(size - len(HEADER), 0) // len(PARAGRAPH) + 1)
    data = HEADER + body[:max(size - len(HEADER), 0)]
    return Message(data=data, queue_id="Q", sender="alice@example.org",
                   rcpts=("bob@example.net",), client_addr="192.0.2.1", client_name="",
                   helo="h.example.org")


def measure(check: Backend, msg: Message, clients: int, seconds: float) -> dict:
    """`clients` threads checking `msg` for `seconds`: completed checks, failures, rate."""
    done = [0] * clients
    failed = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = threading.Event()

    def loop(i: int) -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                check.check(msg)
            except CheckFailed:
                failed[i] += 1
                continue
            latencies[i].append(time.monotonic() - start)
            done[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    all_latencies = sorted(x for each in latencies for x in each)
    median = all_latencies[len(all_latencies) // 2] if all_latencies else None
    return {"clients": clients, "checks": sum(done), "failed": sum(failed),
            "seconds": round(elapsed, 2), "per_second": round(sum(done) / elapsed, 1),
            "median_ms": round(median * 1000, 1) if median is not None else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per concurrency level")
    parser.add_argument("--clients", default="1,2,4,8", help="concurrency levels")
    parser.add_argument("--size", type=int, default=10 * 1024, help="message size in bytes")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "spamd_throughput.json")
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.clients.split(",")]

    daemon = Spamd(max_children=max(levels)).start()
    try:
        cfg = config.from_dict({"scanner": {"checks": ["spamd"],
                                            "spamd": {"address": daemon.address}}})
        check = Backend(cfg)
        msg = message(args.size)
        first = check.check(msg)
        # Warm up every child at once: each does some set-up on its first messages.
        measure(check, msg, max(levels), 2.0)
        load = os.getloadavg()[0]
        rows = [measure(check, msg, n, args.seconds) for n in levels]
    finally:
        daemon.stop()

    print(f"spamd, {len(msg.data)}-byte message (score {first.score}), "
          f"--max-children={max(levels)}, {os.cpu_count()} CPUs, load {load:.2f} before")
    print(f"{'clients':>7} {'checks':>7} {'failed':>6} {'msg/s':>7} {'median ms':>9}")
    for row in rows:
        print(f"{row['clients']:>7} {row['checks']:>7} {row['failed']:>6} "
              f"{row['per_second']:>7} {row['median_ms']!s:>9}")
    result = {"bench": "spamd_throughput", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime()),
              "host": platform.node(), "cpus": os.cpu_count(), "message_bytes": len(msg.data),
              "max_children": max(levels), "seconds_per_level": args.seconds,
              "load_before": round(load, 2), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
