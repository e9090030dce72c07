"""Every SMTP reply poolmgr sends, as named constants with enhanced status codes.

`R554_RELAY_DENIED = Reply(554, "5.7.1", "<{rcpt}>: Relay access denied")`: RFC 5321 reply
codes, RFC 3463 enhanced status codes (220 and 354 have none, RFC 2034). A constant's name
starts with its reply code; tests check this, that each constant is used, and that each
`R.<NAME>` used exists. Texts follow Postfix's smtpd where Postfix has the reply. Replies that
carry a value use `{}` fields, filled with `Reply.format(...)`. Exception text is never sent to
a client.
"""

import re
from typing import NamedTuple


_WIRE: dict = {}  # Reply: its bytes on the wire


class Reply(NamedTuple):
    code: int
    status: str  # enhanced status code (RFC 3463), "" where RFC 2034 has none (220, 354)
    text: str

    def format(self, **fields) -> "Reply":
        return self._replace(text=self.text.format(**fields))

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}" if self.status else f"{self.code} {self.text}"

    def encode(self) -> bytes:
        """The reply on the wire; a text of several lines ("\n") becomes `250-first`, ...,
        `250 last` (RFC 5321 section 4.2.1), the enhanced code on each line (RFC 2034).
        Kept once made: a session sends the same few replies again and again."""
        wire = _WIRE.get(self)
        if wire is None:
            if len(_WIRE) >= 1024:  # replies that carry a value come and go
                _WIRE.clear()
            wire = _WIRE[self] = self._wire()
        return wire

    def _wire(self) -> bytes:
        if "\n" not in self.text:
            return (str(self) + "\r\n").encode("utf-8", "surrogateescape")
        prefix = f"{self.code}-{self.status} " if self.status else f"{self.code}-"
        *lines, last = self.text.split("\n")
        text = "".join(f"{prefix}{line}\r\n" for line in lines) + str(self._replace(text=last))
        return (text + "\r\n").encode("utf-8", "surrogateescape")

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


R220_BANNER = Reply(220, "", "{host} ESMTP poolmgr")
R220_TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
R221_BYE = Reply(221, "2.0.0", "Bye")
R214_HELP = Reply(214, "2.0.0", "Commands: {commands}")  # from the listener's command table
R250_OK = Reply(250, "2.0.0", "Ok")
R250_SENDER_OK = Reply(250, "2.1.0", "Ok")
R250_RCPT_OK = Reply(250, "2.1.5", "Ok")
R250_CHUNK = Reply(250, "2.0.0", "Ok: {size} octets")
R250_QUEUED = Reply(250, "2.0.0", "Ok: queued as {queue_id}")
R250_DISCARDED = Reply(250, "2.7.0", "Ok, discarded, id={ident} - {summary}")
R252_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
R354_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")

R421_SHUTDOWN = Reply(421, "4.3.2", "{host} Service shutting down, closing transmission channel")
R421_YIELD = Reply(
    421, "4.3.2", "{host} Service busy, closing an idle connection for a waiting client")
R421_TIMEOUT = Reply(421, "4.4.2", "{host} Error: timeout exceeded")
# postscreen's reply when the PROXY header (smtp.proxy_protocol) did not come, or came wrong.
R421_NO_RESOURCES = Reply(421, "4.3.2", "No system resources")
R421_TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "{host} Error: too many connections from {ip}")
R421_TOO_MANY_ERRORS = Reply(421, "4.7.0", "{host} Error: too many errors")
R450_MESSAGE_RATE = Reply(450, "4.7.1", "Error: too much mail from {ip}")
R450_RECIPIENT_RATE = Reply(450, "4.7.1", "Error: too many recipients from {ip}")
# Postfix's reject_unknown_reverse_client_hostname (unknown_client_reject_code 450, or 550).
R450_UNKNOWN_REVERSE_CLIENT = Reply(450, "4.7.25", "Client host rejected: cannot find your "
                                    "reverse hostname, [{ip}]")
R451_LOCAL_ERROR = Reply(451, "4.3.0", "Error: internal error, try again later")
R451_FILTER_UNAVAILABLE = Reply(451, "4.3.0", "Error: content filter unavailable, try again later")
R451_NEXT_HOP_UNAVAILABLE = Reply(451, "4.4.1", "Error: next hop unavailable, try again later")
R451_CHECK_FAILED = Reply(451, "4.3.0", "Error: content check {check} unavailable, try again later")
# A content check that asks the sender to come back (rspamd's soft reject or greylist), in its
# own words (rspamd's smtp_message) or rspamd milter's "Try again later".
R451_DEFERRED_BY_CHECK = Reply(451, "4.7.1", "{text}")
R451_QUARANTINE_FAILED = Reply(
    451, "4.3.0", "Error: cannot quarantine the message, try again later")
R451_DSN_FAILED = Reply(
    451, "4.3.0", "Error: cannot notify the sender of refused recipients, try again later")
R451_SCAN_TIMEOUT = Reply(451, "4.3.0", "Error: content scan timed out, try again later")
R452_TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")

R500_LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
R501_EHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
R501_HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO hostname")
R501_LHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: LHLO hostname")
R501_MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
R501_RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
R501_DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
R501_BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT count [LAST]")
R501_VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY address")
R501_NO_ARGUMENTS = Reply(501, "5.5.4", "Syntax: {verb}")
R501_BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax")
R501_BAD_SIZE = Reply(501, "5.5.4", "Bad message size syntax")
R501_XFORWARD_SYNTAX = Reply(501, "5.5.4", "Syntax: XFORWARD attribute=value...")
R501_XFORWARD_ADDR = Reply(501, "5.5.4", "Bad ADDR syntax: {value}")  # Postfix's smtpd
R502_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
R502_UNRECOGNIZED = Reply(502, "5.5.2", "Error: command not recognized")
R503_NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
R503_NEED_LHLO = Reply(503, "5.5.1", "Error: send LHLO first")
R503_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
R503_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
R503_NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
R503_DATA_AND_BDAT = Reply(503, "5.5.1", "Error: mixing BDAT and DATA in one transaction")
R503_PIPELINING = Reply(503, "5.5.0", "Error: improper use of SMTP command pipelining")
R503_XFORWARD_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
R550_BLOCKED = Reply(550, "5.7.1", "Service unavailable; client [{ip}] blocked using {reason}")
R550_UNKNOWN_REVERSE_CLIENT = Reply(550, "5.7.25", "Client host rejected: cannot find your "
                                    "reverse hostname, [{ip}]")
R550_UNKNOWN_USER = Reply(
    550, "5.1.1", "<{rcpt}>: Recipient address rejected: User unknown in local recipient table")
R550_BARE_LF = Reply(550, "5.5.2", "Error: bare <LF> received")
R550_BARE_CR = Reply(550, "5.5.2", "Error: bare <CR> received")
R550_NUL = Reply(550, "5.6.0", "Error: message content rejected: NUL character")
R521_BLOCKED = Reply(521, "5.7.1", "Service unavailable; client [{ip}] blocked using {reason}")
R552_SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed limit")
R552_MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message file too big")
R553_SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
R554_ACCESS_DENIED = Reply(554, "5.7.1", "Error: access denied for {client}")
R554_RELAY_DENIED = Reply(554, "5.7.1", "<{rcpt}>: Relay access denied")
R554_TLS_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
R554_VIRUS = Reply(554, "5.7.0", "Rejected: virus found: {name}")
R554_SPAM = Reply(554, "5.7.0", "Rejected: spam, score={score}")
R554_CONTENT_RULE = Reply(554, "5.7.1", "Rejected by content rule {name}")
R554_BANNED = Reply(554, "5.7.0", "Reject, id={queue_id} - BANNED: {name}")  # amavisd's
R555_UNSUPPORTED_PARAMETER = Reply(555, "5.5.4", "Unsupported option: {param}")


def combine(replies: list[Reply]) -> Reply:
    """One reply for the client from per-recipient results downstream.

    All accepted -> the first 2xx. Any temporary failure -> that 4xx, so the sender retries
    (nothing is lost; accepted recipients may see a duplicate). All permanent -> the first 5xx.
    Accepted beside permanent rejects -> 2xx: the caller has already told the sender about
    the rejects with a delivery status notification (`smtp.dsn.settle`).
    """
    for wanted in (lambda r: r.temporary, lambda r: r.ok, lambda r: True):
        for reply in replies:
            if wanted(reply):
                return reply
    return R451_LOCAL_ERROR


__all__ = ["Reply", "combine",  # and every R### constant above
           *(name for name in dict(globals()) if re.fullmatch(r"R\d{3}_[A-Z0-9_]+", name))]
