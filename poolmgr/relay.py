"""SMTP/LMTP client for the hand-off to the scanner pool and the re-injection to the next hop.

One connection per message: banner, EHLO (LHLO for LMTP), XFORWARD when the server offers it
(Postfix's XFORWARD_README), MAIL/RCPT/DATA pipelined when PIPELINING is offered, the data
dot-stuffed, then the final reply: one for SMTP, one per accepted recipient for LMTP. Every
step has its RFC 5321 section 4.5.3.2 timeout (config [timeouts]) and the whole exchange is
bounded by `deadline`. Any network failure raises `RelayError` so the caller can answer 4xx:
a message is never reported accepted unless the server said so.

Works on blocking sockets (scanner workers) and gevent sockets (SMTP workers).

Exports: send, RelayError, Outgoing.
"""

import re
import socket
import time
from dataclasses import dataclass, field

from .config import NextHop
from .smtp.conn import Conn, Disconnected, Timeout
from .smtp.parse import xtext_encode
from .smtp.replies import Reply

_STATUS = re.compile(r"([245]\.\d{1,3}\.\d{1,3})\s+(.*)")
_XFORWARD_LINE = 400  # Postfix keeps XFORWARD lines well under the 512-octet command limit


class RelayError(Exception):
    """The exchange failed before the server gave a final reply."""

    def __init__(self, stage: str, detail: str):
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail


@dataclass
class Outgoing:
    mail_from: str
    rcpts: list[str]
    data: bytes
    smtputf8: bool = False
    body_8bit: bool = False
    xforward: dict[str, str] = field(default_factory=dict)


def _left(deadline: float, timeout: float) -> float:
    left = min(timeout, deadline - time.monotonic())
    if left <= 0:
        raise Timeout()
    return left


def _read_reply(conn: Conn, deadline: float, timeout: float) -> tuple[Reply, list[str]]:
    conn.timeout = _left(deadline, timeout)
    lines = []
    while True:
        raw = conn.readline(4096).decode("utf-8", "replace")
        if len(raw) < 3 or not raw[:3].isdigit() or raw[3:4] not in ("", " ", "-"):
            raise RelayError("reply", f"malformed reply {raw[:80]!r}")
        lines.append(raw[4:])
        if raw[3:4] != "-":
            break
    text = lines[-1]
    match = _STATUS.fullmatch(text)
    status, text = (match.group(1), match.group(2)) if match else ("", text)
    return Reply(int(raw[:3]), status, text), lines


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


def send(hop: NextHop, msg: Outgoing, *, helo: str, timeouts, deadline: float) -> list[Reply]:
    """Deliver `msg` to `hop`; one final Reply per recipient, in order."""
    stage = "connect"
    try:
        sock = socket.create_connection((hop.host, hop.port), _left(deadline, timeouts.connect))
    except (OSError, Timeout) as exc:
        raise RelayError(stage, getattr(exc, "strerror", None) or type(exc).__name__) from None
    conn = Conn(sock, timeouts.greeting)
    try:
        stage = "greeting"
        banner, _ = _read_reply(conn, deadline, timeouts.greeting)
        if banner.code != 220:
            raise RelayError(stage, f"server said {banner}")
        return _transaction(conn, hop, msg, helo, timeouts, deadline)
    except Timeout:
        raise RelayError("timeout", "no reply in time") from None
    except Disconnected:
        raise RelayError("lost connection", "server closed the connection") from None
    finally:
        conn.close()


def _transaction(conn: Conn, hop: NextHop, msg: Outgoing, helo: str, timeouts,
                 deadline: float) -> list[Reply]:
    lmtp = hop.kind == "lmtp"
    _command(conn, f"{'LHLO' if lmtp else 'EHLO'} {helo}")
    reply, lines = _read_reply(conn, deadline, timeouts.mail)
    if not reply.ok and not lmtp:
        _command(conn, f"HELO {helo}")
        reply, lines = _read_reply(conn, deadline, timeouts.mail)
    if not reply.ok:
        raise RelayError("helo", f"server said {reply}")
    extensions = {words[0].upper(): [w.upper() for w in words[1:]]
                  for words in (line.split() for line in lines[1:]) if words}
    # Send only the attributes the server named: an unknown one would get 501 (XFORWARD_README).
    xforward = {key: value or "[UNAVAILABLE]" for key, value in msg.xforward.items()
                if key in extensions.get("XFORWARD", ())}
    if xforward:
        for line in _xforward_lines(xforward):
            _command(conn, line)
            reply, _ = _read_reply(conn, deadline, timeouts.mail)
            if not reply.ok:
                raise RelayError("xforward", f"server said {reply}")
    params = ""
    if "SIZE" in extensions:
        params += f" SIZE={len(msg.data)}"
    if msg.body_8bit and "8BITMIME" in extensions:
        params += " BODY=8BITMIME"
    if msg.smtputf8 and "SMTPUTF8" in extensions:
        params += " SMTPUTF8"
    pipelining = "PIPELINING" in extensions
    # RFC 2920: MAIL, RCPT and DATA may go in one group; replies come back in order.
    steps = [(f"MAIL FROM:<{msg.mail_from}>{params}", timeouts.mail)]
    steps += [(f"RCPT TO:<{rcpt}>", timeouts.rcpt) for rcpt in msg.rcpts]
    steps.append(("DATA", timeouts.data_init))
    results = []
    if pipelining:
        for line, _ in steps:
            _command(conn, line)
        results = [_read_reply(conn, deadline, timeout)[0] for _, timeout in steps]
    else:
        for line, timeout in steps:
            _command(conn, line)
            results.append(_read_reply(conn, deadline, timeout)[0])
            if line.startswith("MAIL") and not results[-1].ok:
                return [results[-1]] * len(msg.rcpts)
            if line == "DATA" and not results[-1].ok:
                break
    mail_reply, rcpt_replies, data_reply = results[0], results[1:-1], results[-1]
    if not mail_reply.ok:
        return [mail_reply] * len(msg.rcpts)
    accepted = [i for i, r in enumerate(rcpt_replies) if r.ok]
    if data_reply.code != 354:
        return [r if not r.ok else data_reply for r in rcpt_replies]
    conn.send_data(msg.data if accepted else b"", _left(deadline, timeouts.data_block))
    if not accepted:
        _read_reply(conn, deadline, timeouts.data_done)
        return rcpt_replies
    finals = rcpt_replies[:]
    first = None
    for index in accepted:
        if lmtp or first is None:
            first, _ = _read_reply(conn, deadline, timeouts.data_done)
        finals[index] = first
    try:
        _command(conn, "QUIT")
        conn.flush()
    except (Timeout, Disconnected):
        pass
    return finals
