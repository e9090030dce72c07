"""A microbench of the anvil path: how many connects and disconnects per second the master's
anvil (`defence.anvil.AnvilServer`) serves from several SMTP workers' `AnvilClient`s.

The parent process plays the master: one selector loop, as master.py's, serving a
SOCK_SEQPACKET pair per worker. Each forked worker is a gevent process, as an SMTP worker
is, with one `AnvilClient` shared by its "sessions": open loop (`--rate`, new connections per
second over all workers) each session asks `connect`, holds the connection `--hold` seconds
and tells `disconnect`; closed loop (`--rate 0`) `--concurrency` sessions per worker connect
and disconnect one after another. Every session comes from an address of its own (a storm of
distinct bots).

Figures: connections asked, answered and failed open (no answer within ANVIL_TIMEOUT: the
fallback), answered per second, the answer's p50/p99 latency, the master's CPU seconds
per 1,000 connections (connect and disconnect), which is what it can keep up with on an
otherwise idle core, and the workers' CPU seconds in all.

    python3 -m poolmgr.benchmark.anvil_path --workers 4 --rate 5000 --seconds 10
"""

__all__ = ["run", "main"]

import argparse
import json
import os
import selectors
import socket
import sys
import time

from ..defence.anvil import ANVIL_TIMEOUT, Anvil, AnvilServer


class _Quiet:
    """The workers' log: counts the warnings, prints none."""

    def __init__(self):
        self.warnings = 0

    def warning(self, *args) -> None:
        self.warnings += 1

    info = error = warning


def _worker(sock: socket.socket, index: int, args, out) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gevent

    from ..defence.anvil import AnvilClient

    log = _Quiet()
    client = AnvilClient(socket.socket(fileno=sock.detach()), ANVIL_TIMEOUT, log)
    latencies: list[float] = []
    figures = {"asked": 0, "fallbacks": 0}
    start = time.monotonic()
    end = start + args.seconds

    def session(n: int) -> None:
        ip = f"10.{index}.{(n >> 8) & 255}.{n & 255}"
        figures["asked"] += 1
        began = time.monotonic()
        usage = client.connect(ip)
        if usage is None:
            figures["fallbacks"] += 1
        else:
            latencies.append(time.monotonic() - began)
        if args.hold:
            gevent.sleep(args.hold)
        client.disconnect(ip)

    def closed_loop(first: int) -> None:
        n = first
        while time.monotonic() < end:
            session(n)
            n += args.concurrency

    if args.rate:
        per_worker = args.rate / args.workers
        n = 0
        group = []
        while (now := time.monotonic()) < end:
            due = int((now - start) * per_worker)
            while n < due:
                group.append(gevent.spawn(session, n))
                n += 1
            gevent.sleep(0.005)
    else:
        group = [gevent.spawn(closed_loop, i) for i in range(args.concurrency)]
    gevent.joinall(group, timeout=end - time.monotonic() + args.hold + 2 * ANVIL_TIMEOUT + 1)
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0

    used = os.times()
    out.write(json.dumps({**figures, "answered": len(latencies), "warnings": log.warnings,
                          "p50": pct(0.5), "p99": pct(0.99),
                          "cpu": used.user + used.system}) + "\n")
    out.flush()


def run(args) -> dict:
    server = AnvilServer(Anvil(60.0), time.monotonic)
    selector = selectors.DefaultSelector()
    read_end, write_end = os.pipe()
    pids = []
    for index in range(args.workers):
        mine, theirs = server.pair()
        pid = os.fork()
        if pid == 0:
            mine.close()
            os.close(read_end)
            try:
                _worker(theirs, index, args, os.fdopen(write_end, "w"))
            finally:
                os._exit(0)
        theirs.close()
        server.adopt(pid, mine, selector)
        pids.append(pid)
    os.close(write_end)
    cpu = os.times()
    started = time.monotonic()
    while server.socks:
        for key, _ in selector.select(0.5):
            if not server.serve(key.fileobj, key.data):
                server.drop(key.data, selector, _Quiet())
    used = os.times()
    master_cpu = (used.user - cpu.user) + (used.system - cpu.system)
    for pid in pids:
        os.waitpid(pid, 0)
    with os.fdopen(read_end) as results:
        workers = [json.loads(line) for line in results]
    asked = sum(w["asked"] for w in workers)
    answered = sum(w["answered"] for w in workers)
    return {"workers": args.workers, "rate": args.rate, "seconds": args.seconds,
            "asked": asked, "answered": answered,
            "fallbacks": sum(w["fallbacks"] for w in workers),
            "warnings": sum(w["warnings"] for w in workers),
            "answered_per_s": round(answered / args.seconds),
            "p50_ms": round(1000 * max(w["p50"] for w in workers), 2),
            "p99_ms": round(1000 * max(w["p99"] for w in workers), 2),
            "master_cpu_s": round(master_cpu, 2),
            "master_cpu_ms_per_1000": round(1000 * master_cpu / max(1, asked) * 1000, 1),
            "workers_cpu_s": round(sum(w["cpu"] for w in workers), 2),
            "wall_s": round(time.monotonic() - started, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m poolmgr.benchmark.anvil_path",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=5000,
                        help="new connections per second over all workers (0: closed loop)")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="closed loop: sessions per worker")
    parser.add_argument("--hold", type=float, default=0.2,
                        help="seconds each connection is held before its disconnect")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args(argv)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
