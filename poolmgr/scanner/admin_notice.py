"""The virus administrator's notice (amavisd's $virus_admin, `scanner.virus_admin`): one short
message for each message blocked as a virus or as banned, sent from the null sender through
`scanner.next_hop`.

Its subject is amavisd's, `INFECTED (NAME) in mail FROM <sender>` or `BANNED (PATH) in mail
FROM <sender>`; its body names the queue id, the action, the quarantine id, the client, the
envelope and the blocked message's From, Message-ID and Subject. A notice that cannot be
handed over is logged; the blocked message's fate does not depend on it. The notice has its
own time (`scanner.timeout` from when it is sent, as a sender's non-delivery notification
has), whatever the scan took. A builtin content rule's reject is no virus nor banned contents:
no notice (`announced`).
"""

__all__ = ["compose", "send", "announced"]

import email
import email.policy
import email.utils
import time

from .. import maildir
from ..smtp import relay
from ..smtp.headers import header_section
from ..smtp.parse import new_queue_id
from .backends.base import printable
from .verdict import Verdict

QUOTED_FIELDS = ("From", "Message-ID", "Subject")  # of the blocked message, in the body


def _visible(text: str) -> str:
    """One line: folding and control characters gone (a header value may carry them)."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def announced(verdict: Verdict) -> bool:
    """Whether the virus administrator hears of a message blocked with `verdict`: a virus or
    banned contents (banned.py), not a content rule's reject, which is of kind banned too but
    summarized `rejected (RULE)` (verdict.decide)."""
    return verdict.kind == "virus" or (verdict.kind == "banned"
                                       and verdict.summary.startswith("BANNED ("))


def compose(*, admin: str, hostname: str, notice_id: str, summary: str, outcome: str,
            queue_id: str, quarantine_id: str, client: str, sender: str, rcpts: list[str],
            data: bytes) -> bytes:
    """The notice (headers and body, CRLF lines)."""
    head = email.message_from_bytes(header_section(data), policy=email.policy.compat32)
    quoted = "".join(f"{name}: {_visible(str(head.get(name, '')))}\r\n"
                     for name in QUOTED_FIELDS if head.get(name) is not None)
    text = (f"From: \"Content-filter at {hostname}\" <postmaster@{hostname}>\r\n"
            f"To: <{admin}>\r\n"
            f"Subject: {printable(summary)} in mail FROM <{printable(sender)}>\r\n"
            f"Date: {email.utils.formatdate(localtime=True)}\r\n"
            f"Message-ID: <{notice_id}@{hostname}>\r\n"
            f"Auto-Submitted: auto-generated\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: 8bit\r\n"
            f"\r\n"
            f"A message was blocked: {_visible(summary)}\r\n"
            f"\r\n"
            f"Queue-ID: {queue_id}\r\n"
            f"Action: {outcome}\r\n"
            f"Quarantine: {quarantine_id or 'none'}\r\n"
            f"Client: {f'[{client}]' if client else 'unknown'}\r\n"
            f"Return-Path: <{sender}>\r\n"
            f"Recipients: {', '.join(f'<{r}>' for r in rcpts)}\r\n"
            f"{quoted}")
    return text.encode()


def send(cfg, *, summary: str, outcome: str, queue_id: str, quarantine_id: str, client: str,
         sender: str, rcpts: list[str], data: bytes, log,
         cache: relay.Cache | None = None) -> bool:
    """Compose the notice for cfg.scanner.virus_admin and hand it to the next hop; logged
    either way. Whether it was taken."""
    scanner = cfg.scanner
    admin, hop, notice_id = scanner.virus_admin, scanner.next_hop, new_queue_id()
    notice = compose(admin=admin, hostname=scanner.hostname, notice_id=notice_id,
                     summary=summary, outcome=outcome, queue_id=queue_id,
                     quarantine_id=quarantine_id, client=client, sender=sender, rcpts=rcpts,
                     data=data)
    try:
        if hop.kind == "maildir":
            where = maildir.deliver(hop.path, b"Return-Path: <>\r\n" + notice)
            reply = f"delivered to maildir as {where}"
        else:
            outgoing = relay.Outgoing("", [admin], notice, smtputf8=not admin.isascii(),
                                      body_8bit=not notice.isascii(),
                                      xforward={"IDENT": notice_id, "SOURCE": "LOCAL"})
            (answer,) = relay.send(hop, outgoing, helo=scanner.hostname, timeouts=cfg.timeouts,
                                   deadline=time.monotonic() + scanner.timeout, cache=cache)
            if not answer.ok:
                log.warning("%s: virus_admin notice to <%s> refused by %s: %s", queue_id,
                            admin, hop, answer)
                return False
            reply = f"relay={hop}, {answer}"
    except OSError as exc:
        log.warning("%s: virus_admin notice to <%s> failed: %s", queue_id, admin,
                    exc.strerror or exc)
        return False
    except relay.RelayError as exc:
        log.warning("%s: virus_admin notice to <%s> failed at %s: %s", queue_id, admin,
                    exc.stage, exc.detail)
        return False
    log.info("%s: virus_admin notice %s to <%s>: %s", queue_id, notice_id, admin, reply)
    return True
