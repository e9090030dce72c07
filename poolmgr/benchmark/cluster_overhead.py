"""A cluster-overhead scenario (`kind = "cluster-overhead"`): what `[cluster]` with Redis
costs one poolmgr node, in connections per second with it and without, rounds taken in turn.

Each round measures both arms, off then on (every other round on then off, so a machine that
drifts weighs on both alike): a fresh node sized by the scenario's [server] (greet test off,
`client_connection_count_limit` on, so every connection asks anvil and, with [cluster], Redis),
then the load generator's closed loop (its `processes` share the clients): `clients` probe
clients, each connecting from a fresh 127.x.y.z address (none exempt), reading the banner,
QUIT, close, one connection after another for `duration`. One private redis-server serves every "on" arm, flushed before each, so each
starts as empty as an "off" arm's anvil; its commands during the arm are counted, so a
result shows the "on" arm really asked Redis.

Figures: per arm and round the connections completed (banner and 221), failed, connections/s
(completed over the time from the start to the last close) and Redis commands per connection;
per arm the rates of every round, their mean and standard deviation; and what [cluster] costs,
in percent of the "off" arm's mean rate. Written to OUT/result.json and OUT/report.md.
"""

__all__ = ["measure", "summary_lines", "ARMS"]

import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import redis as redis_py

from ..testing import Poolmgr, RedisServer
from .report import save_result
from .run import generate
from .scenario import Scenario

ARMS = ("off", "on")
# Each connection has anvil count it (with [cluster]: Redis too); the limit is never reached,
# as every client comes from an address of its own.
CONNECTION_COUNT_LIMIT = 50


def node(work: Path, server: dict, redis_url: str | None) -> Poolmgr:
    sections = {"smtp": {"min_workers": server["smtp_workers"],
                         "max_workers": max(server["smtp_workers"], server["smtp_max_workers"]),
                         "max_sessions_per_worker": server["max_sessions_per_worker"]},
                "scanner": {"min_workers": server["scanner_workers"],
                            "max_workers": max(server["scanner_workers"],
                                               server["scanner_max_workers"])},
                "defence": {"client_connection_count_limit": CONNECTION_COUNT_LIMIT}}
    if redis_url:
        sections["cluster"] = {"redis": redis_url, "node": "bench"}
    return Poolmgr(work, sections)


def redis_commands(client) -> int:
    return int(client.info("stats")["total_commands_processed"])


def one_arm(scenario: Scenario, arm: str, redis: RedisServer, client, work: Path) -> dict:
    settings = scenario.measure
    looped = dataclasses.replace(scenario, drain=30.0, loop={
        "profile": "probe", "clients": settings["clients"], "duration": settings["duration"]})
    if arm == "on":
        client.flushall()
    pm = node(work, scenario.server, redis.url if arm == "on" else None)
    try:
        pm.start()
        before = redis_commands(client)
        load, _, _ = generate(looped, [["127.0.0.1", pm.smtp_port]], work)
        # less the first INFO, which the second counts (neither counts itself)
        commands = redis_commands(client) - before - 1
    finally:
        pm.stop()
    done = [b for b in load["bots"] if b["ended"] == "quit"]
    elapsed = max((b["t"] + b["held"] for b in done), default=settings["duration"])
    return {"cluster": arm, "connections": len(done), "failed": len(load["bots"]) - len(done),
            "seconds": round(elapsed, 2), "per_second": round(len(done) / elapsed, 1),
            "redis_commands_per_connection": round(commands / len(done), 2) if done else None}


def measure(scenario: Scenario, out: Path) -> dict:
    """Every round, both arms in turn; result.json and report.md in `out`."""
    settings = scenario.measure
    work = Path(tempfile.mkdtemp(prefix="poolmgr-bench-cluster-"))
    rounds: list[dict] = []
    started = time.time()
    redis = RedisServer(work).start()
    client = redis_py.Redis(host="127.0.0.1", port=redis.port)
    try:
        for number in range(1, settings["rounds"] + 1):
            for arm in ARMS if number % 2 else reversed(ARMS):
                arm_dir = work / f"round{number}-{arm}"
                figures = one_arm(scenario, arm, redis, client, arm_dir)
                shutil.rmtree(arm_dir, ignore_errors=True)
                rounds.append({"round": number, **figures})
                print(f"poolmgr bench: round {number} cluster {arm}: {figures['per_second']} "
                      f"connections/s ({figures['connections']} completed, {figures['failed']} "
                      f"failed; Redis commands per connection "
                      f"{figures['redis_commands_per_connection']})", flush=True)
    finally:
        client.close()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    figures = {"rounds": rounds}
    for arm in ARMS:
        rates = [r["per_second"] for r in rounds if r["cluster"] == arm]
        figures[arm] = {"rates": rates, "mean": round(statistics.mean(rates), 1),
                        "stdev": round(statistics.stdev(rates), 1) if len(rates) > 1 else 0.0}
    off, on = figures["off"]["mean"], figures["on"]["mean"]
    figures["overhead_pct"] = round(100 * (off - on) / off, 1) if off else None
    result = save_result(out, scenario, started, figures)
    write_report(out, scenario, figures)
    return result


def summary_lines(figures: dict) -> list[str]:
    """Each arm's mean, spread and rounds, then what [cluster] costs."""
    return [f"cluster {arm}: {figures[arm]['mean']:.0f} connections/s (sd "
            f"{figures[arm]['stdev']:.0f}, rounds {figures[arm]['rates']})" for arm in ARMS] + \
        [f"[cluster] on costs {figures['overhead_pct']}% of the connection rate"]


def write_report(out: Path, scenario: Scenario, figures: dict) -> None:
    s = scenario.measure
    lines = [f"# poolmgr bench: {scenario.name} (what [cluster] costs)", "",
             *([scenario.description, ""] if scenario.description else []),
             f"{s['rounds']} round(s) of both arms in turn, {s['duration']:g}s each, "
             f"{s['clients']} clients at once, each connection from an address of its own: "
             "banner, QUIT, close.",
             "", "| round | cluster | connections/s | completed | failed | Redis commands "
             "per connection |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['cluster']} | {r['per_second']} | {r['connections']} | "
              f"{r['failed']} | {r['redis_commands_per_connection']} |"
              for r in figures["rounds"]]
    lines += [""] + [f"- {line}" for line in summary_lines(figures)] + [""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
