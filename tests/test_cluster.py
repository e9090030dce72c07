"""Several MX nodes sharing client state in one Redis (`[cluster]`, cluster.py).

Real redis-server processes (Debian's, a private config on a loopback port and a Unix socket),
real poolmgr nodes, raw and smtplib clients from distinct 127.x.y.z addresses, and the
project's DNS server, which counts the queries it is asked. The failover test runs a master,
a replica and three sentinels (redis-server --sentinel, as Debian's redis-sentinel).
"""

import os
import re
import signal
import socket
import threading
import time
from types import SimpleNamespace

import psutil
import pytest

from helpers import Raw, message, wait_until
from poolmgr.cluster import Gate, connect
from poolmgr.status import ClusterStatus
from poolmgr.testing import (DnsServer, Poolmgr, RedisServer, SentinelGroup, WaitTimeout,
                             free_port)

HOST = "mx.example.test"
TTL = "2s"  # cluster.heartbeat_ttl in these tests


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer().start()
    yield server
    server.stop()


# Sentinel deployments put passwords on the master and on the sentinels: the tests' do too.
PASSWORDS = {"password": "master-secret", "sentinel_password": "sentinel-secret"}


@pytest.fixture
def sentinels():
    """A master, its replica and three sentinels (quorum 2, down after 1 s), each with a
    password (PASSWORDS)."""
    group = SentinelGroup(**PASSWORDS).start()
    yield group
    group.stop()


def node(make_poolmgr, redis_url: str | list[str], name: str, passwords=PASSWORDS,
         **defence):
    """A node on the Redis at `redis_url`, or on the master the sentinels listed name (with
    `passwords`)."""
    where = {"sentinels": redis_url, "sentinel_master": "poolmgr", **passwords} \
        if isinstance(redis_url, list) else {"redis": redis_url}
    return make_poolmgr({"smtp": {"min_workers": 1, "max_workers": 2},
                         "scanner": {"min_workers": 1, "max_workers": 2},
                         "cluster": {**where, "node": name, "heartbeat_ttl": TTL},
                         "defence": {"client_connection_count_limit": 3, **defence}},
                        name=name)


def banner(pm, source):
    raw = Raw(pm.smtp_port, source)
    return raw, raw.reply()


def refused(lines, client):
    return lines == [f"421 4.7.0 {HOST} Error: too many connections from {client}"]


def one_more_refused(pm, client) -> bool:
    """Whether one more connection from `client` is refused (it is closed either way)."""
    raw, (code, lines) = banner(pm, client)
    raw.close()
    return refused(lines, client)


def cluster(pm) -> dict:
    return pm.status()["cluster"]


def test_two_nodes_enforce_one_connection_count_limit(make_poolmgr, redis_server):
    # One node over TCP, the other over Redis's Unix socket.
    a = node(make_poolmgr, redis_server.url, "mx-a")
    b = node(make_poolmgr, redis_server.unix_url, "mx-b")
    client = "127.0.16.1"
    held = [banner(a, client), banner(a, client), banner(b, client)]
    assert [reply[0] for _, reply in held] == [220, 220, 220]
    for pm in (a, b):  # a fourth connection, on either node
        raw, (code, lines) = banner(pm, client)
        assert refused(lines, client), (pm.dir.name, lines)
        assert raw.closed()
    assert banner(b, "127.0.16.2")[1][0] == 220  # another client is not affected
    wait_until(lambda: cluster(a)["nodes"] == ["mx-a", "mx-b"] and
               cluster(a)["top_clients"].get(client) == 3, what="both nodes and the count")
    text = a.run_cli("status").stdout
    assert "cluster: shared (redis redis://127.0.0.1:" in text and "nodes mx-a, mx-b" in text
    assert f"top clients {client} 3" in text
    held[2][0].send(b"QUIT\r\n")  # one ends on node B: node A takes a new one
    held[2][0].reply()
    wait_until(lambda: cluster(a)["top_clients"].get(client) == 2, what="the QUIT counted")
    assert banner(a, client)[1][0] == 220
    assert "warning: Connection concurrency limit exceeded: 4 from unknown[127.0.16.1]" \
        in a.log()


def test_greet_pass_and_dnsbl_answer_are_shared(make_poolmgr, redis_server):
    dns = DnsServer({}).start()
    try:
        dns.list("127.0.16.9", "zen.test")
        defence = {"greet_wait": "1s", "dnsbl_sites": ["zen.test"],
                   "nameservers": [dns.address], "dnsbl_action": "enforce"}
        a = node(make_poolmgr, redis_server.url, "mx-a", **defence)
        b = node(make_poolmgr, redis_server.url, "mx-b", **defence)

        def greet_lines(pm, source):
            raw, (code, lines) = banner(pm, source)
            raw.send(b"QUIT\r\n")
            raw.reply()
            raw.close()
            return lines

        started = time.monotonic()
        assert len(greet_lines(a, "127.0.16.8")) == 2  # 220- and, a second later, 220
        assert time.monotonic() - started >= 0.9
        started = time.monotonic()
        assert greet_lines(b, "127.0.16.8") == [f"220 {HOST} ESMTP poolmgr"]  # no pause
        assert time.monotonic() - started < 0.9
        assert "PASS NEW [127.0.16.8]" in a.log() and "PASS OLD [127.0.16.8]" in b.log()

        for pm in (a, b):  # listed: 550 at RCPT on both nodes, one DNS query in all
            with pm.smtp(source="127.0.16.9") as client:
                client.ehlo()
                client.mail("spam@example.org")
                code, text = client.rcpt("bob@example.test")
            assert code == 550 and b"blocked using zen.test" in text
        assert dns.queries.count("9.16.0.127.zen.test") == 1
        assert "DNSBL rank 1 for [127.0.16.9]" in b.log()
    finally:
        dns.stop()


def test_client_names_are_shared(make_poolmgr, redis_server):
    """One node looks the client's name up (PTR, then A); the other finds it in Redis."""
    dns = DnsServer({}).start()
    try:
        dns.host_record("mail.example.test", "127.0.16.7")
        defence = {"reverse_lookup": True, "nameservers": [dns.address]}
        a = node(make_poolmgr, redis_server.url, "mx-a", **defence)
        b = node(make_poolmgr, redis_server.url, "mx-b", **defence)
        for pm in (a, b):
            raw, (code, lines) = banner(pm, "127.0.16.7")
            raw.send(b"QUIT\r\n")
            raw.reply()
            raw.close()
            wait_until(lambda: "connect from mail.example.test[127.0.16.7]" in pm.log(),
                       what=f"{pm.dir.name}'s connect line")
        assert dns.queries.count("7.16.0.127.in-addr.arpa") == 1
        assert dns.queries.count("mail.example.test") == 1
    finally:
        dns.stop()

def test_redis_outage_falls_back_to_local_state_and_recovers(make_poolmgr, redis_server):
    a = node(make_poolmgr, redis_server.url, "mx-a", client_connection_count_limit=2)
    b = node(make_poolmgr, redis_server.url, "mx-b", client_connection_count_limit=2)
    wait_until(lambda: cluster(a)["state"] == "shared", what="node A shared")
    sent = []

    def deliver(n):
        with a.smtp(source=f"127.0.17.{n % 200 + 1}") as client:
            sent.append(client.sendmail("alice@example.org", ["bob@example.test"],
                                        message(f"outage {n}")))

    for n in range(5):
        deliver(n)
    redis_server.stop(keep=True)
    for n in range(5, 15):  # during the outage: every message accepted, on local state
        deliver(n)
    assert sent == [{}] * 15
    wait_until(lambda: "cluster: degraded" in a.run_cli("status").stdout, what="degraded")
    # Local state still limits what one host alone would limit: 2 connections per client.
    held = [banner(a, "127.0.17.250") for _ in range(2)]
    assert refused(banner(a, "127.0.17.250")[1][1], "127.0.17.250")
    assert banner(b, "127.0.17.250")[1][0] == 220  # node B alone does not count node A's
    counters = a.status()["pools"]["smtp"]["counters"]
    assert counters["cluster_local"] > 0 and counters["cluster_failures"] > 0
    warning = re.compile(rf"poolmgr/master\[\d+\]: warning: cluster: redis "
                         rf"{re.escape(redis_server.url)} unavailable: .+; using local state$",
                         re.M)
    assert len(warning.findall(a.log())) == 1  # once per change of state, not per call
    redis_server.start()
    started = time.monotonic()
    wait_until(lambda: cluster(a)["state"] == "shared" and cluster(b)["state"] == "shared",
               timeout=5, what="both nodes back on Redis")
    assert time.monotonic() - started < 5
    assert a.log().count(f"cluster: redis {redis_server.url} back") == 1
    # Back to shared: A's workers wrote their live connections back into the empty Redis.
    wait_until(lambda: cluster(b)["top_clients"].get("127.0.17.250") == 2,
               what="node A's held connections counted again")
    # B's SMTP worker leaves its fallback at its own next try (within RETRY_EVERY of
    # Redis's return, which the master's monitor may have seen first): until then it
    # limits on the host's counts alone.
    wait_until(lambda: one_more_refused(b, "127.0.17.250"), timeout=5, interval=0.2,
               what="node B refusing a third connection")
    for raw, _ in held:
        raw.close()


def test_a_silent_redis_costs_at_most_the_timeout(make_poolmgr):
    """A Redis that accepts and never answers: each call gives up after cluster.timeout, and
    for a second after that nobody waits at all."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        pm = make_poolmgr({"cluster": {"redis": f"redis://127.0.0.1:"
                                                f"{silent.getsockname()[1]}/0",
                                       "timeout": "300ms"},
                           "defence": {"client_connection_count_limit": 1}})
        waits, held = [], []
        for n in range(3):
            started = time.monotonic()
            held.append(banner(pm, f"127.0.18.{n + 1}"))
            waits.append(time.monotonic() - started)
            assert held[-1][1][0] == 220
        assert max(waits) < 1.0, waits
        # Local state limits meanwhile.
        assert refused(banner(pm, "127.0.18.1")[1][1], "127.0.18.1")
        wait_until(lambda: cluster(pm)["state"] == "degraded", what="degraded")
        assert "unavailable: Timeout" in pm.log()
    finally:
        silent.close()


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_a_call_to_a_silent_redis_gives_up_after_the_timeout(tmp_path, family):
    """cluster.connect over TCP and over a Unix socket (Debian 12's redis-py 4.3 takes no
    socket_connect_timeout for a unix:// URL): a Redis that accepts and never answers costs
    a call cluster.timeout, and then an error the caller falls back on."""
    import redis

    if family == "unix":
        silent = socket.socket(socket.AF_UNIX)
        silent.bind(str(tmp_path / "redis.sock"))
        url = f"unix://{tmp_path / 'redis.sock'}?db=0"
    else:
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    silent.listen(8)
    try:
        client = connect(SimpleNamespace(redis=url, sentinels=(), timeout=0.3))
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert 0.3 <= time.monotonic() - started < 2.0  # not redis-py's 5s default
    finally:
        silent.close()


def test_a_killed_nodes_connections_leave_redis_within_the_heartbeat_ttl(make_poolmgr,
                                                                          redis_server,
                                                                          tmp_path):
    b = node(make_poolmgr, redis_server.url, "mx-b")
    a = Poolmgr(tmp_path / "killed", {
        "smtp": {"min_workers": 1, "max_workers": 2}, "scanner": {"min_workers": 1},
        "cluster": {"redis": redis_server.url, "node": "mx-a", "heartbeat_ttl": TTL},
        "defence": {"client_connection_count_limit": 3}})
    try:
        a.start()
        client = "127.0.19.1"
        held = [banner(a, client) for _ in range(3)]
        assert refused(banner(b, client)[1][1], client)
        wait_until(lambda: cluster(b)["top_clients"].get(client) == 3, what="node B sees 3")
        processes = [a.proc.pid] + [c.pid for c in psutil.Process(a.proc.pid).children()]
        for pid in processes:  # the whole node dies at once
            os.kill(pid, signal.SIGKILL)
        a.proc.wait(10)
        killed = time.monotonic()
        wait_until(lambda: client not in cluster(b)["top_clients"], timeout=10,
                   interval=0.2, what="the dead node's connections taken off")
        # Within the TTL, plus the surviving node's one-second round and a margin.
        assert time.monotonic() - killed < 2.0 + 1.0 + 1.5
        assert banner(b, client)[1][0] == 220
        for raw, _ in held:
            raw.close()
    finally:
        a.kill_all()


class Traffic:
    """A stream of messages to each node and a bounded storm of connections (one per client
    address at a time, far under the limit), in threads, until `stop()`: what they were
    answered, and what went wrong."""

    def __init__(self, nodes):
        self.nodes, self.stopping = nodes, threading.Event()
        self.delivered, self.greeted, self.problems = 0, 0, []
        self.threads = [threading.Thread(target=work, args=(pm, n), daemon=True)
                        for n, pm in enumerate(nodes) for work in (self.stream, self.storm)]

    def start(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def stream(self, pm, n: int) -> None:
        count = 0
        while not self.stopping.is_set():
            count += 1
            try:
                with pm.smtp(source=f"127.0.21.{count % 100 + 1 + 100 * n}") as client:
                    refused = client.sendmail("alice@example.org", ["bob@example.test"],
                                              message(f"failover {n} {count}"))
                if refused:
                    self.problems.append(refused)
                else:
                    self.delivered += 1
            except Exception as exc:  # an SMTP reply other than 250, or a lost connection
                self.problems.append(f"message {count} to {pm.dir.name}: {exc!r}")

    def storm(self, pm, n: int) -> None:
        wave = 0
        while not self.stopping.is_set():
            wave += 1
            raws = []
            for m in range(40):  # 40 connections at once, each from its own address
                try:
                    raw = Raw(pm.smtp_port, f"127.0.{22 + n}.{m + 1}")
                    raws.append(raw)
                    code, lines = raw.reply()
                    if code == 220:
                        self.greeted += 1
                    else:
                        self.problems.append(f"wave {wave} on {pm.dir.name}: {lines}")
                except OSError as exc:
                    self.problems.append(f"wave {wave} on {pm.dir.name}: {exc!r}")
            for raw in raws:
                raw.close()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)


def test_nodes_follow_a_sentinel_failover(sentinels, make_poolmgr):  # nodes stop first
    """The master dies during a stream of messages and a storm: the nodes serve on local
    state, find the replica the sentinels promote by themselves, and share again. Node A's
    first sentinel accepts and never answers (a hung host): it asks the others."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    try:
        listed = {"mx-a": [f"127.0.0.1:{hung.getsockname()[1]}", *sentinels.addresses],
                  "mx-b": sentinels.addresses}
        a, b = (node(make_poolmgr, listed[name], name) for name in ("mx-a", "mx-b"))
        follow_the_failover(sentinels, a, b, {name: f"redis+sentinel://{','.join(addresses)}"
                                                    f"/poolmgr"
                                              for name, addresses in listed.items()})
    finally:
        hung.close()


def follow_the_failover(sentinels, a, b, urls: dict[str, str]) -> None:
    old, new = sentinels.master.address, sentinels.replica.address
    wait_until(lambda: all(cluster(pm)["state"] == "shared" for pm in (a, b)),
               what="both nodes shared")
    assert cluster(a)["master"] == old
    assert f"cluster: shared (redis {urls['mx-a']}, master {old}, node mx-a)" in \
        a.run_cli("status").stdout
    client = "127.0.20.1"
    held = [banner(a, client), banner(a, client), banner(b, client)]
    assert [reply[0] for _, reply in held] == [220, 220, 220]
    assert refused(banner(b, client)[1][1], client)

    traffic = Traffic([a, b]).start()
    wait_until(lambda: traffic.delivered >= 4 and traffic.greeted >= 80, what="traffic")
    sentinels.master.kill()
    killed = time.monotonic()
    try:
        # Degraded for a second or two: the line `poolmgr status` prints, from the view then.
        view = wait_until(lambda: (v := cluster(a))["state"] == "degraded" and v,
                          timeout=5, interval=0.05, what="node A degraded")
        assert ClusterStatus(**view).summary().startswith(
            f"cluster: degraded (redis {urls['mx-a']}, master {old}, node mx-a; ")
        try:  # within 15 s of the kill
            wait_until(lambda: all(cluster(pm)["state"] == "shared" and
                                   cluster(pm)["master"] == new for pm in (a, b)),
                       timeout=15 - (time.monotonic() - killed), interval=0.2,
                       what="both nodes on the new master")
        except WaitTimeout:
            pytest.fail(f"not on {new} within 15 s: {cluster(a)}\n{sentinels.logs()}")
        delivered = traffic.delivered
        wait_until(lambda: traffic.delivered >= delivered + 4, what="messages after it")
    finally:
        traffic.stop()
    # Nothing refused that one host alone would accept: every message, every storm banner.
    assert traffic.problems == []
    assert traffic.delivered >= 12 and traffic.greeted >= 160
    status = b.run_cli("status").stdout
    assert f"cluster: shared (redis {urls['mx-b']}, master {new}, node mx-b)" in status
    for pm in (a, b):
        log, url = pm.log(), urls[cluster(pm)["node"]]
        assert log.count(f"warning: cluster: redis {url} unavailable: ") == 1, log
        assert f"cluster: redis master poolmgr now at {new} (was {old})" in log
        assert log.count(f"cluster: redis {url} back") == 1
    # The cluster-wide limit holds again: the held connections are counted on the new
    # master (each worker wrote its own back), and a fourth is refused on either node.
    wait_until(lambda: cluster(b)["top_clients"].get(client) == 3,
               what="the held connections counted on the new master")
    # Each SMTP worker leaves its fallback at its own next try, a second or so after the
    # master's monitor saw Redis back: until then a worker limits on the host's counts alone.
    for pm in (a, b):
        wait_until(lambda: one_more_refused(pm, client), timeout=10, interval=0.2,
                   what=f"a fourth connection refused on {pm.dir.name}")
    for raw, _ in held:
        raw.close()


@pytest.mark.parametrize("passwords, error", [
    ({"password": "master-secret"}, "authenticated"),  # the sentinels ask for their own
    ({"password": "wrong", "sentinel_password": "sentinel-secret"}, "invalid username-password"),
])
def test_a_wrong_password_leaves_the_node_on_local_state_saying_why(sentinels, make_poolmgr,
                                                                     passwords, error):
    """The sentinels' password missing, the master's wrong: the node serves on its own state
    and says why in status (the right ones are the failover test's)."""
    pm = node(make_poolmgr, sentinels.addresses, "mx-a", passwords=passwords)
    with pm.smtp(source="127.0.23.5") as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], message()) == {}
    view = wait_until(lambda: (v := cluster(pm))["state"] == "degraded" and v,
                      what="degraded")
    assert error in view["error"], view
    for said in (pm.run_cli("status").stdout, pm.run_cli("status", "--json").stdout, pm.log()):
        assert "secret" not in said


def test_unreachable_sentinels_leave_the_node_on_local_state(make_poolmgr):
    """No sentinel answers: the node serves on its own state, and says why in one line."""
    ports = [free_port() for _ in range(2)]
    pm = node(make_poolmgr, [f"127.0.0.1:{port}" for port in ports], "mx-a",
              client_connection_count_limit=1)
    with pm.smtp(source="127.0.23.1") as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], message()) == {}
    held = banner(pm, "127.0.23.2")
    assert held[1][0] == 220
    assert refused(banner(pm, "127.0.23.2")[1][1], "127.0.23.2")  # local state limits
    view = wait_until(lambda: (v := cluster(pm))["state"] == "degraded" and v,
                      what="degraded")
    assert view["master"] == "" and view["error"] == "No master found for 'poolmgr': " + \
        "; ".join(f"Error 111 connecting to 127.0.0.1:{port}. Connection refused."
                  for port in ports)
    held[0].close()


def test_bench_spreads_connections_over_the_nodes_round_robin(monkeypatch):
    """`poolmgr bench run --nodes 2`: the load generator takes the nodes in turn, as senders
    spread over equal MX records (the run itself: README, Benchmarks)."""
    import asyncio

    from poolmgr.benchmark import load, scenario

    plan = scenario.from_dict({"name": "two", "server": {"nodes": 2},
                               "phases": [{"name": "p", "duration": "1s",
                                           "rates": {"idle": 1}}]})
    assert plan.server["nodes"] == 2
    generator = load.Generator({"scenario": plan.as_dict(), "index": 0, "processes": 1,
                                "t0": 0, "targets": [["127.0.0.1", 2501],
                                                     ["127.0.0.1", 2502]]})
    ports = []

    async def open_connection(host, port, local_addr):  # the network is not under test here
        ports.append(port)
        return None, None

    monkeypatch.setattr(load.asyncio, "open_connection", open_connection)
    for _ in range(5):
        asyncio.run(generator.connect("idle", "127.0.60.1"))
    assert ports == [2501, 2502, 2501, 2502, 2501]


def test_a_resync_waits_for_count_changes_in_flight_and_holds_new_ones_back():
    """A worker's resync rewrites its counts in Redis from what it holds: a CONNECT or
    DISCONNECT that Redis ran beside it was counted twice or wiped (under load, the
    failover test above saw the cluster-wide count one short, and a fourth connection let
    through). The gate orders them: calls in flight end first, new ones wait for it."""
    import gevent
    from gevent.event import Event

    gate, order, release = Gate(), [], {name: Event() for name in ("first", "resync", "late")}

    def call(kind, label):
        with gate.enter(kind):
            order.append(f"{label} in")
            release[label].wait()
        order.append(f"{label} out")

    first = gevent.spawn(call, "disconnect", "first")
    gevent.sleep(0)
    resync = gevent.spawn(call, "resync", "resync")
    gevent.sleep(0)
    late = gevent.spawn(call, "connect", "late")
    other = gevent.spawn(lambda: gate.enter("get").__enter__() or order.append("get"))
    gevent.sleep(0.01)
    assert order == ["first in", "get"]  # a call that counts nothing never waits
    release["first"].set()
    gevent.sleep(0.01)
    assert order == ["first in", "get", "first out", "resync in"]
    release["resync"].set()
    release["late"].set()
    gevent.joinall([first, resync, late, other], timeout=5, raise_error=True)
    assert order[-3:] == ["resync out", "late in", "late out"]
