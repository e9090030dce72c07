"""Trace headers: the Received: line each hop adds (RFC 5321 section 4.4).

Exports: received.
"""

import email.utils

HELO_MAX = 255  # RFC 1035 section 2.3.4: a domain name has at most 255 octets


def received(*, helo: str | None, addr: str, by: str, software: str, proto: str,
             queue_id: str, rcpts: list[str]) -> bytes:
    """`Received: from helo (unknown [addr]) by host (software) with ESMTP id X for <r>; date`."""
    literal = f"IPv6:{addr}" if ":" in addr else addr
    lines = [f"Received: from {_printable(helo or 'unknown')} (unknown [{literal}])",
             f"\tby {by} ({software}) with {proto} id {queue_id}"]
    date = email.utils.formatdate(localtime=True)
    if len(rcpts) == 1:
        lines.append(f"\tfor <{rcpts[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def _printable(text: str, limit: int = HELO_MAX) -> str:
    """Client text fit for a header: printable ASCII, at most `limit` characters, so the
    header line stays within RFC 5322's 998 octets whatever the client sent."""
    return "".join(c if " " < c < "\x7f" else "?" for c in text[:limit])
