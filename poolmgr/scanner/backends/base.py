"""What every check back-end shares: the message it is shown (and its MIME parts, for the
checks that take it apart), the result it gives, the failure it raises, and the connection to
a daemon.

A back-end is a `Check`: a name, a timeout, what to do when it fails (`on_failure`: tempfail or
pass), and `check(message) -> Result`. A back-end that cannot give an answer (daemon down,
timeout, a reply it cannot read) raises `CheckFailed`; the scanner applies `on_failure`.
"""

__all__ = ["Message", "Result", "Check", "CheckFailed", "connect", "printable", "leaf_parts",
           "TooDeep", "MIME_NESTING_LIMIT", "TOO_DEEP"]

import email
import email.policy
import socket
import sys
from dataclasses import dataclass

from ...config import parse_address


@dataclass(frozen=True)
class Message:
    """One message as the checks see it: the data as received (headers and body, CRLF lines,
    before the scanner adds its own headers) and its envelope."""
    data: bytes
    queue_id: str
    sender: str
    rcpts: tuple[str, ...]
    client_addr: str   # the real client (XFORWARD ADDR), else the scanner's direct peer
    client_name: str   # XFORWARD NAME, "" when unknown
    helo: str


# Postfix's mime_nesting_limit: multiparts nested deeper are not taken apart. The standard
# library's parser recurses once a level (a frame or two) and, left to Python's recursion
# limit, would spend seconds on a message nested a thousand deep before it gave up: it is
# given PARSE_FRAMES frames more than it has, so a hostile nest costs a tenth of a second.
MIME_NESTING_LIMIT = 100
PARSE_FRAMES = 4 * MIME_NESTING_LIMIT
TOO_DEEP = "MIME nesting exceeds safety limit"  # Postfix's words, as the banned part


class TooDeep(Exception):
    """The message's multiparts nest deeper than MIME_NESTING_LIMIT: hostile, or broken
    beyond checking (banned contents, as Postfix would reject it)."""


def leaf_parts(data: bytes):
    """The message parsed by the standard library's `email` (compat32) and its parts that are
    not multiparts, in order; TooDeep when they nest deeper than MIME_NESTING_LIMIT."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(min(limit, _depth() + PARSE_FRAMES))
    try:
        message = email.message_from_bytes(data, policy=email.policy.compat32)
    except RecursionError:
        raise TooDeep(TOO_DEEP) from None
    finally:
        sys.setrecursionlimit(limit)
    leaves, todo = [], [(message, 0)]
    while todo:  # message.walk() recurses once a level too
        part, depth = todo.pop()
        if not part.is_multipart():
            leaves.append(part)
        elif depth >= MIME_NESTING_LIMIT:
            raise TooDeep(TOO_DEEP)
        else:
            todo.extend((inner, depth + 1) for inner in reversed(part.get_payload()))
    return message, leaves


def _depth() -> int:
    """Frames on the stack now."""
    frame, depth = sys._getframe(1), 1
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


@dataclass(frozen=True)
class Result:
    """What one back-end found. Empty fields mean nothing found."""
    check: str                        # the back-end's name
    virus: str = ""                   # a virus name (clamd, builtin's EICAR)
    score: float | None = None        # a spam score (spamd, rspamd)
    required: float | None = None     # the back-end's own spam threshold, for the header
    tests: tuple[str, ...] = ()       # rule or symbol names that hit
    action: str = ""                  # rspamd's recommended action
    rule: str = ""                    # builtin: a rule whose action is reject
    banned: str = ""                  # banned contents (scanner/banned.py), amavisd's path
    skipped: str = ""                 # why the message was not checked (too big), logged
    # A back-end that judges the message itself (rspamd's action) says so here, in the
    # verdict's terms: "clean", "tag", "kill" or "defer"; "" lets the spam levels decide.
    decision: str = ""
    reply_text: str = ""              # its text for the defer reply (rspamd's smtp_message)
    subject: str = ""                 # the Subject it asks for, whole (rspamd's rewrite)
    edits: tuple = ()                 # the header edits it asks for (smtp.headers Removal,
    #                                   Insertion), applied in order to a delivered message


MAX_DETAIL = 200  # how much of a daemon's text a CheckFailed detail (and the log) carries


def printable(text: bytes | str) -> str:
    """A daemon's text fit for a detail and a log line: printable ASCII on one line ('?' for
    anything else), cut at MAX_DETAIL characters."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    clean = "".join(c if " " <= c <= "~" else "?" for c in text.strip())
    return clean if len(clean) <= MAX_DETAIL else clean[:MAX_DETAIL] + "..."


class CheckFailed(Exception):
    """The back-end gave no usable answer."""

    def __init__(self, check: str, detail: str):
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail


class Check:
    name = ""

    def __init__(self, cfg):
        section = getattr(cfg.scanner, self.name, None)
        self.timeout: float = getattr(section, "timeout", 30.0)
        self.on_failure: str = getattr(section, "on_failure", "tempfail")

    def check(self, message: Message) -> Result:
        raise NotImplementedError


def connect(address: str, timeout: float, check: str) -> socket.socket:
    """A connected blocking socket to `unix:/path` or `host:port` ([v6]:port); CheckFailed
    when the daemon cannot be reached."""
    try:
        if address.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = address[5:]
        else:
            host, port = parse_address(address)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                 socket.SOCK_STREAM)
            target = (host, port)
    except ValueError as exc:
        raise CheckFailed(check, f"bad address {address!r}: {exc}") from None
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError as exc:
        sock.close()
        raise CheckFailed(check, f"connect to {address}: "
                                 f"{exc.strerror or type(exc).__name__}") from None
    return sock
