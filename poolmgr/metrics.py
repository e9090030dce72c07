"""The Prometheus metrics endpoint (`[metrics] listen`), served by prometheus_client.

prometheus_client's HTTP server runs in a daemon thread of the master. The master's loop
publishes a copy of its status once a second (`StatusCollector.publish`); the collector reads
only that latest copy, so the HTTP thread never touches the master's live state. Workers close
the endpoint's socket right after fork.

Metrics (prefix `poolmgr_`): pool sizes (`pool_workers`, `pool_target`, `pool_floor`,
`pool_ceiling`, `pool_draining`), `pool_rss_bytes`, `worker_rss_bytes{pool,slot}` (never by
pid: series must outlive a worker), `smtp_sessions`, `smtp_slots`, `smtp_accept_queue`,
`scanner_busy`, `sessions_total{verdict}` (legit or a nuisance reason), `health_checks_total`
(a load balancer's own sessions, counted in neither),
`messages_total{outcome}`, `connections_total{pool}`, `handoffs_total`,
`handoff_wait_seconds_total`, `handoff_queue_seconds_total`, the histograms `handoff_seconds`, `scan_seconds` and
`check_seconds{check}`, `check_failures_total{check}`, `scanner_verdicts_total{kind}`,
`nuisance_ratio`, `storm`, `stress`, `autoscale_decisions_total`,
`log_dropped_total{process}` (master, smtp, scanner), `anvil_fallbacks_total` (requests to
the master's anvil not answered in time, so not limited), `build_info{version}`; with
`[cluster] redis` or `sentinels`: `cluster_up` (1 while the nodes share Redis, 0 while
degraded), `cluster_nodes`, `cluster_roundtrip_seconds` (the master's last round trip), the
histogram `cluster_store_seconds` (the SMTP workers' Redis calls), `cluster_failures_total`,
`cluster_local_total` (questions answered from local state); `dnsbl_errors_total{site}` (DNSBL
answers that were error codes, per configured site); and the master's own
`process_*` metrics.
"""

__all__ = ["StatusCollector", "start", "serve", "stop"]

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import ProcessCollector, make_wsgi_app
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily,
                                     GaugeMetricFamily, HistogramMetricFamily)

from .board import LATENCY_BUCKETS
from .config import format_address
from .status import Status


class StatusCollector:
    def __init__(self):
        self.status: Status | None = None
        self.decisions = 0

    def publish(self, status: Status, decisions: int) -> None:
        self.status, self.decisions = status, decisions  # replaced whole: readers see one copy

    def collect(self):
        status, decisions = self.status, self.decisions
        if status is None:
            return
        pools = status.pools
        per_pool = {name: GaugeMetricFamily(f"poolmgr_pool_{name}", help_text, labels=["pool"])
                    for name, help_text in (
                        ("workers", "Running workers of the pool"),
                        ("target", "Workers the master converges to"),
                        ("floor", "The pool's floor (min_workers and manual resizes)"),
                        ("ceiling", "The pool's ceiling (max_workers)"),
                        ("draining", "Workers finishing their sessions before they exit"),
                        ("rss_bytes", "Resident memory of the pool's workers"))}
        # By pool and slot (the worker's number), never by pid: a pid label would start a new
        # series for every replacement worker and leave the old ones behind.
        worker_rss = GaugeMetricFamily("poolmgr_worker_rss_bytes", "Resident memory per worker",
                                       labels=["pool", "slot"])
        connections = CounterMetricFamily("poolmgr_connections", "Connections accepted (a load "
                                          "balancer's health checks left out)", labels=["pool"])
        for kind, pool in pools.items():
            for name, family in per_pool.items():
                family.add_metric([kind], getattr(pool, "rss" if name == "rss_bytes" else name))
            for worker in pool.worker_list:
                if worker.state == "running":  # a draining worker shares its slot number
                    worker_rss.add_metric([kind, str(worker.number)], worker.rss)
            connections.add_metric([kind], pool.counters.get("connections", 0))
        yield from per_pool.values()
        yield worker_rss
        yield connections
        smtp = pools["smtp"]
        counters = smtp.counters
        for name, help_text, value in (
                ("smtp_sessions", "Live SMTP sessions", smtp.sessions),
                ("smtp_slots", "SMTP session slots of the running workers", smtp.slots),
                ("smtp_accept_queue", "Connections waiting in the SMTP accept queue",
                 status.autoscale.backlog),
                ("scanner_busy", "Scanner workers busy with a message", pools["scanner"].busy),
                ("nuisance_ratio", "Nuisance share of closed sessions over the window",
                 status.nuisance.ratio),
                ("storm", "1 while the autoscaler is in a storm", int(status.storm.active)),
                ("stress", "1 while stress mode is on", int(status.stress.on))):
            yield GaugeMetricFamily(f"poolmgr_{name}", help_text, value=value)
        sessions = CounterMetricFamily("poolmgr_sessions", "Closed SMTP sessions by verdict",
                                       labels=["verdict"])
        sessions.add_metric(["legit"], counters.get("legit", 0))
        for key, value in counters.items():
            if key.startswith("nuisance_"):
                sessions.add_metric([key.removeprefix("nuisance_")], value)
        yield sessions
        messages = CounterMetricFamily("poolmgr_messages", "Messages by outcome after DATA",
                                       labels=["outcome"])
        for outcome in ("accepted", "rejected", "tempfailed"):
            messages.add_metric([outcome], counters.get(f"messages_{outcome}", 0))
        yield messages
        yield CounterMetricFamily("poolmgr_handoffs", "Hand-offs to the proxy filter",
                                  value=counters.get("handoffs", 0))
        yield CounterMetricFamily("poolmgr_handoff_wait_seconds",
                                  "Time spent in hand-offs",
                                  value=counters.get("handoff_wait_ms", 0) / 1000)
        yield CounterMetricFamily("poolmgr_handoff_queue_seconds",
                                  "Time hand-offs spent waiting for a scanner worker",
                                  value=counters.get("handoff_queue_us", 0) / 1e6)
        yield CounterMetricFamily("poolmgr_autoscale_decisions", "Decisions the autoscaler took",
                                  value=decisions)
        yield _histogram("poolmgr_handoff_seconds", "Hand-off to the proxy filter, per message",
                         counters, "handoff", counters.get("handoffs", 0),
                         counters.get("handoff_wait_ms", 0) / 1000)
        scanned = pools["scanner"].counters
        yield _histogram("poolmgr_scan_seconds", "Scanner time per message (checks and "
                         "re-injection)", scanned, "scan", scanned.get("scanned", 0),
                         scanned.get("scan_ms", 0) / 1000)
        dropped = CounterMetricFamily("poolmgr_log_dropped", "Log lines dropped because the "
                                      "log could not take them", labels=["process"])
        dropped.add_metric(["master"], status.master.log_dropped)
        for kind, pool in pools.items():
            dropped.add_metric([kind], pool.counters.get("log_dropped", 0))
        yield dropped
        yield CounterMetricFamily("poolmgr_anvil_fallbacks", "Requests to the master's anvil "
                                  "not answered in time (those clients were not limited)",
                                  value=status.anvil.fallbacks)
        yield CounterMetricFamily("poolmgr_health_checks", "Sessions of a load balancer's own "
                                  "(PROXY LOCAL): neither legit nor nuisance",
                                  value=status.nuisance.total.health_checks)
        build = GaugeMetricFamily("poolmgr_build_info", "poolmgr's version", labels=["version"])
        build.add_metric([status.version], 1)
        yield build
        yield from _scanner(status)
        yield from _cluster(status)
        yield _dnsbl_errors(status)


def _dnsbl_errors(status: Status) -> CounterMetricFamily:
    """Error answers per configured DNSBL site (status.DnsblStatus)."""
    errors = CounterMetricFamily("poolmgr_dnsbl_errors", "DNSBL answers that were error codes "
                                 "(127.255.255.x, or outside 127/8), ignored", labels=["site"])
    for site, count in status.dnsbl.by_site.items():
        errors.add_metric([site], count)
    return errors


def _cluster(status: Status):
    """Cluster health and store latency, when [cluster] redis or sentinels is set."""
    cluster, counters = status.cluster, status.pools["smtp"].counters
    if cluster.state == "off":
        return
    for name, help_text, value in (
            ("cluster_up", "1 while this node shares its client state in Redis, 0 while it "
             "uses local state", int(cluster.state == "shared")),
            ("cluster_nodes", "Nodes seen in Redis recently", len(cluster.nodes)),
            ("cluster_roundtrip_seconds", "The master's last round trip to Redis",
             cluster.latency)):
        yield GaugeMetricFamily(f"poolmgr_{name}", help_text, value=value)
    yield _histogram("poolmgr_cluster_store_seconds", "SMTP workers' Redis calls",
                     counters, "cluster", counters.get("cluster_calls", 0),
                     counters.get("cluster_us", 0) / 1e6)
    yield CounterMetricFamily("poolmgr_cluster_failures", "Redis calls that failed or timed out",
                              value=counters.get("cluster_failures", 0))
    yield CounterMetricFamily("poolmgr_cluster_local", "Questions answered from local state "
                              "because Redis was unavailable",
                              value=counters.get("cluster_local", 0))


def _histogram(name: str, help_text: str, counters: dict, prefix: str, count: int,
               total: float) -> HistogramMetricFamily:
    """A histogram from a pool's bucket counters (board.Slot.observe)."""
    cumulative, buckets = 0, []
    for index, bound in enumerate(LATENCY_BUCKETS):
        cumulative += counters.get(f"{prefix}_le_{index}", 0)
        buckets.append((f"{bound:g}", cumulative))
    buckets.append(("+Inf", count))
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=total)


def _scanner(status: Status):
    """The scanner's verdicts by kind, and per check back-end a latency histogram and its
    failures."""
    verdicts = CounterMetricFamily("poolmgr_scanner_verdicts", "Scanner verdicts by kind",
                                   labels=["kind"])
    for kind, count in status.scanner.verdicts.items():
        verdicts.add_metric([kind], count)
    yield verdicts
    seconds = HistogramMetricFamily("poolmgr_check_seconds",
                                    "Time one check back-end took per message",
                                    labels=["check"])
    failures = CounterMetricFamily("poolmgr_check_failures",
                                   "Messages a check back-end could not answer",
                                   labels=["check"])
    for name, check in status.scanner.checks.items():
        cumulative, buckets = 0, []
        for bound, count in zip(LATENCY_BUCKETS, check.buckets):
            cumulative += count
            buckets.append((f"{bound:g}", cumulative))
        buckets.append(("+Inf", check.runs))
        seconds.add_metric([name], buckets, check.seconds)
        failures.add_metric([name], check.failed)
    yield seconds
    yield failures


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not keep the master alive


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes are not for the mail log
        pass


def start(address: tuple[str, int], collector: StatusCollector) -> WSGIServer:
    """Serve /metrics from a daemon thread; returns the HTTP server (its socket is closed in
    workers, and by `stop`). What prometheus_client's start_http_server does, with the server
    in hand: Debian 12's prometheus_client (0.16) returns None from that one."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)  # the master's own process_* metrics
    family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (_Server,), {"address_family": family})
    server = make_server(address[0], address[1], make_wsgi_app(registry), server_class,
                         _QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def serve(address: tuple[str, int], collector: StatusCollector, log):
    """`start`, for the master: a port it cannot bind is fatal (SystemExit)."""
    try:
        server = start(address, collector)
    except OSError as exc:
        raise SystemExit(f"fatal: metrics endpoint {format_address(address)}: "
                         f"{exc.strerror}") from None
    log.info("metrics endpoint on http://%s/metrics", format_address(address))
    return server


def stop(server) -> None:
    """Close the endpoint (a USR2 upgrade: the new master binds its port)."""
    server.shutdown()
    server.server_close()
