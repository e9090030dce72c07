"""Two poolmgr nodes sharing one Redis behind Debian's HAProxy (`send-proxy-v2`), as
docs/operations.md configures them: every consumer of the client's address (the denylist,
anvil, the greet test, the logs, XFORWARD, Received:) sees the address from the PROXY header,
not the balancer's. Also version 1 headers from a raw socket, and what ends a session before
its banner: a peer outside proxy_networks, garbage, no header in time.

The daemons are shared by the module's tests (each test uses client addresses of its own);
HAProxy connects to the nodes from 127.0.0.1, the clients come from 127.0.21.x.
"""

import re
import smtplib
import time
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import allowed_patterns, stop_cleanly
from helpers import Raw, free_port, message, wait_until
from poolmgr.smtp.haproxy import V2_SIGNATURE
from poolmgr.testing import HAProxy, Poolmgr, RedisServer

HOST = "mx.example.test"
DENIED = "127.0.21.66"
NO_RESOURCES = "421 4.3.2 No system resources"


@pytest.fixture(scope="module")
def site(tmp_path_factory, request):
    """Redis, nodes mx-a and mx-b, and HAProxy with a frontend per node (mxa, mxb: a test
    knows which node it reaches) and one balancing both (mx)."""
    redis = RedisServer().start()
    nodes, proxy = [], None
    try:
        for name in ("mx-a", "mx-b"):
            node = Poolmgr(tmp_path_factory.mktemp(name), {
                "smtp": {"min_workers": 1, "max_workers": 2, "proxy_protocol": "haproxy",
                         "proxy_networks": ["127.0.0.1/32"], "upstream_proxy_timeout": "1s"},
                "scanner": {"min_workers": 1, "max_workers": 2},
                "cluster": {"redis": redis.url, "node": name},
                "defence": {"client_connection_count_limit": 2, "denylist": [f"{DENIED}/32"],
                            "greet_wait": "1s"},
                "metrics": {"listen": f"127.0.0.1:{free_port()}"}})
            nodes.append(node.start())
        a, b = nodes
        proxy = HAProxy({"mxa": [a.smtp_port], "mxb": [b.smtp_port],
                         "mx": [a.smtp_port, b.smtp_port]},
                        workdir=tmp_path_factory.mktemp("haproxy")).start()
        yield a, b, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        problems = []
        for node in nodes:
            problems += stop_cleanly(node, allowed_patterns(request.node))
        redis.stop()
        if problems:
            pytest.fail("poolmgr did not end cleanly:\n" + "\n".join(problems), pytrace=False)


def through(proxy, frontend: str, source: str) -> Raw:
    return Raw(proxy.ports[frontend], source)


def test_a_denylisted_client_is_refused_on_both_nodes(site):
    a, b, proxy = site
    for frontend, node in (("mxa", a), ("mxb", b)):
        raw = through(proxy, frontend, DENIED)
        code, lines = raw.reply()
        assert code == 521 and f"client [{DENIED}] blocked using denylist" in lines[0]
        assert raw.closed()
        wait_until(lambda: re.search(rf"DENYLISTED \[{re.escape(DENIED)}\]:\d+; action=drop",
                                     node.log()), what=f"{node.dir.name}'s DENYLISTED line")
        assert f"connect from unknown[{DENIED}]" in node.log()


def test_the_connection_limit_holds_across_the_nodes(site):
    a, b, proxy = site
    client = "127.0.21.7"
    held = [through(proxy, "mxa", client)]
    assert held[0].reply()[0] == 220  # after the greet pause, which starts after the header
    held.append(through(proxy, "mxb", client))
    assert held[1].reply()[0] == 220  # the pass is shared: no pause on node B
    for frontend in ("mx", "mxa", "mxb"):  # a third, on either node
        raw = through(proxy, frontend, client)
        assert raw.reply()[1] == [f"421 4.7.0 {HOST} Error: too many connections from {client}"]
        assert raw.closed()
    assert through(proxy, "mx", "127.0.21.8").reply()[0] == 220  # another client is not held
    for node in (a, b):
        # The count is the cluster's with this connection: 3, or 4 while a refused one's
        # disconnect, which its session sends as it closes, has not reached Redis yet.
        limited = re.compile(rf"Connection concurrency limit exceeded: [34] from "
                             rf"unknown\[{re.escape(client)}\]")
        wait_until(lambda: limited.search(node.log()), what=f"{node.dir.name}'s limit line")
        text = node.log()
        assert f"connect from unknown[{client}]" in text
        assert "PASS NEW [127.0.0.1]" not in text  # the balancer is never the client
    assert f"PASS NEW [{client}]" in a.log() and f"PASS NEW [{client}]" not in b.log()
    held[1].send(b"QUIT\r\n")
    assert held[1].reply()[0] == 221
    wait_until(lambda: f"disconnect from unknown[{client}] quit=1 commands=1" in b.log(),
               what="the QUIT on node B")
    # Node B let its connection go: the cluster has room for one more on node A.
    wait_until(lambda: through(proxy, "mxa", client).reply()[0] == 220, timeout=5,
               what="room again")


def test_the_message_carries_the_real_client(site):
    a, b, proxy = site
    client = "127.0.21.5"
    with smtplib.SMTP("127.0.0.1", proxy.ports["mxb"], source_address=(client, 0),
                      local_hostname="client.test", timeout=30) as smtp:
        assert smtp.sendmail("alice@example.org", ["bob@example.test"],
                             message("through haproxy")) == {}
    wait_until(lambda: any(b"through haproxy" in m for m in b.delivered()),
               what="the message delivered")
    delivered = next(m for m in b.delivered() if b"through haproxy" in m)
    received = delivered.split(b"\r\n\r\n")[0].decode()
    # The SMTP worker's header names the client (the scanner's, above it, the SMTP worker).
    assert re.search(rf"Received: from client\.test \(unknown \[{re.escape(client)}\]\)\r\n"
                     rf"\tby {HOST} \(poolmgr\) with ESMTP", received), received
    text = b.log()
    assert re.search(rf"poolmgr/smtpd\[\d+\]: \w+: client=unknown\[{re.escape(client)}\]",
                     text)
    # XFORWARD told the scanner pool the same client.
    assert re.search(rf"poolmgr/scanner\[\d+\]: \w+: client=unknown\[{re.escape(client)}\]",
                     text), text[-3000:]


def test_the_greet_pause_starts_after_the_header_and_sees_what_follows(site):
    a, b, proxy = site
    client = "127.0.21.11"
    raw = through(proxy, "mxa", client)
    raw.send(b"EHLO early.test\r\n")  # before the banner: HAProxy forwards it after its header
    assert raw.reply()[0] == 220
    wait_until(lambda: re.search(rf"PREGREET 17 after [\d.]+ from \[{re.escape(client)}\]:\d+: "
                                 rf"EHLO early\.test\\r\\n", a.log()), what="PREGREET")


def test_version_1_from_a_raw_socket(site):
    a, b, proxy = site
    raw = Raw(b.smtp_port, "127.0.0.1")  # the balancer's address
    started = time.monotonic()
    raw.send(b"PROXY TCP4 127.0.21.9 127.0.0.1 40999 25\r\n")
    code, lines = raw.reply()
    assert code == 220 and len(lines) == 2  # 220- then, after the pause, 220
    assert time.monotonic() - started >= 0.9
    raw.send(b"EHLO v1.test\r\n")
    assert raw.reply()[0] == 250
    raw.send(b"QUIT\r\n")
    assert raw.reply()[0] == 221
    wait_until(lambda: "disconnect from unknown[127.0.21.9] ehlo=1 quit=1 commands=2"
               in b.log(), what="the disconnect line")
    assert "PASS NEW [127.0.21.9]:40999" in b.log()
    denied = Raw(b.smtp_port, "127.0.0.1")
    denied.send(f"PROXY TCP4 {DENIED} 127.0.0.1 41000 25\r\n".encode())
    assert denied.reply()[0] == 521


def test_version_1_ipv6_clients(site):
    """An IPv6 client, and an IPv4-mapped one (seen as plain IPv4, as on a [::] listener)."""
    a, b, proxy = site
    sessions = []
    for named in ("2001:db8::7", "::ffff:127.0.21.13"):
        raw = Raw(a.smtp_port, "127.0.0.1")
        raw.send(f"PROXY TCP6 {named} ::1 41001 25\r\n".encode())
        sessions.append(raw)
    for raw in sessions:
        assert raw.reply()[0] == 220
        raw.send(b"QUIT\r\n")
        assert raw.reply()[0] == 221
    for client in ("2001:db8::7", "127.0.21.13"):
        wait_until(lambda: f"disconnect from unknown[{client}] quit=1 commands=1" in a.log(),
                   what=f"{client}'s disconnect line")
    assert "::ffff:" not in a.log()


def test_a_peer_outside_proxy_networks_is_refused(site):
    a, b, proxy = site
    raw = Raw(a.smtp_port, "127.0.22.9")  # straight to the node, past the balancer
    assert raw.reply()[1] == [NO_RESOURCES]
    assert raw.closed()
    wait_until(lambda: re.search(r"warning: haproxy read: peer not in smtp.proxy_networks "
                                 r"from \[127\.0\.22\.9\]:\d+", a.log()), what="the warning")


def test_garbage_or_silence_from_the_balancer_ends_the_session(site):
    a, b, proxy = site
    raw = Raw(a.smtp_port, "127.0.0.1")
    raw.send(b"EHLO direct.test\r\n")
    assert raw.reply()[1] == [NO_RESOURCES]
    assert raw.closed()
    wait_until(lambda: re.search(r"warning: haproxy read: unexpected protocol header from "
                                 r"\[127\.0\.0\.1\]:\d+: EHLO direct\.test\\r\\n", a.log()),
               what="the warning")
    silent = Raw(a.smtp_port, "127.0.0.1")
    silent.send(b"PROXY TCP4 127.0.21.12")  # and nothing more
    started = time.monotonic()
    assert silent.reply()[1] == [NO_RESOURCES]
    assert 0.5 < time.monotonic() - started < 5  # upstream_proxy_timeout is 1s here
    assert silent.closed()
    wait_until(lambda: re.search(r"warning: haproxy read: time limit exceeded from "
                                 r"\[127\.0\.0\.1\]:\d+", a.log()), what="the warning")
    assert "127.0.21.12" not in a.log()  # a header that never ended names nobody


def test_the_balancers_health_checks_are_neither_clients_nor_nuisance(site):
    """HAProxy's health checks (`check-send-proxy` with send-proxy-v2: a LOCAL header every
    2 s) and one from a raw socket: the balancer's own connections, served at once (trusted,
    no greet pause) and counted as health checks, neither in the connections nor as nuisance.
    A version 1 `PROXY UNKNOWN` may be a client the balancer cannot name: untrusted."""
    a, b, proxy = site

    def counts():
        status = a.status()
        total = status["nuisance"]["total"]
        return (total["health_checks"], status["pools"]["smtp"]["counters"]["connections"],
                sum(total["by_reason"].values()))

    def in_metrics() -> float:
        with urlopen(f"http://{a.sections['metrics']['listen']}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return next(s.value for family in text_string_to_metric_families(text)
                    for s in family.samples if s.name == "poolmgr_health_checks_total")

    wait_until(lambda: counts()[0] >= 1, timeout=10, what="HAProxy's health checks counted")
    checks, connections, nuisance = counts()
    raw = Raw(a.smtp_port, "127.0.0.1")
    raw.send(V2_SIGNATURE + b"\x20\x00\x00\x00")  # version 2, LOCAL, no address block
    started = time.monotonic()
    code, lines = raw.reply()
    assert code == 220 and len(lines) == 1 and time.monotonic() - started < 0.9  # no pause
    raw.close()
    wait_until(lambda: counts()[0] >= checks + 2, timeout=10,
               what="this one and HAProxy's next counted")
    assert counts()[1:] == (connections, nuisance)
    wait_until(lambda: in_metrics() >= checks + 2, timeout=10, what="the metric")
    assert re.search(r"; load balancer health checks \d+ since start$",
                     a.run_cli("status", check=True).stdout, re.M)
    unknown = Raw(a.smtp_port, "127.0.0.1")
    unknown.send(b"PROXY UNKNOWN\r\n")
    code, lines = unknown.reply()
    assert code == 220 and len(lines) == 2  # 220- then, after the greet pause, 220
    unknown.close()
