"""The PROXY protocol header (smtp/haproxy.py): versions 1 and 2 as HAProxy's
proxy-protocol.txt defines them, headers that come in pieces, and what ends a session.

The headers are built here byte by byte from the specification; HAProxy's own are in
test_haproxy_cluster.py."""

import socket
import struct
import threading
import time

import pytest

from poolmgr import config
from poolmgr.defence.networks import plain_ip
from poolmgr.smtp import haproxy
from poolmgr.smtp.conn import Conn
from poolmgr.smtp.haproxy import Header, HeaderError, V2_SIGNATURE, parse


def v2(command: int = 1, family: int = 1, transport: int = 1, block: bytes = b"",
       version: int = 2, tlvs: bytes = b"") -> bytes:
    body = block + tlvs
    return V2_SIGNATURE + bytes([version << 4 | command, family << 4 | transport]) + \
        struct.pack("!H", len(body)) + body


def inet(client: str, server: str, client_port: int, server_port: int) -> bytes:
    return socket.inet_aton(client) + socket.inet_aton(server) + \
        struct.pack("!HH", client_port, server_port)


def inet6(client: str, server: str, client_port: int, server_port: int) -> bytes:
    return socket.inet_pton(socket.AF_INET6, client) + \
        socket.inet_pton(socket.AF_INET6, server) + struct.pack("!HH", client_port, server_port)


# -- version 1
def test_v1_tcp4_names_the_client_and_leaves_what_follows():
    data = b"PROXY TCP4 192.0.2.7 198.51.100.1 40312 25\r\nEHLO early\r\n"
    header = parse(data)
    assert header == Header(len(data) - len(b"EHLO early\r\n"), ("192.0.2.7", 40312),
                            ("198.51.100.1", 25))


def test_v1_tcp6():
    data = b"PROXY TCP6 2001:db8::7 2001:db8::1 40312 25\r\n"
    assert parse(data) == Header(len(data), ("2001:db8::7", 40312), ("2001:db8::1", 25))


def test_v1_unknown_is_not_proxied():
    assert parse(b"PROXY UNKNOWN\r\n") == Header(15, None, None)
    line = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"  # the rest of the line is ignored
    assert parse(line) == Header(len(line), None, None)


def test_v1_in_pieces_waits_for_the_rest():
    data = b"PROXY TCP4 192.0.2.7 198.51.100.1 40312 25\r\n"
    for end in range(len(data)):
        assert parse(data[:end]) is None, data[:end]
    assert parse(data).client == ("192.0.2.7", 40312)


@pytest.mark.parametrize("line, reason", [
    (b"PROXY TCP5 192.0.2.7 198.51.100.1 40312 25\r\n", "bad or missing protocol type"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40312\r\n", "bad or missing protocol type"),
    (b"PROXY TCP4 192.0.2.7  198.51.100.1 40312 25\r\n", "bad or missing protocol type"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 40312 25\r\n", "bad or missing client address"),
    (b"PROXY TCP6 2001:db8::7 198.51.100.1 40312 25\r\n", "bad or missing server address"),
    (b"PROXY TCP4 192.0.2.300 198.51.100.1 40312 25\r\n", "bad or missing client address"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n", "bad or missing client port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40312 -25\r\n", "bad or missing server port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40312 25\n", "missing CRLF"),
    (b"PROXY TCP4 " + b"1" * 100, "line too long"),
    # a scope id is any text to ipaddress: control characters would reach Received:
    (b"PROXY TCP6 fe80::1%a\x1bX 2001:db8::1 1 25\r\n", "bad or missing client address"),
    (b"PROXY TCP6 fe80::1%a\nb 2001:db8::1 1 25\r\n", "missing CRLF"),
])
def test_v1_malformed(line, reason):
    with pytest.raises(HeaderError) as caught:
        parse(line)
    assert caught.value.reason == reason
    assert caught.value.seen  # logged, escaped


@pytest.mark.parametrize("data", [b"EHLO client.example\r\n", b"GET / HTTP/1.0\r\n",
                                  b"PROXX", b"\r\n\r\n\x00\r\nQUIT\r", b"\x16\x03\x01"])
def test_garbage_is_refused_at_its_first_wrong_byte(data):
    with pytest.raises(HeaderError) as caught:
        parse(data)
    assert caught.value.reason == "unexpected protocol header"


# -- version 2
def test_v2_inet():
    data = v2(block=inet("192.0.2.7", "198.51.100.1", 40312, 25))
    assert parse(data + b"QUIT\r\n") == Header(len(data), ("192.0.2.7", 40312),
                                               ("198.51.100.1", 25))


def test_v2_inet6_and_a_mapped_ipv4_client():
    data = v2(family=2, block=inet6("2001:db8::7", "2001:db8::1", 40312, 25))
    assert parse(data) == Header(len(data), ("2001:db8::7", 40312), ("2001:db8::1", 25))
    mapped = v2(family=2, block=inet6("::ffff:192.0.2.7", "::1", 1, 25))
    assert plain_ip(parse(mapped).client[0]) == "192.0.2.7"  # as the session keeps it


def test_v2_skips_its_tlvs():
    tlvs = bytes([0x04, 0, 3]) + b"\0\0\0" + bytes([0x05, 0, 4]) + b"abcd"  # NOOP, UNIQUE_ID
    data = v2(block=inet("192.0.2.7", "198.51.100.1", 40312, 25), tlvs=tlvs)
    header = parse(data + b"EHLO x\r\n")
    assert header.length == len(data) and header.client == ("192.0.2.7", 40312)


def test_v2_local_is_the_balancers_own_connection():
    assert parse(v2(command=0, family=0, transport=0)) == Header(16, None, None, local=True)
    # LOCAL: whatever address block follows is ignored.
    local = v2(command=0, block=inet("192.0.2.7", "198.51.100.1", 1, 2))
    assert parse(local) == Header(len(local), None, None, local=True)


@pytest.mark.parametrize("family", [0, 3])
def test_v2_unspecified_or_unix_family_keeps_the_real_endpoints(family):
    block = b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0") if family == 3 else b""
    data = v2(family=family, transport=0 if family == 0 else 1, block=block)
    assert parse(data) == Header(len(data), None, None)


@pytest.mark.parametrize("data, reason", [
    (v2(family=4, block=inet("192.0.2.7", "198.51.100.1", 1, 2)), "unsupported address family"),
    (v2(family=15), "unsupported address family"),
    (v2(transport=3, block=inet("192.0.2.7", "198.51.100.1", 1, 2)),
     "unsupported address family"),
    (v2(version=1, block=inet("192.0.2.7", "198.51.100.1", 1, 2)),
     "unsupported protocol version"),
    (v2(command=2, block=inet("192.0.2.7", "198.51.100.1", 1, 2)), "unsupported command"),
    (v2(block=b"\xc0\x00\x02\x07"), "address block too short"),
    (v2(family=2, block=inet("192.0.2.7", "198.51.100.1", 1, 2)), "address block too short"),
])
def test_v2_malformed(data, reason):
    with pytest.raises(HeaderError) as caught:
        parse(data)
    assert caught.value.reason == reason


def test_v2_truncated_waits_for_the_rest():
    data = v2(family=2, block=inet6("2001:db8::7", "2001:db8::1", 40312, 25))
    for end in range(len(data)):
        assert parse(data[:end]) is None, end
    assert parse(data) is not None


# -- reading it off a connection
@pytest.fixture
def pair():
    server, client = socket.socketpair()
    yield Conn(server, timeout=5), client
    server.close()
    client.close()


def send_later(sock, *pieces, gap=0.05):
    def run():
        for piece in pieces:
            time.sleep(gap)  # a header split across segments, as a slow network splits it
            sock.sendall(piece)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_receive_in_pieces_keeps_what_follows(pair):
    conn, client = pair
    data = v2(block=inet("192.0.2.7", "198.51.100.1", 40312, 25))
    send_later(client, data[:5], data[5:14], data[14:] + b"EHLO early\r\n").join()
    header = haproxy.receive(conn, 2)
    assert header.client == ("192.0.2.7", 40312)
    assert conn.buf == b"EHLO early\r\n"  # the greet test still sees it


def test_receive_gives_up_at_the_time_limit(pair):
    conn, client = pair
    client.sendall(b"PROXY TCP4 192.0.2.7")
    started = time.monotonic()
    with pytest.raises(HeaderError, match="time limit exceeded"):
        haproxy.receive(conn, 0.3)
    assert 0.3 <= time.monotonic() - started < 2


def test_receive_lost_connection(pair):
    conn, client = pair
    client.sendall(b"PROXY TCP4")
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(HeaderError, match="lost connection"):
        haproxy.receive(conn, 2)


class Lines:
    def __init__(self):
        self.lines = []

    def warning(self, text, *args):
        self.lines.append("warning: " + text % args)


def smtp_section(**values):
    return config.from_dict({"smtp": {"proxy_protocol": "haproxy",
                                      "proxy_networks": ["127.0.0.0/8"], **values}}).smtp


def test_take_header_from_a_balancer(pair):
    conn, client = pair
    client.sendall(b"PROXY TCP6 ::ffff:192.0.2.7 ::1 40312 25\r\n")
    log = Lines()
    address, port = haproxy.take_header(conn, ("127.0.0.1", 5000), smtp_section(), log).client
    assert (plain_ip(address), port) == ("192.0.2.7", 40312)  # as the session keeps it
    assert log.lines == []
    client.sendall(v2(command=0, family=0, transport=0))  # LOCAL: the balancer itself
    conn2 = Conn(conn.sock, timeout=5)
    assert haproxy.take_header(conn2, ("127.0.0.1", 5001), smtp_section(), log) == \
        haproxy.Header(16, None, None, local=True)


def test_take_header_refuses_a_peer_outside_proxy_networks(pair):
    conn, client = pair
    client.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 40312 25\r\n")
    log = Lines()
    assert haproxy.take_header(conn, ("192.0.2.99", 5000), smtp_section(), log) is None
    assert log.lines == ["warning: haproxy read: peer not in smtp.proxy_networks from "
                         "[192.0.2.99]:5000"]


def test_take_header_logs_what_came_as_postscreen_does(pair):
    conn, client = pair
    client.sendall(b"EHLO bot\r\n")
    log = Lines()
    assert haproxy.take_header(conn, ("127.0.0.1", 5000), smtp_section(), log) is None
    assert log.lines == ["warning: haproxy read: unexpected protocol header from "
                         "[127.0.0.1]:5000: EHLO bot\\r\\n"]


def test_take_header_times_out(pair):
    conn, client = pair
    log = Lines()
    section = smtp_section(upstream_proxy_timeout="200ms")
    assert haproxy.take_header(conn, ("127.0.0.1", 5000), section, log) is None
    assert log.lines == ["warning: haproxy read: time limit exceeded from [127.0.0.1]:5000"]


def test_config_needs_the_balancers():
    with pytest.raises(config.ConfigError, match=r"proxy_networks: empty, and proxy_protocol"):
        config.from_dict({"smtp": {"proxy_protocol": "haproxy"}})
    with pytest.raises(config.ConfigError, match=r'proxy_protocol: must be one of "", haproxy'):
        config.from_dict({"smtp": {"proxy_protocol": "v2"}})
    assert config.from_dict({}).smtp.proxy_protocol == ""
    assert config.from_dict({}).smtp.upstream_proxy_timeout == 5.0
