"""`poolmgr bench run`: one scenario against one target, with figures, plots and a report.

The target runs in its own processes (poolmgr here: both pools, `smtp-sink` as the next hop so
that the next hop costs the same for every target); the DNSBL zone is served by a DNS server
on a loopback port; the load generator runs in its own process(es) (`benchmark.load`). Every
second the server side is sampled: RSS and CPU seconds of the target's whole process tree
(psutil), and poolmgr's status (pool sizes, sessions, storm phase).

Output in OUT: `result.json` (figures and the time series), `connections.png` (open
connections by profile and pool sizes over time), `latency.png` (legitimate latency over
time) and `report.md`, which embeds them.

Exports: run, figures, TARGETS.
"""

import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

from ..testing import DnsServer, Poolmgr, Postfix, Sink, free_port, wait_until
from . import load as loadgen
from .scenario import Scenario

TARGETS = ("poolmgr", "postfix", "postfix-postscreen", "aiosmtpd")
DNSBL_ZONE = "zen.bench.test"
RESOLVER = "127.53.53.53"
SAMPLE_EVERY = 1.0
MESSAGE_ID = re.compile(rb"<bench-\d+-\d+@partner\.example>")


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_usage(pid: int) -> tuple[int, int, float]:
    """(RSS bytes, PSS bytes, CPU seconds) of a process and its descendants. RSS counts the
    pages forked processes share once per process; PSS divides them among the sharers."""
    rss, pss, cpu = 0, 0, 0.0
    for proc in tree(pid):
        try:
            memory = proc.memory_full_info()
            rss += memory.rss
            pss += getattr(memory, "pss", memory.rss)
            times = proc.cpu_times()
            cpu += times.user + times.system + times.children_user + times.children_system
        except psutil.Error:
            pass
    return rss, pss, cpu


class PoolmgrTarget:
    name = "poolmgr"

    def __init__(self, scenario: Scenario, work: Path, sink: Sink, dns: DnsServer):
        s = scenario.server
        self.pm = Poolmgr(work / "poolmgr", {
            "smtp": {"min_workers": s["smtp_workers"],
                     "max_workers": max(s["smtp_workers"], s["smtp_max_workers"]),
                     "max_sessions_per_worker": s["max_sessions_per_worker"]},
            "scanner": {"min_workers": s["scanner_workers"],
                        "max_workers": max(s["scanner_workers"], s["scanner_max_workers"]),
                        "next_hop": f"smtp:127.0.0.1:{sink.port}", "max_requests": 1_000_000},
            "defence": {"greet_wait": "2s", "dnsbl_sites": [f"{DNSBL_ZONE}*2"],
                        "dnsbl_threshold": 2, "nameservers": [dns.address],
                        "recipients": str(self._recipients(work, scenario))},
        })

    @staticmethod
    def _recipients(work: Path, scenario: Scenario) -> Path:
        path = work / "recipients"
        path.write_text("".join(f"{r}\n" for r in scenario.profiles["legit"]["recipients"]) +
                        "postmaster@example.test\n")
        return path

    @property
    def port(self) -> int:
        return self.pm.smtp_port

    @property
    def pid(self) -> int:
        return self.pm.proc.pid

    def start(self) -> None:
        self.pm.start()

    def sample(self) -> dict:
        status = self.pm.try_status()
        if not status:
            return {}
        smtp, scanner = status["pools"]["smtp"], status["pools"]["scanner"]
        return {"sessions": smtp["sessions"], "smtp_workers": smtp["workers"],
                "scanner_workers": scanner["workers"], "phase": status["autoscale"]["phase"],
                "stress": status["stress"]["on"]}

    def verdicts(self) -> dict:
        status = self.pm.try_status() or {}
        return (status.get("nuisance") or {}).get("total", {}).get("by_reason", {})

    def stop(self) -> None:
        self.pm.stop()


def held_sessions(pids: set[int], port: int) -> int:
    """Established connections to `port` held by the server's processes (not the ones still
    waiting in the kernel's accept queue, which no process owns yet)."""
    try:
        return sum(1 for c in psutil.net_connections("tcp4")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
                   and c.pid in pids)
    except psutil.Error:
        return 0


class ProcessTarget:
    """A target whose sessions are counted from its sockets (Postfix, aiosmtpd)."""

    def sample(self) -> dict:
        return {"sessions": held_sessions({p.pid for p in tree(self.pid)}, self.port)}

    def verdicts(self) -> dict:
        return {}


POSTFIX_MAIN = """\
mynetworks = 127.0.0.1/32
relayhost = [127.0.0.1]:{sink}
relay_domains = example.test
relay_recipient_maps = inline:{{ {recipients} }}
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
default_process_limit = 100
"""
POSTSCREEN_MAIN = """\
postscreen_dnsbl_sites = {zone}*2
postscreen_dnsbl_threshold = 2
postscreen_dnsbl_action = enforce
postscreen_greet_action = enforce
postscreen_greet_wait = 2s
"""


class PostfixTarget(ProcessTarget):
    """Postfix from Debian: plain smtpd (process limit 100), or postscreen in front of it with
    the same DNSBL; relays to the same smtp-sink as poolmgr."""

    def __init__(self, scenario: Scenario, work: Path, sink: Sink, dns: DnsServer,
                 postscreen: bool):
        self.name = "postfix-postscreen" if postscreen else "postfix"
        self.port = free_port()
        recipients = ", ".join(f"{r}=ok" for r in scenario.profiles["legit"]["recipients"])
        main = POSTFIX_MAIN.format(sink=sink.port, recipients=recipients).replace("{", "{{") \
            .replace("}", "}}")
        if postscreen:
            main += POSTSCREEN_MAIN.format(zone=DNSBL_ZONE)
            master = (f"127.0.0.1:{self.port} inet n - n - 1 postscreen\n"
                      f"smtpd pass - - n - - smtpd\n"
                      f"dnsblog unix - - n - 0 dnsblog\n"
                      f"tlsproxy unix - - n - 0 tlsproxy\n")
        else:
            master = f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        self.postfix = Postfix(main, master, resolver=dns.host if postscreen else None)

    @property
    def pid(self) -> int:
        return self.postfix.master_pid

    def start(self) -> None:
        self.postfix.start()

    def verdicts(self) -> dict:
        from ..plan import parse_maillog

        sessions = parse_maillog(self.postfix.maillog().splitlines())
        return dict(Counter(s.reason for s in sessions if not s.legit))

    def stop(self) -> None:
        self.postfix.stop()


class AiosmtpdTarget(ProcessTarget):
    """aiosmtpd's stock server and Proxy handler (`benchmark.aiosmtpd_relay`)."""

    name = "aiosmtpd"

    def __init__(self, scenario: Scenario, work: Path, sink: Sink, dns: DnsServer):
        self.port = free_port()
        self.sink = sink
        self.proc: subprocess.Popen | None = None
        self.log = open(work / "aiosmtpd.log", "ab")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poolmgr.benchmark.aiosmtpd_relay", str(self.port),
             str(self.sink.port)],
            stdout=self.log, stderr=self.log)
        wait_until(lambda: _listening(self.port), what="aiosmtpd")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def figures(load: dict, samples: list[dict], baseline: tuple[int, int], cpu: float,
            delivered: int, verdicts: dict) -> dict:
    messages, bots = load["messages"], load["bots"]
    outcomes = Counter(m["outcome"] or "unfinished" for m in messages)
    accepted = [m for m in messages if m["outcome"] == "accepted"]
    latencies = [m["latency"] for m in accepted]
    span = (max(m["t"] + m["latency"] for m in accepted) - min(m["t"] for m in accepted)
            if accepted else 0.0)
    problems = Counter(f"{m['outcome'] or 'unfinished'}: {m['reply'][:40] or '-'}"
                       for m in messages if m["outcome"] != "accepted")
    ended = Counter(b["ended"] or "cancelled" for b in bots)
    shed = [b for b in bots if not b["data"]]
    by_profile: dict[str, list[dict]] = {}
    for bot in bots:
        by_profile.setdefault(bot["profile"], []).append(bot)
    peak_sessions = max((s.get("sessions", 0) for s in samples), default=0)
    peak_open = max((sum(v for k, v in p["open"].items() if k != "legit")
                     for p in load["series"]), default=0)
    peak_rss = max((s["rss"] for s in samples), default=0)
    peak_pss = max((s["pss"] for s in samples), default=0)
    baseline_rss, baseline_pss = baseline
    held = peak_sessions or peak_open
    return {
        "legit_sent": len(messages), "legit_outcomes": dict(outcomes),
        "legit_problems": dict(problems.most_common(8)),
        "legit_accepted_per_s": round(len(accepted) / span, 1) if span > 0 else None,
        "legit_delivered_pct": round(100 * delivered / len(messages), 2) if messages else None,
        "legit_accepted_pct": round(100 * outcomes["accepted"] / len(messages), 2)
        if messages else None,
        "latency_p50_s": percentile(latencies, 0.50),
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_p99_s": percentile(latencies, 0.99),
        "bot_connections": len(bots),
        "bots_shed_before_data_pct": round(100 * len(shed) / len(bots), 2) if bots else None,
        # Idle, slowloris, pregreet and impatient bots never try DATA: the profiles that do
        # (listed, dictionary, reconnector) show whether the defences shed them.
        "bots_shed_before_data_pct_by_profile": {
            profile: round(100 * sum(1 for b in group if not b["data"]) / len(group), 2)
            for profile, group in sorted(by_profile.items())},
        "bots_ended": dict(ended.most_common()),
        "spam_accepted": ended["spam_accepted"],
        "server_verdicts": verdicts,
        "peak_sessions_held": peak_sessions, "peak_client_connections": peak_open,
        "rss_baseline_bytes": baseline_rss, "rss_peak_bytes": peak_rss,
        "rss_per_held_session_bytes": round((peak_rss - baseline_rss) / held) if held else None,
        "pss_baseline_bytes": baseline_pss, "pss_peak_bytes": peak_pss,
        "pss_per_held_session_bytes": round((peak_pss - baseline_pss) / held) if held else None,
        "cpu_seconds": round(cpu, 2),
    }


def plots(out: Path, load: dict, samples: list[dict], title: str) -> list[str]:
    """connections.png and latency.png; returns the file names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    profiles = sorted({k for p in load["series"] for k in p["open"]})
    t = [p["t"] for p in load["series"]]
    for profile in profiles:
        ax.plot(t, [p["open"].get(profile, 0) for p in load["series"]], label=profile)
    ax.set_xlabel("seconds")
    ax.set_ylabel("open client connections")
    if any("smtp_workers" in s for s in samples):
        right = ax.twinx()
        right.step([s["t"] for s in samples], [s.get("smtp_workers", 0) for s in samples],
                   "k--", where="post", label="SMTP workers")
        right.step([s["t"] for s in samples], [s.get("scanner_workers", 0) for s in samples],
                   "k:", where="post", label="scanner workers")
        right.set_ylabel("workers")
        top = max(max(s.get("smtp_workers", 0), s.get("scanner_workers", 0)) for s in samples)
        right.set_ylim(0, top + 1)
        right.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(f"{title}: connections and pool sizes")
    fig.tight_layout()
    fig.savefig(out / "connections.png", dpi=90)
    plt.close(fig)
    names.append("connections.png")
    fig, ax = plt.subplots(figsize=(9, 3.5))
    done = [m for m in load["messages"] if m["latency"] is not None]
    for outcome, marker in (("accepted", "o"), ("deferred", "x"), ("refused", "s"),
                            ("failed", "^")):
        points = [m for m in done if (m["outcome"] or "failed") == outcome]
        if points:
            ax.scatter([m["t"] for m in points], [m["latency"] for m in points], s=10,
                       marker=marker, label=outcome)
    ax.set_xlabel("seconds (message start)")
    ax.set_ylabel("latency, seconds")
    ax.set_title(f"{title}: legitimate latency")
    if done:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=90)
    plt.close(fig)
    names.append("latency.png")
    return names


def report(out: Path, result: dict, images: list[str]) -> None:
    f = result["figures"]
    lines = [f"# poolmgr bench: {result['scenario']['name']} against {result['target']}", "",
             result["scenario"]["description"], "",
             f"Run {time.strftime('%Y-%m-%d %H:%M', time.localtime(result['started']))}, "
             f"{result['duration_s']:.0f}s, {psutil.cpu_count()} cores.", "",
             "| figure | value |", "|---|---|"]
    rows = [("legitimate messages sent", f["legit_sent"]),
            ("legitimate delivered (at the next hop)", f"{f['legit_delivered_pct']}%"),
            ("legitimate outcomes", f["legit_outcomes"]),
            ("legitimate accepted per second", f["legit_accepted_per_s"]),
            ("why not accepted", f["legit_problems"] or "-"),
            ("latency p50 / p95 / p99", f"{f['latency_p50_s']} / {f['latency_p95_s']} / "
                                        f"{f['latency_p99_s']} s"),
            ("bot connections", f["bot_connections"]),
            ("bots shed before DATA", f"{f['bots_shed_before_data_pct']}%"),
            ("how bot connections ended", f["bots_ended"]),
            ("spam accepted", f["spam_accepted"]),
            ("server verdicts", f["server_verdicts"] or "-"),
            ("peak sessions held", f["peak_sessions_held"]),
            ("peak RSS of the server tree", f"{f['rss_peak_bytes'] / 2**20:.1f} MiB"),
            ("RSS per held session", f"{(f['rss_per_held_session_bytes'] or 0) / 1024:.1f} KiB"),
            ("peak PSS of the server tree", f"{f['pss_peak_bytes'] / 2**20:.1f} MiB"),
            ("PSS per held session", f"{(f['pss_per_held_session_bytes'] or 0) / 1024:.1f} KiB"),
            ("CPU seconds (server tree)", f["cpu_seconds"])]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += [""] + [f"![{name}]({name})" for name in images]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def settled(sink: Sink, quiet: float = 3.0, limit: float = 90.0) -> list[bytes]:
    """The next hop's messages once none has arrived for `quiet` seconds (a queueing target
    such as Postfix delivers after it answered 250)."""
    deadline, count, since = time.time() + limit, -1, time.time()
    while time.time() < deadline:
        now = len(list(sink.dir.iterdir()))
        if now != count:
            count, since = now, time.time()
        elif time.time() - since >= quiet:
            break
        time.sleep(0.5)
    return sink.messages()


def run(scenario: Scenario, target_name: str, out: Path) -> dict:
    if target_name not in TARGETS:
        raise SystemExit(f"poolmgr bench: unknown target {target_name!r}; "
                         f"known: {', '.join(TARGETS)}")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"poolmgr-bench-{target_name}-"))
    # Postfix asks the system resolver: the DNS server then listens on port 53 of an address
    # of its own, named in the resolv.conf of Postfix's mount namespace.
    dns = (DnsServer({}, ttl=300, host=RESOLVER, port=53) if target_name.startswith("postfix")
           else DnsServer({}, ttl=300)).start()
    for prefix in loadgen.listed_prefixes(scenario.processes):
        dns.list_network(prefix, DNSBL_ZONE)
    sink = Sink(work).start()
    if target_name == "poolmgr":
        target = PoolmgrTarget(scenario, work, sink, dns)
    elif target_name == "aiosmtpd":
        target = AiosmtpdTarget(scenario, work, sink, dns)
    else:
        target = PostfixTarget(scenario, work, sink, dns, target_name == "postfix-postscreen")
    samples: list[dict] = []
    procs: list[subprocess.Popen] = []
    try:
        target.start()
        time.sleep(1.0)
        baseline_rss, baseline_pss, cpu_before = tree_usage(target.pid)
        t0 = time.time() + 1.0
        for index in range(scenario.processes):
            spec = work / f"load{index}.json"
            spec.write_text(json.dumps({"scenario": scenario.as_dict(), "host": "127.0.0.1",
                                        "port": target.port, "index": index,
                                        "processes": scenario.processes, "t0": t0}))
            procs.append(subprocess.Popen([sys.executable, "-m", "poolmgr.benchmark.load",
                                           str(spec), str(work / f"result{index}.json")]))
        limit = time.time() + scenario.duration + scenario.drain + 60
        while any(p.poll() is None for p in procs) and time.time() < limit:
            rss, pss, cpu = tree_usage(target.pid)
            samples.append({"t": round(time.time() - t0, 2), "rss": rss, "pss": pss,
                            "cpu": round(cpu - cpu_before, 2), **target.sample()})
            time.sleep(SAMPLE_EVERY)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        _, _, cpu = tree_usage(target.pid)
        cpu -= cpu_before
        verdicts = target.verdicts()
        arrived = settled(sink)
    finally:
        target.stop()
        sink.stop()
        dns.stop()
    load = {"series": [], "bots": [], "messages": []}
    for index in range(scenario.processes):
        path = work / f"result{index}.json"
        if path.exists():
            part = json.loads(path.read_text())
            for key in load:
                load[key] += part[key]
    load["series"] = merge_series(load["series"])
    found = {m.group(0).decode() for data in arrived for m in MESSAGE_ID.finditer(data)}
    delivered = sum(1 for m in load["messages"] if m["id"] in found)
    result = {"scenario": scenario.as_dict(), "target": target_name, "started": t0,
              "duration_s": round(time.time() - t0, 1),
              "figures": figures(load, samples, (baseline_rss, baseline_pss), cpu, delivered,
                                 verdicts),
              "server_series": samples, "client_series": load["series"],
              # [start (s from t0), held (s), legitimate]: input of `poolmgr plan --bench`
              "connections": [[b["t"], b.get("held", 0.0), False] for b in load["bots"]] +
                             [[m["t"], m["latency"] or 0.0, True] for m in load["messages"]]}
    images = plots(out, load, samples, f"{scenario.name} / {target_name}")
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    report(out, result, images)
    return result


def merge_series(series: list[dict]) -> list[dict]:
    """Several generator processes' per-second points, summed by whole second."""
    by_second: dict[int, dict] = {}
    for point in series:
        second = int(point["t"])
        merged = by_second.setdefault(second, {"t": second, "open": Counter(),
                                               "legit": Counter()})
        merged["open"].update(point["open"])
        merged["legit"].update(point["legit"])
    return [{"t": p["t"], "open": dict(p["open"]), "legit": dict(p["legit"])}
            for _, p in sorted(by_second.items())]


COMPARE_ROWS = (("legitimate delivered %", "legit_delivered_pct", "{}"),
                ("legitimate accepted / s", "legit_accepted_per_s", "{}"),
                ("latency p50 s", "latency_p50_s", "{}"),
                ("latency p99 s", "latency_p99_s", "{}"),
                ("bots shed before DATA %", "bots_shed_before_data_pct", "{}"),
                ("spam accepted", "spam_accepted", "{}"),
                ("peak sessions held", "peak_sessions_held", "{}"),
                ("peak RSS MiB", "rss_peak_bytes", "{:.1f}"),
                ("RSS per held session KiB", "rss_per_held_session_bytes", "{:.1f}"),
                ("peak PSS MiB", "pss_peak_bytes", "{:.1f}"),
                ("PSS per held session KiB", "pss_per_held_session_bytes", "{:.1f}"),
                ("CPU seconds", "cpu_seconds", "{}"))


def compare(scenario: Scenario, targets: list[str], out: Path) -> dict:
    """The same scenario against each target in turn; one table and one plot side by side."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise SystemExit(f"poolmgr bench: unknown target(s) {', '.join(unknown)}; "
                         f"known: {', '.join(TARGETS)}")
    results = {t: run(scenario, t, out / t) for t in targets}
    table = {t: r["figures"] for t, r in results.items()}

    def cell(figures: dict, key: str, fmt: str) -> str:
        value = figures.get(key)
        if value is None:
            return "-"
        if key in ("rss_peak_bytes", "pss_peak_bytes"):
            value = value / 2**20
        elif key.endswith("_per_held_session_bytes"):
            value = value / 1024
        return fmt.format(value)

    lines = [f"# poolmgr bench compare: {scenario.name}", "", scenario.description, "",
             "| figure | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    lines += [f"| {label} | " + " | ".join(cell(table[t], key, fmt) for t in targets) + " |"
              for label, key, fmt in COMPARE_ROWS]
    image = compare_plot(out, scenario.name, table, targets)
    lines += ["", f"![{image}]({image})", ""]
    lines += [f"Each target's report: [{t}]({t}/report.md)" for t in targets]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps(table, indent=1) + "\n")
    return table


def compare_plot(out: Path, name: str, table: dict, targets: list[str]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("legit_delivered_pct", "legitimate delivered %"), ("latency_p99_s", "p99 s"),
            ("peak_sessions_held", "peak sessions"), ("rss_per_held_session_bytes",
                                                      "RSS / session, bytes"),
            ("cpu_seconds", "CPU s")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.6))
    for ax, (key, label) in zip(axes, keys):
        values = [table[t].get(key) or 0 for t in targets]
        ax.bar(range(len(targets)), values, color=[f"C{i}" for i in range(len(targets))])
        ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"{name}: side by side")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=90)
    plt.close(fig)
    return "compare.png"
