"""The limits inside the dialogue: errors and junk commands (Postfix's smtpd_soft/hard_error_
limit, smtpd_junk_command_limit), improper pipelining, the tarpit, per-client message and
recipient rates (anvil), a client whose address has no name (Postfix's
reject_unknown_reverse_client_hostname), the recipient table, relay control.

Each function takes the session's defence state (`screening.Screening`) and what it reads
(the worker's `service`, the client, the command, the input waiting), and returns a
`decision.Decision` or None; the session engine (`smtp.front.FrontSession`) applies it:

- `screen`, before a command runs: a reply refuses the command (503 for improper pipelining);
- `check_mail`, `check_rcpt`: a reply refuses MAIL or RCPT (and is logged `NOQUEUE: reject`);
- `after_command`: too many errors: 421 and close;
- `before_reply`, before each reply: the tarpit or the error sleep (`Decision.delay`);
- `delivered`, after a message was accepted: the error counts start again;
- `closed`, when the session has ended: its anvil connection let go, the DICTIONARY verdict.
"""

__all__ = ["screen", "after_command", "before_reply", "check_mail", "check_rcpt",
           "unknown_reverse_client", "delivered",
           "closed"]

from ..smtp import replies as R
from ..smtp.parse import canonical, split_mailbox
from .decision import Decision, combine
from .networks import in_networks
from .peername import UNKNOWN
from .verdicts import Reason


# Characters of a local part that route mail elsewhere: user%host (the percent hack),
# host!user (a UUCP bang path), "user@host" (a quoted @).
ROUTING_CHARACTERS = "%!@"


def screen(screening, log, client: str, verb: str, command, helo: str | None, proto: str,
           pending: bytes) -> Decision | None:
    """Before a command runs; `pending` is the input that came after it (pipelined)."""
    # Input after a command flagged `last` is improper pipelining (QUIT needs no answer;
    # input sent after STARTTLS is discarded, CVE-2011-0411, rather than refused).
    suspect = None
    if not screening.trusted and (screening.early or (pending and verb != "QUIT" and (
            (command and command.last) or helo is None or proto != "ESMTP"))):
        suspect = _improper_pipelining(screening, log, client, verb, pending)
        if screening.cfg.reject_unauth_pipelining:
            return combine(suspect, Decision.answer(R.R503_PIPELINING))
    if command and command.junk:
        screening.junk += 1
        if screening.junk > screening.junk_limit:
            screening.errors += 1
    return suspect


def _improper_pipelining(screening, log, client: str, verb: str, pending: bytes) -> Decision:
    """Log improper pipelining; the client is a suspect from now on."""
    early, screening.early = screening.early, False
    sample = pending[:40].decode("ascii", "replace").rstrip()
    # smtpd's line; a client that talked before the banner is "after CONNECT".
    log.info("improper command pipelining after %s from %s: %s",
             "CONNECT" if early else verb, client, sample if not early else verb)
    screening.note(Reason.UNAUTH_PIPELINING)
    return screening.suspect()


def after_command(screening, log, client: str, last_cmd: str, transactions: int,
                  closing: bool, hostname: str) -> Decision | None:
    """After a command ran: past hard_error_limit, 421 and close (Postfix's "too many
    errors")."""
    if screening.errors >= screening.hard_limit and not closing and not screening.trusted:
        log.info("too many errors after %s from %s", last_cmd, client)
        screening.note(Reason.BAD_RECIPIENTS if screening.bad_rcpts and not transactions
                       else Reason.JUNK_COMMANDS if screening.junk > screening.junk_limit
                       else Reason.HARD_ERRORS)
        return Decision.refuse(R.R421_TOO_MANY_ERRORS.format(host=hostname), "hard_errors")
    return None


def before_reply(screening, reply: R.Reply, closing: bool) -> Decision | None:
    """How long this reply waits: the tarpit for a suspicious client, the error sleep past
    soft_error_limit (which makes the client a suspect). Counts the error replies."""
    d, suspect = screening.cfg, None
    delay = d.tarpit_delay if screening.suspicious else 0.0
    if reply.code >= 400:
        screening.errors += 1
        if screening.errors > d.soft_error_limit and not screening.trusted:
            suspect = screening.suspect()
            delay = max(delay, d.error_sleep_time)
    if not delay or closing or reply.code in (421, 521):  # the common case: nothing to do
        return suspect
    return Decision(delay=delay, timeout=suspect.timeout if suspect is not None else 0.0)


def _anvil_rate(screening, service, peer: tuple, client: str, limit: int, ask, what: str,
                refusal: R.Reply) -> Decision | None:
    if not limit or screening.exempt or not service.rate_limited:
        return None
    rate = ask(peer[0])
    if rate is None or rate <= limit:
        return None
    service.log.warning("%s rate limit exceeded: %d from %s for service smtp", what, rate,
                        client)
    screening.note(Reason.RATE_LIMIT)
    return Decision.answer(refusal.format(ip=peer[0]))


def check_mail(screening, service, peer: tuple, client: str,
               address: str) -> Decision | None:
    anvil = service.anvil
    return _anvil_rate(screening, service, peer, client, screening.cfg.client_message_rate_limit,
                       anvil and anvil.message, "Message delivery request",
                       R.R450_MESSAGE_RATE)


def check_rcpt(screening, service, peer: tuple, client: str,
               address: str) -> Decision | None:
    if screening.blocked:
        return Decision.answer(screening.enforced())
    refusal = _anvil_rate(screening, service, peer, client,
                          screening.cfg.client_recipient_rate_limit,
                          service.anvil and service.anvil.recipient, "Recipient address",
                          R.R450_RECIPIENT_RATE)
    if refusal is not None:
        return refusal
    refusal = unknown_reverse_client(screening, peer[0])
    if refusal is not None:
        return refusal
    local, domain = split_mailbox(address)
    trusted = in_networks(peer[0], service.cfg.smtp.mynetworks)
    # Postfix's allow_untrusted_routing = no: a next hop that rewrites the percent hack, a
    # bang path or a quoted @ (Postfix does, by default) would relay for an untrusted client.
    if not trusted and (any(c in local for c in ROUTING_CHARACTERS) or
                        (not domain and local.lower() != "postmaster")):
        screening.note(Reason.RELAY_DENIED)
        return Decision.answer(R.R554_RELAY_DENIED.format(rcpt=address))
    if service.recipients is not None and \
            service.recipients.verdict(canonical(address)) is False:
        screening.bad_rcpts += 1
        return Decision.answer(R.R550_UNKNOWN_USER.format(rcpt=address))
    if not domain or domain in service.mydestination or trusted:
        return None
    screening.note(Reason.RELAY_DENIED)  # Postfix's reject_unauth_destination
    return Decision.answer(R.R554_RELAY_DENIED.format(rcpt=address))


def unknown_reverse_client(screening, ip: str) -> Decision | None:
    """`unknown_reverse_client_action`: the address has no PTR record (its name need not
    resolve back: that is reject_unknown_client_hostname, another test). A lookup that got no
    answer counts only for tempfail, as a 450 tells the client to come back. Clients in
    mynetworks or the allowlist are exempt."""
    action, found = screening.cfg.unknown_reverse_client_action, screening.peername
    if action == "ignore" or found is None or screening.exempt or found.reverse != UNKNOWN:
        return None
    if action == "tempfail":
        return Decision.answer(R.R450_UNKNOWN_REVERSE_CLIENT.format(ip=ip))
    if found.temporary:
        return None
    return Decision.answer(R.R550_UNKNOWN_REVERSE_CLIENT.format(ip=ip))


def delivered(screening) -> None:
    """A message was accepted: Postfix's error limits count errors without a delivery in
    between, so the counts start again."""
    screening.errors = screening.junk = 0


def closed(screening, service, peer: tuple, client: str, transactions: int,
           accepted: int) -> None:
    """The session has ended: let its anvil connection go; a client that tried only unknown
    recipients was guessing addresses (a dictionary attack)."""
    if screening.anvil_held:
        service.anvil.disconnect(peer[0])
    if not screening.verdict and screening.bad_rcpts and not transactions and not accepted:
        screening.note(Reason.BAD_RECIPIENTS)
        service.log.info("DICTIONARY %d unknown recipient(s), none valid, from %s",
                         screening.bad_rcpts, client)
