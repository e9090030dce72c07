"""SMTP/LMTP client for the hand-off to the scanner pool and the re-injection to the next hop.

Banner, EHLO (LHLO for LMTP), XFORWARD when the server offers it (Postfix's XFORWARD_README),
then XFORWARD, MAIL, RCPT and DATA in one group when PIPELINING is offered (as Postfix's smtp
client does), the data dot-stuffed, then the final reply: one for SMTP, one per accepted
recipient for LMTP. An XFORWARD the server refuses (an IPv6 ADDR to an IPv4-only Postfix) is
logged as Postfix's smtp client logs it, and the message goes on: XFORWARD only names the
client in the next hop's log. Every step has its RFC 5321 section 4.5.3.2 timeout (config
[timeouts]) and the whole exchange is bounded by `deadline`. Any network failure raises
`RelayError` so the caller can answer 4xx: a message is never reported accepted unless the
server said so.

Lines longer than RFC 5322's 998 octets are folded as Postfix's smtp client does
(smtp_line_length_limit: CRLF and a space inserted), so a strict next hop does not refuse a
message whose sender was told it would be delivered.

With a `Cache`, a connection whose transaction ended cleanly is kept for the next message to
the same hop (Postfix's smtp connection cache: smtp_connection_cache_time_limit and
smtp_connection_reuse_time_limit). A cached connection whose first reply is a 421 or never
comes (the server closed it meanwhile) is stale, and the message goes over a new connection.
With pipelining (one `BDAT n LAST`) the message may already have been written to the stale one:
a server that took it and died before answering sees it twice, a duplicate, never a loss.

Works on blocking sockets (scanner workers) and gevent sockets (SMTP workers).
"""

__all__ = ["send", "fold", "Cache", "RelayError", "Outgoing", "LINE_LENGTH_LIMIT", "PRECHECK_MAX"]

import ipaddress
import re
import socket
import time
from dataclasses import dataclass, field, replace

from .. import log
from ..config import NextHop
from .conn import Conn, Disconnected, Timeout
from .parse import xtext_encode
from .replies import Reply

_log = log.get("relay")

_STATUS = re.compile(r"([245]\.\d{1,3}\.\d{1,3})\s+(.*)")
_XFORWARD_LINE = 400  # Postfix keeps XFORWARD lines well under the 512-octet command limit
LINE_LENGTH_LIMIT = 998  # RFC 5322 section 2.1.1; Postfix's smtp_line_length_limit
# The bytes a long-line check splits at once (and the builtin check lowercases at once): the
# copy it holds stays that small.
PRECHECK_MAX = 1 << 20
# Anchored at line starts: a search costs one pass over the data, not one per byte and line.
# Message data comes here with CRLF line ends only (conn.malformed refuses bare CR and LF).
_LONG_LINE = re.compile(rb"(?m)^[^\r\n]{%d,}" % (LINE_LENGTH_LIMIT + 1))


class RelayError(Exception):
    """The exchange failed before the server gave a final reply."""

    def __init__(self, stage: str, detail: str):
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail


class _Stale(Exception):
    """A cached connection turned out closed before any of the message was sent."""


def _network_error(exc: Exception) -> RelayError:
    """The connection's own exception (Timeout, Disconnected) as the RelayError the callers
    handle."""
    if isinstance(exc, Timeout):
        return RelayError("timeout", "no reply in time")
    return RelayError("lost connection", "server closed the connection")


@dataclass
class Outgoing:
    mail_from: str
    rcpts: list[str]
    data: bytes
    smtputf8: bool = False
    body_8bit: bool = False
    xforward: dict[str, str] = field(default_factory=dict)


@dataclass
class _Link:
    """One open connection that has been greeted (EHLO/LHLO) and is between transactions."""
    hop: NextHop
    conn: Conn
    extensions: dict[str, list[str]]
    opened: float
    idle_since: float = 0.0


def _quit(conn: Conn) -> None:
    try:
        conn.timeout = 1.0
        _command(conn, "QUIT")
        conn.flush()
    except (Timeout, Disconnected):
        pass
    conn.close()


class Cache:
    """Greeted connections kept between messages, per hop, in one process."""

    def __init__(self, time_limit: float, reuse_time_limit: float = 300.0, max_idle: int = 0):
        self.time_limit = time_limit  # longest idle time of a cached connection
        self.reuse_time_limit = reuse_time_limit  # a connection older than this is not cached
        self.max_idle = max_idle  # idle connections kept per hop; 0: no limit
        self.idle: dict[NextHop, list[_Link]] = {}

    def take(self, hop: NextHop) -> _Link | None:
        links = self.idle.get(hop)
        now = time.monotonic()
        while links:
            link = links.pop()
            if now - link.idle_since <= self.time_limit and _quiet(link.conn):
                return link
            _quit(link.conn)
        return None

    def put(self, link: _Link) -> None:
        now = time.monotonic()
        idle = self.idle.get(link.hop, ())
        if self.time_limit <= 0 or now - link.opened >= self.reuse_time_limit or \
                (self.max_idle and len(idle) >= self.max_idle):
            _quit(link.conn)
            return
        link.idle_since = now
        self.idle.setdefault(link.hop, []).append(link)

    def expire(self) -> None:
        """Close connections idle for longer than the time limit (call about once a second)."""
        now = time.monotonic()
        for links in self.idle.values():
            while links and now - links[0].idle_since > self.time_limit:
                _quit(links.pop(0).conn)

    def close(self) -> None:
        for links in self.idle.values():
            while links:
                _quit(links.pop().conn)


def _quiet(conn: Conn) -> bool:
    """True when an idle connection has neither been closed nor sent anything (a 421)."""
    try:
        return conn.wait_input(0) == 0
    except Disconnected:
        return False


def _left(deadline: float, timeout: float) -> float:
    left = min(timeout, deadline - time.monotonic())
    if left <= 0:
        raise Timeout()
    return left


_KNOWN: dict[bytes, tuple[Reply, list[str]]] = {}  # one-line replies seen before, parsed


def _read_reply(conn: Conn, deadline: float, timeout: float) -> tuple[Reply, list[str]]:
    conn.timeout = _left(deadline, timeout)
    first = conn.readline(4096)
    known = _KNOWN.get(first)  # ("250 2.1.0 Ok"); callers do not change the lines
    if known is not None:
        return known
    lines = []
    line = first
    while True:
        raw = line.decode("utf-8", "replace")
        if len(raw) < 3 or not raw[:3].isdigit() or raw[3:4] not in ("", " ", "-"):
            raise RelayError("reply", f"malformed reply {raw[:80]!r}")
        lines.append(raw[4:])
        if raw[3:4] != "-":
            break
        line = conn.readline(4096)
    text = lines[-1]
    match = _STATUS.fullmatch(text)
    status, text = (match.group(1), match.group(2)) if match else ("", text)
    reply = Reply(int(raw[:3]), status, text)
    if len(lines) == 1 and "\ufffd" not in raw:
        if len(_KNOWN) >= 256:  # replies that carry an id ("queued as X") come and go
            _KNOWN.clear()
        _KNOWN[first] = reply, lines
    return reply, lines


def _command(conn: Conn, line: str) -> None:
    conn.write((line + "\r\n").encode("utf-8", "surrogateescape"))


def _xforward_lines(attrs: dict[str, str]) -> list[str]:
    lines, current = [], "XFORWARD"
    for key, value in attrs.items():
        item = f" {key}={xtext_encode(value)}"
        if len(current) + len(item) > _XFORWARD_LINE and current != "XFORWARD":
            lines.append(current)
            current = "XFORWARD"
        current += item
    return lines + [current]


def _connect(hop: NextHop, timeout: float) -> socket.socket:
    """Connect without a resolver round trip when the host is an address literal (gevent
    would otherwise hand every lookup of "127.0.0.1" to its thread pool)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(hop.host).version == 6 \
            else socket.AF_INET
    except ValueError:
        return socket.create_connection((hop.host, hop.port), timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((hop.host, hop.port))
    except BaseException:
        sock.close()
        raise
    return sock


def _open(hop: NextHop, helo: str, timeouts, deadline: float) -> _Link:
    """Connect, read the banner and greet; RelayError on any failure."""
    try:
        sock = _connect(hop, _left(deadline, timeouts.connect))
    except (OSError, Timeout) as exc:
        raise RelayError("connect", getattr(exc, "strerror", None) or type(exc).__name__) \
            from None
    conn = Conn(sock, timeouts.greeting)
    try:
        banner, _ = _read_reply(conn, deadline, timeouts.greeting)
        if banner.code != 220:
            raise RelayError("greeting", f"server said {banner}")
        lmtp = hop.kind == "lmtp"
        _command(conn, f"{'LHLO' if lmtp else 'EHLO'} {helo}")
        reply, lines = _read_reply(conn, deadline, timeouts.mail)
        if not reply.ok and not lmtp:
            _command(conn, f"HELO {helo}")
            reply, lines = _read_reply(conn, deadline, timeouts.mail)
        if not reply.ok:
            raise RelayError("helo", f"server said {reply}")
    except (Timeout, Disconnected) as exc:
        conn.close()
        raise _network_error(exc) from None
    except BaseException:
        conn.close()
        raise
    extensions = {words[0].upper(): [w.upper() for w in words[1:]]
                  for words in (line.split() for line in lines[1:]) if words}
    return _Link(hop, conn, extensions, time.monotonic())


def fold(data: bytes) -> bytes:
    """Break lines over LINE_LENGTH_LIMIT octets with CRLF SPACE (Postfix: "to minimize the
    damage to MIME formatted mail"); each piece, its space included, fits the limit."""
    def cut(match: re.Match) -> bytes:
        line, first = match.group(), LINE_LENGTH_LIMIT
        rest = LINE_LENGTH_LIMIT - 1
        return b"\r\n ".join([line[:first]] + [line[i:i + rest]
                                               for i in range(first, len(line), rest)])
    return _LONG_LINE.sub(cut, data)


def _has_long_line(data: bytes) -> bool:
    """Whether a line is over LINE_LENGTH_LIMIT. Measured by splits at LF (a sixth of the
    regex's cost on ordinary mail, which has none), the regex looking only where one may be,
    in windows of PRECHECK_MAX that overlap by a line's limit and its CRLF: each line that
    starts in a window's own PRECHECK_MAX octets has its first LINE_LENGTH_LIMIT + 2 octets
    there, and a piece of another line is never longer than the line."""
    if len(data) <= LINE_LENGTH_LIMIT:
        return False
    for start in range(0, len(data), PRECHECK_MAX):
        window = data[start:start + PRECHECK_MAX + LINE_LENGTH_LIMIT + 2]
        if max(map(len, window.split(b"\n"))) > LINE_LENGTH_LIMIT and \
                _LONG_LINE.search(window) is not None:
            return True
    return False


def send(hop: NextHop, msg: Outgoing, *, helo: str, timeouts, deadline: float,
         cache: Cache | None = None, chunking: bool = False) -> list[Reply]:
    """Deliver `msg` to `hop`; one final Reply per recipient, in order. `chunking`: where an
    SMTP server offers CHUNKING and PIPELINING, the whole transaction is one write with the
    message in one `BDAT n LAST` (RFC 3030): no dot-stuffing, and one round trip less."""
    if _has_long_line(msg.data):
        msg = replace(msg, data=fold(msg.data))
    link = cache.take(hop) if cache is not None else None
    if link is not None:
        try:
            return _send_on(link, msg, timeouts, deadline, cache, True, chunking)
        except _Stale:
            pass  # the server closed it while it sat in the cache: nothing was sent
    return _send_on(_open(hop, helo, timeouts, deadline), msg, timeouts, deadline, cache,
                    False, chunking)


def _send_on(link: _Link, msg: Outgoing, timeouts, deadline: float, cache: Cache | None,
             reused: bool, chunking: bool) -> list[Reply]:
    clean = False
    try:
        try:
            finals, clean = _transaction(link, msg, timeouts, deadline, reused, chunking)
        except (Timeout, Disconnected) as exc:
            raise _network_error(exc) from None
        return finals
    finally:
        if clean and cache is not None:
            cache.put(link)
        elif clean:
            _quit(link.conn)
        else:
            link.conn.close()


def _transaction(link: _Link, msg: Outgoing, timeouts, deadline: float, reused: bool,
                 chunking: bool) -> tuple[list[Reply], bool]:
    """One mail transaction; the replies, and whether the connection may carry another."""
    conn, extensions = link.conn, link.extensions
    lmtp = link.hop.kind == "lmtp"
    chunking = chunking and not lmtp and "CHUNKING" in extensions and "PIPELINING" in extensions
    # Send only the attributes the server named: an unknown one would get 501 (XFORWARD_README).
    xforward = {key: value or "[UNAVAILABLE]" for key, value in msg.xforward.items()
                if key in extensions.get("XFORWARD", ())}
    params = ""
    if "SIZE" in extensions:
        params += f" SIZE={len(msg.data)}"
    if msg.body_8bit and "8BITMIME" in extensions:
        params += " BODY=8BITMIME"
    if msg.smtputf8 and "SMTPUTF8" in extensions:
        params += " SMTPUTF8"
    # RFC 2920: XFORWARD, MAIL, RCPT and DATA may go in one group; replies come back in order.
    steps = [(line, timeouts.mail) for line in _xforward_lines(xforward)] if xforward else []
    steps.append((f"MAIL FROM:<{msg.mail_from}>{params}", timeouts.mail))
    steps += [(f"RCPT TO:<{rcpt}>", timeouts.rcpt) for rcpt in msg.rcpts]
    data = msg.data
    if chunking:
        if data and not data.endswith(b"\r\n"):
            data += b"\r\n"
        steps.append((f"BDAT {len(data)} LAST", timeouts.data_done))
    else:
        steps.append(("DATA", timeouts.data_init))
    results: list[Reply] = []

    def read(timeout: float) -> Reply:
        """The next reply; on a reused connection a first 421 or none at all means stale."""
        try:
            reply = _read_reply(conn, deadline, timeout)[0]
        except Disconnected:
            if reused and not results:
                raise _Stale() from None
            raise
        if reused and not results and reply.code == 421:
            raise _Stale()
        results.append(reply)
        return reply

    if "PIPELINING" in extensions:
        for line, _ in steps:
            _command(conn, line)
        if chunking:
            conn.write(data)
        for _, timeout in steps:
            read(timeout)
    else:
        for line, timeout in steps:
            _command(conn, line)
            reply = read(timeout)
            if not reply.ok and (line.startswith(("MAIL", "DATA")) or
                                 line.startswith("XFORWARD") and reply.code == 421):
                break
    xforward_replies = results[:len(steps) - len(msg.rcpts) - 2]
    for reply in xforward_replies:
        if reply.code == 421:
            raise RelayError("xforward", f"server said {reply}")
        if not reply.ok:
            _log.warning("host %s said: %s (in reply to XFORWARD command)", link.hop, reply)
    results = results[len(xforward_replies):]
    mail_reply = results[0]
    if not mail_reply.ok:
        return [mail_reply] * len(msg.rcpts), False
    rcpt_replies, data_reply = results[1:1 + len(msg.rcpts)], results[-1]
    if chunking:  # the BDAT LAST reply is the final one for every accepted recipient
        return [data_reply if r.ok else r for r in rcpt_replies], any(r.ok for r in rcpt_replies)
    if data_reply.code != 354:
        return [r if not r.ok else data_reply for r in rcpt_replies], False
    accepted = [i for i, r in enumerate(rcpt_replies) if r.ok]
    conn.send_data(msg.data if accepted else b"", _left(deadline, timeouts.data_block))
    if not accepted:
        _read_reply(conn, deadline, timeouts.data_done)
        return rcpt_replies, False
    finals = rcpt_replies[:]
    first = None
    for index in accepted:
        if lmtp or first is None:
            first, _ = _read_reply(conn, deadline, timeouts.data_done)
        finals[index] = first
    return finals, True
