"""The PROXY protocol header a load balancer sends before the SMTP dialogue (HAProxy's
proxy-protocol.txt, versions 1 and 2; Postfix: smtpd_upstream_proxy_protocol = haproxy).

With `smtp.proxy_protocol = "haproxy"` every connection to the SMTP listeners must come from
`smtp.proxy_networks` and open with a header naming the real client: version 1, a text line
(`PROXY TCP4 192.0.2.7 192.0.2.1 40312 25\\r\\n`), or version 2, a binary block after a
12-byte signature (HAProxy's `send-proxy-v2`). `parse` reads one from the bytes received so
far (None: not all there yet); `take_header` waits for it, at most
`smtp.upstream_proxy_timeout`. A header that says the connection is not proxied (v2 LOCAL;
v1 UNKNOWN; v2 with an unspecified or Unix address family) leaves the connection's own peer
as the client, as Postfix does. Only v2 LOCAL says the connection is the balancer's own (what
HAProxy's health checks send with send-proxy-v2): v1 UNKNOWN and the other families may be
a client relayed from an address the header cannot carry. Anything else ends the session
before its banner, logged as postscreen logs it, with the peer:
`warning: haproxy read: time limit exceeded from [10.0.0.5]:40312`,
`warning: haproxy read: unexpected protocol header from [10.0.0.5]:40313: EHLO x\\r\\n`.
Bytes after the header stay in the connection's buffer for the dialogue (a client that talks
before the banner is still seen doing so).
"""

__all__ = ["Header", "HeaderError", "parse", "receive", "take_header", "V2_SIGNATURE"]

import ipaddress
import time
from typing import NamedTuple

from ..defence.networks import in_networks
from ..defence.screening import escape
from .conn import Disconnected

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (proxy-protocol.txt section 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version and command, family and transport, length
V2_LOCAL, V2_PROXY = 0, 1
# Address family (high nibble of byte 13): the size of its address block.
_V2_UNSPEC, _V2_INET, _V2_INET6, _V2_UNIX = 0, 1, 2, 3
_V2_BLOCK = {_V2_INET: 12, _V2_INET6: 36, _V2_UNIX: 216}
_V2_TRANSPORTS = (0, 1, 2)  # unspecified, stream, datagram


class Header(NamedTuple):
    length: int                    # bytes the header took
    client: tuple[str, int] | None  # None: not proxied (the connection's own peer is the client)
    server: tuple[str, int] | None
    local: bool = False            # v2 LOCAL: the balancer's own connection (a health check)


class HeaderError(Exception):
    """No usable header: `reason` in postscreen's words, `seen` what came (for the log)."""

    def __init__(self, reason: str, seen: bytes = b""):
        super().__init__(reason)
        self.reason, self.seen = reason, seen


def parse(data: bytes) -> Header | None:
    """The header at the start of `data`; None while what came may still become one."""
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    if V2_SIGNATURE.startswith(data) or V1_PREFIX.startswith(data):
        return None  # empty, or a header's first bytes
    raise HeaderError("unexpected protocol header", data[:V1_MAX])


def _parse_v1(data: bytes) -> Header | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if b"\n" in data[:V1_MAX]:
            raise HeaderError("missing CRLF", data[:V1_MAX])
        if len(data) >= V1_MAX:
            raise HeaderError("line too long", data[:V1_MAX])
        return None
    line = data[:end]
    if b"\n" in line or b"\r" in line:
        raise HeaderError("missing CRLF", line)
    words = line.split(b" ")
    if words[1:2] == [b"UNKNOWN"]:  # the rest of the line is to be ignored
        return Header(end + 2, None, None)
    if len(words) != 6 or words[1] not in (b"TCP4", b"TCP6"):
        raise HeaderError("bad or missing protocol type", line)
    version = 4 if words[1] == b"TCP4" else 6
    client, server = _v1_address(words[2], version), _v1_address(words[3], version)
    if client is None:
        raise HeaderError("bad or missing client address", line)
    if server is None:
        raise HeaderError("bad or missing server address", line)
    client_port, server_port = _v1_port(words[4]), _v1_port(words[5])
    if client_port is None:
        raise HeaderError("bad or missing client port", line)
    if server_port is None:
        raise HeaderError("bad or missing server port", line)
    return Header(end + 2, (client, client_port), (server, server_port))


def _v1_address(word: bytes, version: int) -> str | None:
    if word.strip(b"0123456789abcdefABCDEF:.") or not word:  # no scope id (%...): no text
        return None
    try:
        address = ipaddress.ip_address(word.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return str(address) if address.version == version else None


def _v1_port(word: bytes) -> int | None:
    if not word.isdigit() or len(word) > 5 or int(word) > 65535:
        return None
    return int(word)


def _parse_v2(data: bytes) -> Header | None:
    if len(data) < V2_FIXED:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    length = V2_FIXED + int.from_bytes(data[14:16], "big")
    if version != 2:
        raise HeaderError("unsupported protocol version", data[:V2_FIXED])
    if command not in (V2_LOCAL, V2_PROXY):
        raise HeaderError("unsupported command", data[:V2_FIXED])
    if len(data) < length:
        return None
    if command == V2_LOCAL:  # the balancer's own connection (a health check)
        return Header(length, None, None, local=True)
    if family not in (_V2_UNSPEC, *_V2_BLOCK) or transport not in _V2_TRANSPORTS:
        raise HeaderError("unsupported address family", data[:V2_FIXED])
    if length - V2_FIXED < _V2_BLOCK.get(family, 0):
        raise HeaderError("address block too short", data[:length])
    if family == _V2_INET:
        block = data[V2_FIXED:V2_FIXED + 12]
        return Header(length, (str(ipaddress.IPv4Address(block[0:4])), _port(block, 8)),
                      (str(ipaddress.IPv4Address(block[4:8])), _port(block, 10)))
    if family == _V2_INET6:
        block = data[V2_FIXED:V2_FIXED + 36]
        return Header(length, (str(ipaddress.IPv6Address(block[0:16])), _port(block, 32)),
                      (str(ipaddress.IPv6Address(block[16:32])), _port(block, 34)))
    return Header(length, None, None)  # unspecified or Unix: the real endpoints count


def _port(block: bytes, at: int) -> int:
    return int.from_bytes(block[at:at + 2], "big")


def receive(conn, timeout: float) -> Header:
    """Wait for the header on `conn` (a `conn.Conn`), at most `timeout` seconds, and take it
    off the connection's input. HeaderError when it does not come whole and well-formed."""
    deadline = time.monotonic() + timeout
    while True:
        header = parse(conn.buf)
        if header is not None:
            conn.take(header.length)
            return header
        left = deadline - time.monotonic()
        if left <= 0:
            raise HeaderError("time limit exceeded")
        try:
            conn.read_more(left)
        except Disconnected:
            raise HeaderError("lost connection") from None


def take_header(conn, peer: tuple[str, int], smtp, log) -> Header | None:
    """The PROXY header of a connection from `peer` (the `[smtp]` section `smtp` says who may
    send one and how long it may take); None, logged, when the session must end: a peer
    outside proxy_networks, or no usable header in time."""
    try:
        if not in_networks(peer[0], smtp.proxy_networks):
            raise HeaderError("peer not in smtp.proxy_networks")
        header = receive(conn, smtp.upstream_proxy_timeout)
    except HeaderError as exc:
        # postscreen's line, with the peer: one worker serves thousands of connections.
        log.warning("haproxy read: %s from [%s]:%s%s", exc.reason, peer[0], peer[1],
                    ": " + escape(exc.seen) if exc.seen else "")
        return None
    return header
