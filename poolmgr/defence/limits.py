"""The limits inside the dialogue: errors and junk commands (Postfix's smtpd_soft/hard_error_
limit, smtpd_junk_command_limit), improper pipelining, the tarpit, per-client message and
recipient rates (anvil), the recipient table, relay control.

Each function takes the SMTP session (`smtp.front.FrontSession`) and works on its
`screening`; the session calls them from its hooks (screen, after_command, reply,
check_mail, check_rcpt).
"""

__all__ = ["screen", "after_command", "reply_delay", "check_mail", "check_rcpt"]

from ..smtp import replies as R
from ..smtp.parse import canonical, split_mailbox
from .networks import in_networks
from .verdicts import Reason

# Characters of a local part that route mail elsewhere: user%host (the percent hack),
# host!user (a UUCP bang path), "user@host" (a quoted @).
ROUTING_CHARACTERS = "%!@"


def screen(session, verb: str, command) -> R.Reply | None:
    """Before a command runs: a reply here refuses it."""
    screening = session.screening
    # Input after a command flagged `last` is improper pipelining (QUIT needs no answer;
    # input sent after STARTTLS is discarded, CVE-2011-0411, rather than refused).
    if not screening.trusted and (screening.early or (session.conn.buf and verb != "QUIT" and (
            (command and command.last) or session.helo is None or session.proto != "ESMTP"))):
        if _improper_pipelining(session, verb):
            return R.R503_PIPELINING
    if command and command.junk:
        screening.junk += 1
        if screening.junk > screening.junk_limit:
            screening.errors += 1
    return None


def _improper_pipelining(session, verb: str) -> bool:
    """Log improper pipelining; True when the command is to be refused (503 5.5.0)."""
    screening = session.screening
    early, screening.early = screening.early, False
    sample = session.conn.buf[:40].decode("ascii", "replace").rstrip()
    # smtpd's line; a client that talked before the banner is "after CONNECT".
    session.service.log.info("improper command pipelining after %s from %s: %s",
                             "CONNECT" if early else verb, session.client,
                             sample if not early else verb)
    screening.note(Reason.UNAUTH_PIPELINING)
    screening.suspect()
    return screening.cfg.reject_unauth_pipelining


def after_command(session) -> None:
    screening = session.screening
    if screening.errors >= screening.hard_limit and not session.closing and \
            not screening.trusted:
        session.service.log.info("too many errors after %s from %s", session.last_cmd,
                                 session.client)
        screening.note(Reason.BAD_RECIPIENTS if screening.bad_rcpts and not session.transactions
                       else Reason.JUNK_COMMANDS if screening.junk > screening.junk_limit
                       else Reason.HARD_ERRORS)
        session.closing, session.ended = True, "hard_errors"
        session.reply(R.R421_TOO_MANY_ERRORS.format(host=session.service.hostname))


def reply_delay(session, reply: R.Reply) -> float:
    """How long this reply waits: the tarpit for a suspicious client, the error sleep past
    soft_error_limit. Counts the error replies."""
    screening, d = session.screening, session.screening.cfg
    delay = d.tarpit_delay if screening.suspicious else 0.0
    if reply.code >= 400:
        screening.errors += 1
        if screening.errors > d.soft_error_limit and not screening.trusted:
            screening.suspect()
            delay = max(delay, d.error_sleep_time)
    return 0.0 if session.closing or reply.code in (421, 521) else delay


def _anvil_rate(session, limit: int, ask, what: str, refusal: R.Reply) -> R.Reply | None:
    screening = session.screening
    if not limit or screening.exempt or not session.service.rate_limited:
        return None
    rate = ask(session.peer[0])
    if rate is None or rate <= limit:
        return None
    session.service.log.warning("%s rate limit exceeded: %d from %s for service smtp", what,
                                rate, session.client)
    screening.note(Reason.RATE_LIMIT)
    return refusal.format(ip=session.peer[0])


def check_mail(session, address: str) -> R.Reply | None:
    anvil = session.service.anvil
    return _anvil_rate(session, session.screening.cfg.client_message_rate_limit,
                       anvil and anvil.message, "Message delivery request",
                       R.R450_MESSAGE_RATE)


def check_rcpt(session, address: str) -> R.Reply | None:
    service, screening = session.service, session.screening
    if screening.blocked:
        return screening.enforced()
    refusal = _anvil_rate(session, screening.cfg.client_recipient_rate_limit,
                          service.anvil and service.anvil.recipient, "Recipient address",
                          R.R450_RECIPIENT_RATE)
    if refusal is not None:
        return refusal
    local, domain = split_mailbox(address)
    trusted = in_networks(session.peer[0], service.cfg.smtp.mynetworks)
    # Postfix's allow_untrusted_routing = no: a next hop that rewrites the percent hack, a
    # bang path or a quoted @ (Postfix does, by default) would relay for an untrusted client.
    if not trusted and (any(c in local for c in ROUTING_CHARACTERS) or
                        (not domain and local.lower() != "postmaster")):
        screening.note(Reason.RELAY_DENIED)
        return R.R554_RELAY_DENIED.format(rcpt=address)
    if service.recipients is not None and \
            service.recipients.verdict(canonical(address)) is False:
        screening.bad_rcpts += 1
        return R.R550_UNKNOWN_USER.format(rcpt=address)
    if not domain or domain in service.mydestination or trusted:
        return None
    screening.note(Reason.RELAY_DENIED)  # Postfix's reject_unauth_destination
    return R.R554_RELAY_DENIED.format(rcpt=address)
