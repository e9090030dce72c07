"""What [cluster] costs per connection: connections per second one poolmgr node accepts with
its client state in Redis and without, in the same run, rounds taken in turn.

    PYTHONPATH=. python3 bench/cluster_overhead.py [--rounds 3] [--seconds 5] [--concurrency 40]

Each round starts one node (two SMTP workers, `client_connection_count_limit` on, greet test
off), then opens connections as fast as `concurrency` clients can, each from a fresh
127.x.y.z address (none exempt, so every connection asks anvil, and with [cluster] Redis):
banner, QUIT, close. Prints connections/s per round, then the mean and spread of each mode,
and writes bench/results/cluster_overhead.json. Bounded: rounds x 2 x seconds of load.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from poolmgr.testing import Poolmgr, RedisServer


async def hammer(port: int, seconds: float, concurrency: int, second_octet: int) -> int:
    done = 0
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def client():
        nonlocal done
        while time.monotonic() < deadline:
            n = next(counter)
            source = f"127.{second_octet}.{(n // 250) % 250}.{n % 250 + 1}"
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 10)
                banner = await asyncio.wait_for(reader.readline(), 10)
                writer.write(b"QUIT\r\n")
                await writer.drain()
                await asyncio.wait_for(reader.readline(), 10)
                writer.close()
                if banner.startswith(b"220 "):
                    done += 1
            except (OSError, asyncio.TimeoutError):
                pass

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done


def one_round(mode: str, redis: RedisServer, seconds: float, concurrency: int,
              octet: int) -> float:
    overrides = {"defence": {"client_connection_count_limit": 50}}
    if mode == "on":
        overrides["cluster"] = {"redis": redis.url, "node": "bench"}
    with tempfile.TemporaryDirectory(prefix="poolmgr-overhead-") as work:
        pm = Poolmgr(Path(work), overrides).start()
        try:
            accepted = asyncio.run(hammer(pm.smtp_port, seconds, concurrency, octet))
        finally:
            pm.stop()
    return accepted / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=40)
    args = parser.parse_args()
    rates = {"off": [], "on": []}
    redis = RedisServer().start()
    try:
        octet = 100
        for n in range(args.rounds):
            for mode in ("off", "on") if n % 2 == 0 else ("on", "off"):
                octet += 1  # fresh source addresses: no TIME_WAIT from the round before
                rate = one_round(mode, redis, args.seconds, args.concurrency, octet)
                rates[mode].append(round(rate, 1))
                print(f"round {n + 1} cluster {mode}: {rate:.0f} connections/s", flush=True)
    finally:
        redis.stop()
    summary = {mode: {"rates": r, "mean": round(statistics.mean(r), 1),
                      "stdev": round(statistics.stdev(r), 1) if len(r) > 1 else 0.0}
               for mode, r in rates.items()}
    for mode, s in summary.items():
        print(f"cluster {mode}: {s['mean']:.0f} connections/s (sd {s['stdev']:.0f}, "
              f"rounds {s['rates']})")
    off, on = summary["off"]["mean"], summary["on"]["mean"]
    print(f"[cluster] on costs {100 * (off - on) / off:.1f}% of the connection rate")
    out = Path(__file__).resolve().parent / "results" / "cluster_overhead.json"
    out.write_text(json.dumps({"args": vars(args), "summary": summary,
                               "started": time.time()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
