"""The bench's targets: the servers a run measures, each started beside the same peers.

Every target relays to the same `smtp-sink` next hop, so that the next hop costs the same for
all, and checks the same recipients; a DNS server on a loopback address serves the DNSBL zone.
Targets: `poolmgr` (both pools; with `[server] nodes = N`, N poolmgr nodes sharing one
private Redis, whose `addresses` the load generator takes in turn; `cluster`: [cluster] on
that Redis even for one node), `postfix` (Debian's
Postfix, plain smtpd), `postfix-postscreen`
(postscreen in front of it) and `aiosmtpd` (its stock server and `Proxy` handler). In a
content-filter comparison (`content_filter` of `started`: a pool size and a clamd or none),
`poolmgr` is its scanner pool alone (scanner-only, fixed at that size, fed as by Postfix's
`scan` transport of that maxproc) and `amavisd` is Debian's amavisd-new with as many
`$max_servers`, each asking the same clamd or bypassing virus and spam checks. Each
target's whole process tree is measured the same way (`tree_usage`: RSS, PSS, CPU seconds;
`children_pss`: each worker's PSS).

A target answers `sample()` each `sample_every` (sessions held; poolmgr: its pools, storm phase,
stress mode, the pool rules each sample breaks, and each SMTP worker's start and sessions, from
which the bench finds the first new worker accepting), and at the end `verdicts()` (why
sessions were shed), `decisions` (poolmgr's autoscaler decisions seen, with their times) and
`counters()` (poolmgr: hand-offs to the scanner pool, messages scanned, and from its log the
sessions that failed after CONNECT and the anvil's `no answer` fallbacks). `ports` are its
listening SMTP ports (their accept queue is sampled too). A scenario's `[config]` settings
reach poolmgr's config; the peers take its listen backlog.
"""

__all__ = ["started", "check_target", "settled", "tree_usage", "tree", "rule_breaks",
           "children_pss", "TARGETS", "MTAS", "CONTENT_FILTERS", "DNSBL_ZONE", "log_problems",
           "LOG_PROBLEMS"]

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

from .. import config
from ..autoscale import Snapshot, check_rules
from ..status import Decision, Status
from ..testing import (Amavisd, Dnsmasq, Poolmgr, Postfix, RedisServer, Sink, free_port,
                       listening, wait_until)

# The targets in the MTA's place (every kind of scenario but content-filter), and those in
# the place of Postfix's content_filter (poolmgr: its scanner pool alone)
MTAS = ("poolmgr", "postfix", "postfix-postscreen", "aiosmtpd")
CONTENT_FILTERS = ("poolmgr", "amavisd")
TARGETS = (*MTAS, "amavisd")
DNSBL_ZONE = "zen.bench.test"
RESOLVER = "127.53.53.53"


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_usage(*pids: int) -> tuple[int, int, float]:
    """(RSS bytes, PSS bytes, CPU seconds) of processes and their descendants. RSS counts the
    pages forked processes share once per process; PSS divides them among the sharers."""
    rss, pss, cpu = 0, 0, 0.0
    for proc in (p for pid in pids for p in tree(pid)):
        try:
            memory = proc.memory_full_info()
            rss += memory.rss
            pss += getattr(memory, "pss", memory.rss)
            times = proc.cpu_times()
            cpu += times.user + times.system + times.children_user + times.children_system
        except psutil.Error:
            pass
    return rss, pss, cpu


def children_pss(pid: int) -> list[int]:
    """The PSS bytes of each child of a process (a pre-forking server's workers)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    sizes = []
    for child in children:
        try:
            sizes.append(child.memory_full_info().pss)
        except psutil.Error:
            pass
    return sizes


class PoolmgrTarget:
    """poolmgr, both pools, with the greet test, DNSBL scoring and recipient validation; with
    `nodes` above 1, that many poolmgr nodes sharing one private Redis (`[cluster]`)."""

    name = "poolmgr"

    def __init__(self, s: dict, recipients: list[str], work: Path, sink: Sink,
                 dns: Dnsmasq, cluster: bool = False, settings: dict | None = None):
        self.stress = s["stress"]
        self.rules = None
        self.decisions: list[Decision] = []
        self.redis = RedisServer(work).start() if s["nodes"] > 1 or cluster else None
        sections = {
            "smtp": {"min_workers": s["smtp_workers"],
                     "max_workers": max(s["smtp_workers"], s["smtp_max_workers"]),
                     "max_sessions_per_worker": s["max_sessions_per_worker"]},
            "scanner": {"min_workers": s["scanner_workers"],
                        "max_workers": max(s["scanner_workers"], s["scanner_max_workers"]),
                        "next_hop": f"smtp:127.0.0.1:{sink.port}", "max_requests": 1_000_000},
            # 127.0.0.1 skips the tests as Postfix's mynetworks does in the Postfix targets
            # (postscreen's access list permits it): smtp-source's client, never a bot's.
            "defence": {"allowlist": ["127.0.0.1/32"], "greet_wait": "2s", "dnsbl_sites": [f"{DNSBL_ZONE}*2"],
                        "dnsbl_threshold": 2, "nameservers": [dns.address],
                        "recipients": str(self._recipients(work, recipients))},
        }
        for section, values in (settings or {}).items():  # the scenario's [config]
            sections[section] = {**sections.get(section, {}), **values}
        self.pms = []
        for n in range(s["nodes"]):
            cluster = {"cluster": {"redis": self.redis.url, "node": f"mx{n + 1}"}} \
                if self.redis else {}
            self.pms.append(Poolmgr(work / ("poolmgr" if n == 0 else f"poolmgr{n + 1}"),
                                    {**sections, **cluster}))
        self.pm = self.pms[0]

    @staticmethod
    def _recipients(work: Path, recipients: list[str]) -> Path:
        path = work / "recipients"
        path.write_text("".join(f"{r}\n" for r in recipients) + "postmaster@example.test\n")
        return path

    @property
    def port(self) -> int:
        return self.pm.smtp_port

    @property
    def pid(self) -> int:
        return self.pm.proc.pid

    @property
    def pids(self) -> list[int]:
        return [pm.proc.pid for pm in self.pms]

    @property
    def addresses(self) -> list[list]:
        return [["127.0.0.1", pm.smtp_port] for pm in self.pms]

    @property
    def ports(self) -> list[int]:
        return [pm.smtp_port for pm in self.pms]

    def start(self) -> None:
        for pm in self.pms:
            pm.start()
            if self.stress:
                pm.run_cli("ctl", "stress", "on", check=True)
        self.rules = config.load(str(self.pm.config)).autoscale

    def statuses(self) -> list[Status]:
        found = [pm.try_status() for pm in self.pms]
        return [Status.from_json(data) for data in found if data]

    def status(self) -> Status | None:
        data = self.pm.try_status()
        return Status.from_json(data) if data else None

    def sample(self) -> dict:
        """Sessions and workers over every node; the first node's storm phase."""
        statuses = self.statuses()
        if not statuses:
            return {}
        # The master keeps its last 20 decisions: gather them as they come.
        self.decisions += [d for st in statuses for d in st.autoscale.decisions
                           if d not in self.decisions]

        def total(pool: str, field: str) -> int:
            return sum(getattr(st.pools[pool], field) for st in statuses)

        now = time.time()
        return {"sessions": total("smtp", "sessions"), "smtp_workers": total("smtp", "workers"),
                # pid: [started (wall clock), sessions held] of each running SMTP worker
                "smtp_worker_sessions": {str(w.pid): [round(now - w.age, 2), w.sessions]
                                         for st in statuses
                                         for w in st.pools["smtp"].worker_list
                                         if w.state == "running"},
                "smtp_draining": total("smtp", "draining"), "smtp_floor": total("smtp", "floor"),
                "scanner_workers": total("scanner", "workers"),
                "phase": statuses[0].autoscale.phase,
                "stress": any(st.stress.on for st in statuses),
                "rule_breaks": [b for st in statuses for b in rule_breaks(st, self.rules)]}

    def verdicts(self) -> dict:
        return dict(sum((Counter(st.nuisance.total.by_reason) for st in self.statuses()),
                        Counter()))

    def counters(self) -> dict:
        totals = Counter()
        for st in self.statuses():
            smtp, scanner = st.pools["smtp"].counters, st.pools["scanner"].counters
            totals.update({"handoffs_to_scanner": smtp.get("handoffs", 0),
                           "handoff_wait_ms": smtp.get("handoff_wait_ms", 0),
                           "scanned": scanner.get("scanned", 0),
                           "messages_accepted": smtp.get("messages_accepted", 0),
                           "messages_deferred": smtp.get("messages_tempfailed", 0),
                           "messages_rejected": smtp.get("messages_rejected", 0),
                           # the pools' sizes now (after a source run: what the autoscaler
                           # grew them to)
                           "smtp_workers": st.pools["smtp"].workers,
                           "scanner_workers": st.pools["scanner"].workers})
            if "anvil_fallbacks" in smtp:  # counted by the workers since the anvil's batching
                totals["anvil_fallbacks_counted"] += smtp["anvil_fallbacks"]
        handoffs, wait_ms = totals["handoffs_to_scanner"], totals.pop("handoff_wait_ms")
        # SMTP worker to next hop through the scanner: what a scanner worker is busy for
        totals["handoff_mean_s"] = round(wait_ms / 1000 / handoffs, 4) if handoffs else None
        return {**totals, **self.log_counts()}

    def log_counts(self) -> dict:
        """What poolmgr's logs say went wrong in sessions (`log_problems`), over every node."""
        counts = Counter()
        for pm in self.pms:
            try:
                counts.update(log_problems(pm.log_path))
            except OSError:
                pass
        return {key: counts[key] for key in LOG_PROBLEMS}

    def stop(self) -> None:
        for pm in self.pms:
            pm.stop()
        if self.redis is not None:
            self.redis.stop()


class ScannerOnlyTarget(PoolmgrTarget):
    """poolmgr's scanner pool alone (`[smtp] listen = []`), in amavisd's place behind Postfix:
    `workers` scanner workers, fixed (autoscaler off), capped by `feeder_maxproc` as by the
    maxproc of Postfix's `scan` transport; checks `builtin`, and `clamd` when given."""

    def __init__(self, workers: int, sink: Sink, clamd, work: Path):
        self.stress = False
        self.rules = None
        self.decisions = []
        self.redis = None
        scanner = {"min_workers": workers, "max_workers": workers, "feeder_maxproc": workers,
                   "checks": ["builtin", "clamd"] if clamd else ["builtin"],
                   "next_hop": f"smtp:127.0.0.1:{sink.port}", "quarantine": "",
                   "max_requests": 1_000_000}
        if clamd:
            scanner["clamd"] = {"address": clamd.address}
        self.pm = Poolmgr(work / "poolmgr", {"smtp": {"listen": []}, "scanner": scanner,
                                             "autoscale": {"enabled": False}})
        self.pms = [self.pm]

    @property
    def port(self) -> int:
        return self.pm.scanner_port

    @property
    def addresses(self) -> list[list]:
        return [["127.0.0.1", self.pm.scanner_port]]

    def counters(self) -> dict:
        """Messages scanned, and how many times each check ran."""
        status = self.status()
        found = status.pools["scanner"].counters if status else {}
        return {"scanned": found.get("scanned", 0),
                **{k: v for k, v in found.items() if k.startswith("check_") and
                   k.endswith("_count")}}


# The log lines a large storm's figures count (poolmgr's shapes, as Postfix words them):
# sessions that ended in an exception, and the SMTP workers' requests the master's anvil did not
# answer in time (a connection not limited; since the anvil's batching one line per episode,
# the episodes' requests counted in status: anvil_fallbacks_counted).
LOG_PROBLEMS = {
    "failed_after_connect": re.compile(rb"error: session with .* failed after CONNECT"),
    "sessions_failed": re.compile(rb"error: session with .* failed after "),
    "anvil_no_answer": re.compile(rb"warning: anvil: no answer from the master"),
    "log_lines_dropped": re.compile(rb"warning: (\d+) log lines dropped"),
}


def log_problems(path: Path) -> Counter:
    """`LOG_PROBLEMS` counted in one log file (dropped lines: their sum)."""
    counts = Counter()
    with open(path, "rb") as handle:
        for line in handle:
            if b"error: " not in line and b"warning: " not in line:
                continue
            for key, pattern in LOG_PROBLEMS.items():
                found = pattern.search(line)
                if found:
                    counts[key] += int(found[1]) if pattern.groups else 1
    return counts


def held_sessions(pids: set[int], port: int) -> int:
    """Established connections to `port` held by the server's processes (not the ones still
    waiting in the kernel's accept queue, which no process owns yet)."""
    try:
        return sum(1 for c in psutil.net_connections("tcp4")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
                   and c.pid in pids)
    except psutil.Error:
        return 0


def rule_breaks(status: Status, rules) -> list[str]:
    """The pool rules a status breaks: the autoscaler's rules on the targets
    (`autoscale.check_rules`, through the one sizing rule), running workers above a ceiling,
    scanner workers above SMTP workers."""
    smtp, scanner = status.pools["smtp"], status.pools["scanner"]
    snap = Snapshot(now=0.0, smtp=smtp.target, scanner=scanner.target,
                    smtp_floor=smtp.floor, smtp_ceiling=smtp.ceiling,
                    scanner_floor=scanner.floor, scanner_ceiling=scanner.ceiling)
    broken = check_rules(snap, smtp.target, scanner.target, status.autoscale.phase, rules)
    for name, pool in (("smtp", smtp), ("scanner", scanner)):
        if pool.workers > pool.ceiling:
            broken.append(f"{name} workers {pool.workers} above the ceiling")
    if scanner.workers > smtp.workers + smtp.draining:
        broken.append(f"scanner workers {scanner.workers} > smtp {smtp.workers}")
    return broken


class ProcessTarget:
    """A target whose sessions are counted from its sockets (Postfix, aiosmtpd)."""

    decisions: tuple = ()  # no autoscaler

    @property
    def pids(self) -> list[int]:
        return [self.pid]

    @property
    def addresses(self) -> list[list]:
        return [["127.0.0.1", self.port]]

    @property
    def ports(self) -> list[int]:
        return [self.port]

    def sample(self) -> dict:
        return {"sessions": held_sessions({p.pid for p in tree(self.pid)}, self.port)}

    def verdicts(self) -> dict:
        return {}

    def counters(self) -> dict:
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

    def __init__(self, recipients: list[str], sink: Sink, dns: Dnsmasq, postscreen: bool):
        self.name = "postfix-postscreen" if postscreen else "postfix"
        self.port = free_port()
        valid = ", ".join(f"{r}=ok" for r in recipients)
        main = POSTFIX_MAIN.format(sink=sink.port, recipients=valid).replace("{", "{{") \
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

    def __init__(self, work: Path, sink: Sink, backlog: int = 1024):
        self.port = free_port()
        self.sink = sink
        self.backlog = backlog
        self.sockets_at_rest = 0
        self.proc: subprocess.Popen | None = None
        self.log = open(work / "aiosmtpd.log", "ab")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poolmgr.benchmark.aiosmtpd_relay", str(self.port),
             str(self.sink.port), str(self.backlog)],
            stdout=self.log, stderr=self.log)
        wait_until(lambda: listening(self.port), what="aiosmtpd")
        self.sockets_at_rest = socket_count(self.proc.pid)

    def sample(self) -> dict:
        """Sessions held: the sockets it holds beyond those it had at rest. One process: its
        file descriptors say it without parsing the machine's socket table, which at 100,000
        connections takes longer than a second."""
        return {"sessions": max(0, socket_count(self.proc.pid) - self.sockets_at_rest)}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class AmavisdTarget(ProcessTarget):
    """Debian's amavisd-new (`testing.Amavisd`): `workers` children ($max_servers), relaying
    to the same smtp-sink; virus checks by the same clamd, or bypassed, spam checks bypassed."""

    name = "amavisd"

    def __init__(self, workers: int, sink: Sink, clamd):
        self.amavisd = Amavisd(sink.port, workers, str(clamd.socket) if clamd else None)
        self.port = self.amavisd.port

    @property
    def pid(self) -> int:
        return self.amavisd.pid

    def start(self) -> None:
        self.amavisd.start()

    def stop(self) -> None:
        self.amavisd.stop()


def check_target(name: str, content_filter: bool) -> None:
    """SystemExit unless `name` is a target of a content-filter scenario (`content_filter`)
    or of the other kinds."""
    if name not in TARGETS:
        raise SystemExit(f"poolmgr bench: unknown target {name!r}; known: {', '.join(TARGETS)}")
    if content_filter and name not in CONTENT_FILTERS:
        raise SystemExit(f"poolmgr bench: {name} is not a content filter: the targets of a "
                         f"content-filter scenario are {', '.join(CONTENT_FILTERS)}")
    if name == "amavisd" and not content_filter:
        raise SystemExit("poolmgr bench: amavisd is a content filter, not an MTA: compare it "
                         "in a content-filter scenario (bench/scenarios/content_filter.toml)")


def socket_count(pid: int) -> int:
    """The sockets among a process's open files."""
    count = 0
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                count += os.readlink(fd.path).startswith("socket:")
            except OSError:
                pass
    except OSError:
        pass
    return count


@contextmanager
def started(target_name: str, server: dict, recipients: list[str],
            listed: list[str] = (), cluster: bool = False, content_filter: dict | None = None,
            settings: dict | None = None) -> Iterator[tuple[object, Sink, Dnsmasq, Path]]:
    """A target running with its peers: (target, sink, dns, work directory); all stopped and
    the directory removed at the end (kept, and named, when the run failed). `server` sizes
    it (scenario.SERVER_DEFAULTS), `recipients` are the valid ones, `listed` address
    prefixes are in the DNSBL zone; `cluster`: poolmgr has [cluster] on a
    private Redis even as one node (the soak); `content_filter` ({"workers": N, "clamd":
    a running testing.Clamd or None}): one of CONTENT_FILTERS in Postfix's content_filter
    place, N workers, `server` unused; `settings`: further poolmgr settings by section (a
    scenario's [config]), whose smtp.listen_backlog aiosmtpd takes too."""
    check_target(target_name, bool(content_filter))
    work = Path(tempfile.mkdtemp(prefix=f"poolmgr-bench-{target_name}-"))
    # Postfix asks the system resolver: the DNS server then listens on port 53 of an address
    # of its own, named in the resolv.conf of Postfix's mount namespace. dnsmasq answers a
    # flood's thousands of queries a second (a Python server answered a tenth of them).
    dns = (Dnsmasq(DNSBL_ZONE, ttl=300, host=RESOLVER, port=53)
           if target_name.startswith("postfix") else Dnsmasq(DNSBL_ZONE, ttl=300))
    for prefix in listed:
        dns.list_network(prefix, DNSBL_ZONE)
    dns.start()
    sink = target = None
    done = False
    try:
        sink = Sink(work).start()
        if content_filter and target_name == "poolmgr":
            target = ScannerOnlyTarget(content_filter["workers"], sink, content_filter["clamd"],
                                       work)
        elif content_filter:
            target = AmavisdTarget(content_filter["workers"], sink, content_filter["clamd"])
        elif target_name == "poolmgr":
            target = PoolmgrTarget(server, recipients, work, sink, dns, cluster, settings)
        elif target_name == "aiosmtpd":
            backlog = (settings or {}).get("smtp", {}).get("listen_backlog", 1024)
            target = AiosmtpdTarget(work, sink, backlog)
        else:
            target = PostfixTarget(recipients, sink, dns, target_name == "postfix-postscreen")
        target.start()
        yield target, sink, dns, work
        done = True
    finally:
        if target is not None:
            target.stop()
        if sink is not None:
            sink.stop()
        dns.stop()
        if done:  # a flood's log alone is tens of MB; a failed run's is kept
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"poolmgr bench: the run's files (the target's log) are in {work}",
                  file=sys.stderr)


def settled(sink: Sink, quiet: float = 3.0, limit: float = 90.0,
            expect: int | None = None) -> list[bytes]:
    """The next hop's messages once `expect` of them have arrived, or none has for `quiet`
    seconds (a queueing target such as Postfix delivers after it answered 250)."""
    deadline, count, since = time.time() + limit, -1, time.time()
    while time.time() < deadline:
        now = len(list(sink.dir.iterdir()))
        if expect is not None and now >= expect:
            break
        if now != count:
            count, since = now, time.time()
        elif time.time() - since >= quiet:
            break
        time.sleep(0.5)
    return sink.messages()
