"""What a defence decides, as a value: the one thing a defence hook returns.

Postfix's smtpd_check_*() return a reply text and smtpd.c writes it; aiosmtpd's hooks return a
status and the protocol sends it. Here every defence hook (connect, before the banner, after
the greet pause, command screen, MAIL, RCPT, after a command, before a reply) returns a
`Decision`, or None for "nothing: go on", and the protocol engine (`smtp.protocol.
ServerSession.apply`) carries it out: it caps the timeout, marks the session closing, parks,
sleeps, writes. No defence writes to a session or a socket itself, so a defence can be tested
by what it returns. What a defence finds that the session shows is a decision too: the
client's name (`client_name`, from `peername`), which the engine puts in its log lines and
headers.
"""

__all__ = ["Decision", "combine"]

from dataclasses import dataclass

from ..smtp.replies import Reply


@dataclass(frozen=True, slots=True)
class Decision:
    """What the engine does, in this order: cap the timeout, close, park, delay, reply."""

    reply: Reply | None = None  # sent to the client (a refusal, or what a command gets)
    close: bool = False     # the session ends after `reply`
    ended: str = ""         # with close: how it ended, for the session's label (classify)
    delay: float = 0.0      # seconds before `reply` (the tarpit, the error sleep)
    park: float = 0.0       # the greet pause: the banner's first line, then this long for input
    timeout: float = 0.0    # the client's timeout from now on is at most this (a suspect client:
    #                         suspicious_timeout; stress: stress_timeout); 0: unchanged
    client_name: str = ""   # the client's name was looked up: this ("unknown" when none)

    @classmethod
    def answer(cls, reply: Reply) -> "Decision":
        """Refuse this command (or transaction step) with `reply`; the session goes on."""
        return cls(reply=reply)

    @classmethod
    def refuse(cls, reply: Reply, ended: str = "") -> "Decision":
        """Say `reply` and close."""
        return cls(reply=reply, close=True, ended=ended)

    @classmethod
    def pause(cls, seconds: float) -> "Decision":
        """The greet test: the banner's first line, then wait `seconds` for the client."""
        return cls(park=seconds)

    @classmethod
    def wait(cls, seconds: float) -> "Decision":
        """Hold the next reply `seconds` (the tarpit, the error sleep)."""
        return cls(delay=seconds)

    @classmethod
    def named(cls, name: str) -> "Decision":
        """The client's name, looked up (`peername`): the session shows it from now on."""
        return cls(client_name=name)

    @classmethod
    def suspect(cls, timeout: float) -> "Decision":
        """A suspect client: its timeout shrinks to `timeout` (suspicious_timeout)."""
        return cls(timeout=timeout)


def combine(*decisions: "Decision | None") -> "Decision | None":
    """All of these at once (None when there are none): the first reply, end label and
    client name, any close, the longest park and delay, the shortest timeout."""
    present = [d for d in decisions if d is not None]
    if len(present) <= 1:
        return present[0] if present else None
    timeouts = [d.timeout for d in present if d.timeout]
    return Decision(reply=next((d.reply for d in present if d.reply is not None), None),
                    close=any(d.close for d in present),
                    ended=next((d.ended for d in present if d.ended), ""),
                    delay=max(d.delay for d in present),
                    park=max(d.park for d in present),
                    timeout=min(timeouts) if timeouts else 0.0,
                    client_name=next((d.client_name for d in present if d.client_name), ""))
