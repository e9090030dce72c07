"""The rspamd check (`rspamd` in scanner.checks): the message POSTed to rspamd's normal worker at
/checkv2, its envelope in request headers, the JSON answer read into a Result.

rspamd's protocol (https://rspamd.com/doc/developers/protocol.html): plain HTTP/1.x; the
envelope goes in the headers IP, From, Rcpt (one per recipient), Helo, Queue-Id and Hostname
(the client's name as the SMTP pool or Postfix looked it up, `unknown` when it has none; left
out when no lookup was made); the answer is a JSON object with `score`, `required_score`,
`action` and `symbols` (symbol name -> details). Blocking `http.client`: scanner workers are
plain processes. The back-end's timeout bounds each wait (connect, send, each read), as in
the other back-ends' sockets.

With `use_action` (the default) rspamd's action decides, mapped as Haraka's rspamd plugin
maps it (`DECISIONS`): reject -> the spam_killed path, soft reject and greylist -> 451 4.7.1
with rspamd's `messages.smtp_message`, rewrite subject -> tagged with the `subject` rspamd
returns, add header -> tagged, no action -> clean. Either way the header edits rspamd asks of
an MTA are kept for the delivered message (`edits`): `milter.remove_headers` then
`milter.add_headers`, at the positions rspamd gives (as rspamd's own milter applies them),
and its `dkim-signature` at the top.
"""

__all__ = ["Backend", "ask", "result", "request_headers", "edits", "DECISIONS"]

import http.client
import json
import math
import urllib.parse

from ...smtp.headers import Insertion, Removal
from .base import Check, CheckFailed, Message, Result, printable

# rspamd's answer is a few kB (one entry per symbol that hit); far more is not rspamd.
MAX_ANSWER = 1 << 20
# rspamd's actions in the verdict's terms (Result.decision). Others (discard, quarantine, a
# site's own) leave the decision to the spam levels.
DECISIONS = {"reject": "kill", "soft reject": "defer", "greylist": "defer",
             "rewrite subject": "tag", "add header": "tag", "no action": "clean"}

def request_headers(message: Message) -> list[tuple[str, bytes]]:
    """The /checkv2 request headers that carry the envelope, in order (Rcpt repeats)."""
    headers = [("IP", message.client_addr), ("From", message.sender or "<>")]
    headers += [("Rcpt", rcpt) for rcpt in message.rcpts]
    headers += [("Helo", message.helo), ("Queue-Id", message.queue_id),
                ("Hostname", message.client_name)]
    # The null sender is "<>" as in MAIL FROM; any other empty value means unknown, which
    # rspamd reads from an absent header. SMTPUTF8 addresses go as UTF-8, as they came:
    # rspamd 3.4 cannot parse them and takes that address as unknown, which is no failure.
    return [(name, value.encode()) for name, value in headers if value]


def _target(url: str) -> tuple[type[http.client.HTTPConnection], str, int, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected http://host:port")
    path = parts.path.rstrip("/") + "/checkv2"
    if parts.scheme == "https":
        return http.client.HTTPSConnection, parts.hostname, parts.port or 443, path
    return http.client.HTTPConnection, parts.hostname, parts.port or 80, path


def ask(url: str, timeout: float, message: Message) -> dict:
    """rspamd's parsed /checkv2 answer for `message`; CheckFailed when there is none."""
    try:
        connection, host, port, path = _target(url)
    except ValueError as exc:
        raise CheckFailed("rspamd", f"bad url {printable(url)!r}: {exc}") from None
    conn = connection(host, port, timeout=timeout)
    try:
        try:
            conn.connect()
        except OSError as exc:
            raise CheckFailed("rspamd", f"connect to {host}:{port}: "
                                        f"{exc.strerror or _reason(exc, timeout)}") from None
        try:
            conn.putrequest("POST", path, skip_accept_encoding=True)
            for name, value in request_headers(message):
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(message.data)))
            conn.endheaders(message.data)
            response = conn.getresponse()
            body = response.read(MAX_ANSWER + 1)
        except ValueError as exc:  # http.client refuses a header value with CR or LF in it
            raise CheckFailed("rspamd", f"cannot send the request: {printable(str(exc))}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise CheckFailed("rspamd", f"no answer from {host}:{port}: "
                                        f"{_reason(exc, timeout)}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise CheckFailed("rspamd", f"HTTP {response.status} {printable(response.reason)}"
                                    f"{_error_text(body)}")
    if len(body) > MAX_ANSWER:
        raise CheckFailed("rspamd", f"answer longer than {MAX_ANSWER} bytes")
    try:
        answer = json.loads(body)
    except ValueError:
        raise CheckFailed("rspamd", "answer is not JSON") from None
    if not isinstance(answer, dict):
        raise CheckFailed("rspamd", "answer is not a JSON object")
    return answer


def _reason(exc: Exception, timeout: float) -> str:
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since 3.10
        return f"no answer within {timeout:g}s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _error_text(body: bytes) -> str:
    """rspamd's own reason for an error status (`{"error": "..."}`), when it gave one."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return ""
    return f": {printable(error)}" if isinstance(error, str) and error else ""


def result(answer: dict, use_action: bool = True) -> Result:
    """The Result of a /checkv2 answer; CheckFailed when a field is missing or mistyped."""
    try:
        score = float(answer["score"])
        required = float(answer["required_score"])
        action = answer["action"]
        symbols = answer.get("symbols") or {}
        if not isinstance(action, str) or not isinstance(symbols, dict) or \
                not math.isfinite(score) or not math.isfinite(required):
            raise TypeError
    except (KeyError, TypeError, ValueError, OverflowError):
        raise CheckFailed("rspamd", "answer lacks score, required_score, action "
                                    "or symbols") from None
    decision = DECISIONS.get(action, "") if use_action else ""
    messages = answer.get("messages")
    text = messages.get("smtp_message") if isinstance(messages, dict) else None
    subject = _text(answer.get("subject")) if action == "rewrite subject" else None
    return Result("rspamd", score=score, required=required,
                  tests=tuple(sorted(printable(name) for name in symbols)),
                  action=printable(action), decision=decision,
                  reply_text=printable(text) if isinstance(text, str) else "",
                  subject=subject if decision == "tag" and subject else "", edits=edits(answer))


def _text(value) -> str | None:
    """A string of the answer that can go into a message (JSON can carry lone surrogates,
    which no header can); None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def edits(answer: dict) -> tuple:
    """The header edits a /checkv2 answer asks for, in the order rspamd's milter makes them:
    `milter.remove_headers` ({name: index}), `milter.add_headers` ({name: value, or {value,
    order}, or a list of those}; no order appends), then each `dkim-signature` at the top, in
    its order. Entries of another shape are ignored, as rspamd's milter ignores them."""
    found = []
    milter = answer.get("milter")
    if isinstance(milter, dict):
        removals = milter.get("remove_headers")
        if isinstance(removals, dict):
            found += [Removal(name, index) for name, index in removals.items()
                      if type(index) is int and _text(name)]
        additions = milter.get("add_headers")
        if isinstance(additions, dict):
            for name, values in additions.items():
                for value in values if isinstance(values, list) else [values]:
                    if not _text(name):
                        break
                    if _text(value) is not None:
                        found.append(Insertion(name, value))
                    elif isinstance(value, dict) and _text(value.get("value")) is not None:
                        order = value.get("order", value.get("index"))
                        found.append(Insertion(name, value["value"],
                                               order if type(order) is int else None))
    signatures = answer.get("dkim-signature")
    if isinstance(signatures, str):
        signatures = [signatures]
    if isinstance(signatures, list):
        found += [Insertion("DKIM-Signature", signature, i) for i, signature in
                  enumerate(s for s in signatures if _text(s) is not None)]
    return tuple(found)


class Backend(Check):
    name = "rspamd"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.url: str = cfg.scanner.rspamd.url
        self.use_action: bool = cfg.scanner.rspamd.use_action

    def check(self, message: Message) -> Result:
        return result(ask(self.url, self.timeout, message), self.use_action)
