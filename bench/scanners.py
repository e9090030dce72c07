"""Messages per second of one check back-end's `check`, one message after another, against a
real daemon started for the run (clamd: poolmgr.testing.Clamd, local EICAR signature only).

    PYTHONPATH=. python3 bench/scanners.py [--size 10240] [--seconds 5] [--out FILE]

Prints the figures and writes them as JSON (default bench/out/scanners.json), to compare with a
later run.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from poolmgr import config
from poolmgr.scanner.backends import clamd
from poolmgr.scanner.backends.base import Message
from poolmgr.testing import Clamd


def sample_message(size: int) -> bytes:
    header = b"From: a@x\r\nTo: b@y\r\nSubject: bench\r\nMessage-ID: <bench@x>\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * ((size - len(header)) // len(line) + 1)
    return (header + body)[:size]


def rate(check, message: Message, seconds: float) -> dict:
    check.check(message)  # warm-up: the first connection
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        check.check(message)
        count += 1
    return {"messages": count, "seconds": round(elapsed, 3),
            "per_second": round(count / elapsed, 1),
            "ms_per_message": round(1000 * elapsed / count, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10 * 1024, help="message size in bytes")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--out", type=Path, default=Path("bench/out/scanners.json"))
    args = parser.parse_args(argv)
    message = Message(data=sample_message(args.size), queue_id="Q", sender="a@x",
                      rcpts=("b@y",), client_addr="192.0.2.1", client_name="", helo="h")
    results = {"size": args.size}
    with Clamd(tcp=True) as daemon:
        for label, address in (("clamd-unix", daemon.address), ("clamd-tcp", daemon.tcp_address)):
            cfg = config.from_dict({"scanner": {"checks": ["clamd"],
                                                "clamd": {"address": address}}})
            results[label] = figures = rate(clamd.Backend(cfg), message, args.seconds)
            print(f"{label}: {figures['per_second']} msgs/s ({figures['ms_per_message']} ms "
                  f"each, {args.size}-byte message, {figures['messages']} in "
                  f"{figures['seconds']}s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
