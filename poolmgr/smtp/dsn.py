"""Nothing silently lost on mixed results: the delivery status notification (amavisd's way).

When the next hop accepts a message for some recipients and permanently refuses it for
others, an SMTP client can be given only one reply for the whole message. `settle` then sends
the envelope sender a non-delivery notification (RFC 3464 `multipart/report`, `MAIL FROM:<>`)
naming the refused recipients, through the same next hop, and reports success for them: the
sender is told, as a queueing MTA would tell them. No notification goes to the null sender
(logged instead, as Postfix logs an undeliverable bounce); when the notification cannot be
handed over, the whole message is answered 4xx, so the sender retries: a duplicate for the
accepted recipients is better than a loss. An LMTP client gets per-recipient replies instead
and never reaches this module.
"""

__all__ = ["settle", "report", "mixed"]

import email.utils
import time

from ..config import NextHop
from . import relay
from . import replies as R
from .headers import header_section
from .parse import new_queue_id

BOUNDARY_PREFIX = "poolmgr-dsn"


def mixed(replies: list[R.Reply]) -> bool:
    """Accepted beside permanent refusals, and nothing temporary (a 4xx is retried whole)."""
    return (any(r.ok for r in replies) and any(r.code >= 500 for r in replies)
            and not any(r.temporary for r in replies))


def _address_type(address: str) -> str:
    return "rfc822" if address.isascii() else "utf-8"  # RFC 6533 for SMTPUTF8 addresses


def report(*, hostname: str, queue_id: str, sender: str, refused: list[tuple[str, R.Reply]],
           remote: str, headers: bytes, arrival: float) -> tuple[bytes, str]:
    """The notification message (headers and body, CRLF lines) and its own queue id."""
    dsn_id = new_queue_id()
    boundary = f"{dsn_id}.{BOUNDARY_PREFIX}/{hostname}"
    human = "".join(f"<{rcpt}>: host {remote} said: {reply}\r\n" for rcpt, reply in refused)
    per_recipient = "".join(
        f"\r\nFinal-Recipient: {_address_type(rcpt)}; {rcpt}\r\n"
        f"Original-Recipient: {_address_type(rcpt)}; {rcpt}\r\n"
        f"Action: failed\r\n"
        f"Status: {reply.status or '5.0.0'}\r\n"
        f"Remote-MTA: dns; {remote}\r\n"
        f"Diagnostic-Code: smtp; {reply}\r\n" for rcpt, reply in refused)
    text = (
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)\r\n"
        f"To: <{sender}>\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {email.utils.formatdate(localtime=True)}\r\n"
        f"Message-ID: <{dsn_id}@{hostname}>\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f"\tboundary=\"{boundary}\"\r\n"
        f"\r\n"
        f"This is a MIME-encapsulated message.\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Notification\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"\r\n"
        f"This is the mail system at host {hostname}.\r\n"
        f"\r\n"
        f"I'm sorry to have to inform you that your message could not\r\n"
        f"be delivered to one or more recipients. It's attached below.\r\n"
        f"It was delivered to the other recipients.\r\n"
        f"\r\n"
        f"{human}"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Delivery report\r\n"
        f"Content-Type: message/delivery-status\r\n"
        f"\r\n"
        f"Reporting-MTA: dns; {hostname}\r\n"
        f"X-Poolmgr-Queue-ID: {queue_id}\r\n"
        f"X-Postfix-Sender: {_address_type(sender)}; {sender}\r\n"
        f"Arrival-Date: {email.utils.formatdate(arrival, localtime=True)}\r\n"
        f"{per_recipient}"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Undelivered Message Headers\r\n"
        f"Content-Type: text/rfc822-headers\r\n"
        f"\r\n")
    return (text.encode("utf-8", "surrogateescape") + headers
            + f"\r\n--{boundary}--\r\n".encode()), dsn_id


def settle(replies: list[R.Reply], *, hop: NextHop, mail_from: str, rcpts: list[str],
           queue_id: str, data: bytes, smtputf8: bool, hostname: str, timeouts,
           deadline: float, log, cache: relay.Cache | None = None,
           arrival: float | None = None) -> list[R.Reply]:
    """The replies an SMTP client is to get for a message `hop` answered with `replies`."""
    if not mixed(replies):
        return replies
    accepted = next(reply for reply in replies if reply.ok)
    refused = [(rcpt, reply) for rcpt, reply in zip(rcpts, replies) if not reply.ok]
    if not mail_from:
        log.info("%s: no sender non-delivery notification for %s: the sender is null",
                 queue_id, ",".join(f"<{rcpt}>" for rcpt, _ in refused))
        return [reply if reply.ok else accepted for reply in replies]
    message, dsn_id = report(hostname=hostname, queue_id=queue_id, sender=mail_from,
                             refused=refused, remote=str(hop.host) if hop.host else str(hop),
                             headers=header_section(data),
                             arrival=arrival if arrival is not None else time.time())
    outgoing = relay.Outgoing("", [mail_from], message, smtputf8=smtputf8 or not
                              mail_from.isascii(), body_8bit=not message.isascii(),
                              xforward={"IDENT": dsn_id, "SOURCE": "LOCAL"})
    try:
        (reply,) = relay.send(hop, outgoing, helo=hostname, timeouts=timeouts,
                              deadline=deadline, cache=cache)
    except relay.RelayError as exc:
        reply = R.Reply(451, "4.4.1", f"next hop failed at {exc.stage}: {exc.detail}")
    if not reply.ok:
        log.warning("%s: sender non-delivery notification to <%s> failed: %s; the message "
                    "is deferred as a whole", queue_id, mail_from, reply)
        return [R.R451_DSN_FAILED] * len(replies)
    log.info("%s: sender non-delivery notification: %s", queue_id, dsn_id)
    return [reply if reply.ok else accepted for reply in replies]
