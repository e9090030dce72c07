"""A botnet burst with legitimate mail among it: what is shed, by which test, and what it costs.

    python3 bench/burst.py [--bots 2000] [--legit 50] [--ramp 3] [--out bench/out]

Starts a DNS server on a loopback port (dnslib) serving a DNSBL zone, and poolmgr (2 SMTP and
2 scanner workers, the embedded maildir next hop) with the defences a storm calls for:
pregreet test (`greet_wait`, action drop), DNSBL (action enforce: 550 5.7.1 at RCPT), recipient
validation, and stress mode switched on with `poolmgr ctl stress on` as the autoscaler would.
Then it opens BOTS bot connections over RAMP seconds from distinct 127.x.y.z addresses, a
quarter of each kind:

- idle: connects and never speaks (held until poolmgr's timeout closes it);
- pregreet: talks before the banner;
- listed: listed in the DNSBL, tries one recipient;
- dictionary: tries five unknown recipients of the local domain;

and, spread over the same seconds, LEGIT deliveries with Python's smtplib from other addresses.
It reports poolmgr's verdicts by reason, what the bots saw, how many legitimate messages reached
the maildir (all must), their median and worst latency (connect to 250 after DATA), how many
messages reached the scanner pool, and the CPU seconds poolmgr's processes spent. The figures
are printed and written to OUT/burst.json.
"""

import argparse
import asyncio
import concurrent.futures
import json
import resource
import smtplib
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from poolmgr.benchmark.run import tree_usage  # noqa: E402
from poolmgr.testing import HELO, DnsServer, Poolmgr, wait_until  # noqa: E402

KINDS = ("idle", "pregreet", "listed", "dictionary")
HOLD = 120.0  # longest a bot waits for poolmgr to act


def address(kind_index: int, n: int) -> str:
    return f"127.{20 + kind_index}.{n // 250}.{n % 250 + 1}"


async def bot(kind: str, source: str, port: int) -> str:
    """A talking bot; returns what it saw: the reply that ended it, or how it ended."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0)), 30)
    except (OSError, asyncio.TimeoutError) as exc:
        return f"connect failed: {type(exc).__name__}"

    async def reply() -> str:
        while True:
            line = await asyncio.wait_for(reader.readline(), HOLD)
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return line.decode(errors="replace").strip()

    try:
        if kind == "pregreet":
            writer.write(b"EHLO bot.example\r\n")
            await writer.drain()
        banner = await reply()
        if not banner.startswith("220"):
            return banner[:3]
        writer.write(b"EHLO bot.example\r\n")
        await writer.drain()
        await reply()
        writer.write(b"MAIL FROM:<spam@bot.example>\r\n")
        await writer.drain()
        await reply()
        names = ["info"] if kind == "listed" else [f"user{n}" for n in range(5)]
        seen = ""
        for name in names:
            writer.write(f"RCPT TO:<{name}@example.test>\r\n".encode())
            await writer.drain()
            seen = await reply()
            if seen.startswith("421"):
                return seen[:9]
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return seen[:9]
    except ConnectionError:
        return "closed"
    except asyncio.TimeoutError:
        return "held"
    finally:
        writer.close()


async def idle_bot(source: str, port: int) -> str:
    """Connects, never speaks; returns the reply that closed it (banner skipped)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0)), 30)
    except (OSError, asyncio.TimeoutError) as exc:
        return f"connect failed: {type(exc).__name__}"
    last = ""
    try:
        deadline = time.monotonic() + HOLD
        while time.monotonic() < deadline:
            line = await asyncio.wait_for(reader.readline(), deadline - time.monotonic())
            if not line:
                return last or "closed"
            last = line.decode(errors="replace").strip()[:9]
        return "held"
    except asyncio.TimeoutError:
        return "held"
    finally:
        writer.close()


def legit(port: int, source: str, n: int) -> tuple[float, str]:
    """One legitimate delivery with smtplib; (latency seconds, outcome)."""
    started = time.monotonic()
    body = (f"From: <sender{n}@partner.example>\r\nTo: <bob@example.test>\r\n"
            f"Subject: legit {n}\r\nMessage-ID: <burst-legit-{n}@partner.example>\r\n\r\n"
            f"legitimate message {n}\r\n").encode()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=120, local_hostname=HELO,
                          source_address=(source, 0)) as client:
            refused = client.sendmail(f"sender{n}@partner.example", ["bob@example.test"], body)
        return time.monotonic() - started, "refused" if refused else "250"
    except (smtplib.SMTPException, OSError) as exc:
        return time.monotonic() - started, f"{type(exc).__name__}: {exc}"


async def storm(args, port: int) -> tuple[Counter, list[tuple[float, str]]]:
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.legit)
    tasks, legit_jobs = [], []
    per_kind = args.bots // len(KINDS)
    order = [(k, n) for n in range(per_kind) for k in range(len(KINDS))]
    legit_every = max(1, len(order) // max(1, args.legit))
    started = time.monotonic()
    for i, (k, n) in enumerate(order):
        due = started + args.ramp * i / len(order)
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        kind = KINDS[k]
        coro = (idle_bot(address(k, n), port) if kind == "idle"
                else bot(kind, address(k, n), port))
        tasks.append((kind, asyncio.ensure_future(coro)))
        if i % legit_every == 0 and len(legit_jobs) < args.legit:
            m = len(legit_jobs)
            legit_jobs.append(loop.run_in_executor(pool, legit, port, f"127.30.0.{m + 1}", m))
    while len(legit_jobs) < args.legit:
        m = len(legit_jobs)
        legit_jobs.append(loop.run_in_executor(pool, legit, port, f"127.30.0.{m + 1}", m))
    seen = Counter()
    for kind, task in tasks:
        seen[f"{kind}: {await task}"] += 1
    results = await asyncio.gather(*legit_jobs)
    pool.shutdown()
    return seen, list(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bots", type=int, default=2000)
    parser.add_argument("--legit", type=int, default=50)
    parser.add_argument("--ramp", type=float, default=3.0, help="seconds over which bots arrive")
    parser.add_argument("--greet-wait", default="1s")
    parser.add_argument("--smtp-workers", type=int, default=2)
    parser.add_argument("--scanner-workers", type=int, default=2)
    parser.add_argument("--no-stress", action="store_true", help="leave stress mode off")
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="poolmgr-burst-"))
    dns = DnsServer({}, ttl=300).start()
    listed = KINDS.index("listed")
    for n in range(args.bots // len(KINDS)):
        dns.list(address(listed, n), "zen.test")
    recipients = work / "recipients"
    recipients.write_text("bob@example.test\npostmaster@example.test\n")
    pm = Poolmgr(work / "poolmgr", {
        "smtp": {"min_workers": args.smtp_workers, "max_workers": max(8, args.smtp_workers),
                 "max_sessions_per_worker": 5000},
        "scanner": {"min_workers": args.scanner_workers, "max_requests": 100000},
        "defence": {"greet_wait": args.greet_wait, "greet_action": "drop",
                    "dnsbl_sites": ["zen.test*2"], "dnsbl_threshold": 2,
                    "dnsbl_action": "enforce", "nameservers": [dns.address],
                    "recipients": str(recipients), "client_connection_count_limit": 20,
                    "stress_timeout": "10s", "suspicious_timeout": "10s"},
    })
    try:
        pm.start()
        if not args.no_stress:
            pm.run_cli("ctl", "stress", "on", check=True)
        time.sleep(1)
        cpu_before = tree_usage(pm.proc.pid)[2]
        before = pm.status()["nuisance"]["total"]  # start-up probes, not part of the burst
        wall = time.monotonic()
        seen, results = asyncio.run(storm(args, pm.smtp_port))
        wall = time.monotonic() - wall
        wait_until(lambda: pm.status()["pools"]["smtp"]["sessions"] == 0, timeout=60,
                   what="every session closed")
        cpu = tree_usage(pm.proc.pid)[2] - cpu_before
        status = pm.status()
        delivered = pm.delivered()
        ids = {f"<burst-legit-{n}@partner.example>".encode() for n in range(args.legit)}
        arrived = sum(1 for msg in delivered if any(i in msg for i in ids))
        latencies = sorted(t for t, outcome in results if outcome == "250")
        smtp = status["pools"]["smtp"]["counters"]
        figures = {
            "bots": args.bots, "legit": args.legit, "ramp_s": args.ramp,
            "greet_wait": args.greet_wait, "stress": not args.no_stress,
            "smtp_workers": args.smtp_workers, "scanner_workers": args.scanner_workers,
            "verdicts": dict(Counter(status["nuisance"]["total"]["by_reason"]) -
                             Counter(before["by_reason"])),
            "legit_sessions": status["nuisance"]["total"]["legit"] - before["legit"],
            "bots_saw": dict(sorted(seen.items())),
            "legit_accepted": len(latencies),
            "legit_outcomes": dict(Counter(outcome for _, outcome in results)),
            "legit_delivered": arrived,
            "latency_median_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_worst_s": round(latencies[-1], 3) if latencies else None,
            "handoffs_to_scanner": smtp.get("handoffs", 0),
            "scanned": status["pools"]["scanner"]["counters"].get("scanned", 0),
            "scanner_connections": status["pools"]["scanner"]["counters"].get("connections", 0),
            "poolmgr_cpu_s": round(cpu, 2), "wall_s": round(wall, 1),
            "dns_queries": len(dns.queries),
        }
    finally:
        pm.stop()
        dns.stop()
    print(f"burst: {args.bots} bots ({', '.join(KINDS)}: {args.bots // 4} each) and "
          f"{args.legit} legitimate deliveries over {args.ramp:g}s; greet_wait "
          f"{args.greet_wait}, stress mode {'on' if figures['stress'] else 'off'}")
    print("poolmgr verdicts (sessions by nuisance reason):")
    for reason, count in sorted(figures["verdicts"].items(), key=lambda kv: -kv[1]):
        print(f"  {reason:<20} {count:>6}")
    print(f"  {'legit':<20} {figures['legit_sessions']:>6}")
    print("what the bots saw (last reply, or how it ended):")
    for what, count in figures["bots_saw"].items():
        print(f"  {what:<28} {count:>6}")
    print(f"legitimate: {figures['legit_accepted']}/{args.legit} got 250, "
          f"{figures['legit_delivered']}/{args.legit} in the maildir; latency median "
          f"{figures['latency_median_s']}s, worst {figures['latency_worst_s']}s")
    print(f"hand-offs to the scanner pool: {figures['handoffs_to_scanner']} (connections the "
          f"scanner pool accepted: {figures['scanner_connections']}, scanned "
          f"{figures['scanned']})")
    print(f"poolmgr CPU: {figures['poolmgr_cpu_s']}s over {figures['wall_s']}s of burst; "
          f"DNS queries answered: {figures['dns_queries']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "burst.json").write_text(json.dumps(figures, indent=2) + "\n")
    ok = figures["legit_delivered"] == args.legit and \
        figures["scanner_connections"] == args.legit
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
