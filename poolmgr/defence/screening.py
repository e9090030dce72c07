"""One SMTP session's defence state, kept apart from the session's SMTP state.

A `Screening` is made per session and changes only through its verbs: `flag` (a test fired:
record the verdict and decide its action, the one place actions are decided), `suspect`
(short timeout, tarpit) and `trust` (allowlisted: every later test is skipped). It holds no
connection: what a verb means for the session (a 521, a shorter timeout) it returns as a
`decision.Decision`, which the session engine applies. The tests themselves are in `early`
(at connect and around the banner) and `limits` (in the dialogue).

The lines a test logs have the shape of postscreen's (`PREGREET 11 after 0.12 from
[192.0.2.7]:40312: EHLO bot\\r\\n`, `DNSBL rank 3 for [192.0.2.8]:40313`, `DENYLISTED
[192.0.2.9]:40314`), so tools written for Postfix's log (fail2ban's postfix filter, pflogsumm,
`poolmgr plan`) read them; poolmgr's own fields (`; action=...`) come after Postfix's.
`escape` and `delta_time` render client bytes and elapsed times as postscreen does.
"""

__all__ = ["Screening", "escape", "delta_time"]

import time

from ..smtp import replies as R
from .decision import Decision, combine
from .verdicts import Action, Reason

__all__ = ["Screening", "escape", "delta_time"]


class Screening:
    __slots__ = ("cfg", "peer", "log", "verdict", "blocked", "trusted", "exempt",
                 "dnsbl_job", "name_job", "peername", "suspicious", "errors", "junk",
                 "bad_rcpts", "anvil_held", "early", "started", "hard_limit", "junk_limit",
                 "stressed")

    def __init__(self, cfg, peer, log, stress: bool):
        self.cfg = cfg          # the [defence] section
        self.peer, self.log = peer, log
        self.verdict = ""       # the first nuisance test that fired (a Reason value)
        self.blocked = ""       # why every RCPT is refused (enforce action), "" when not
        self.trusted = False    # allowlisted: skips every test
        self.exempt = False     # allowlisted or in mynetworks: no anvil limits
        self.dnsbl_job = None
        self.name_job = None    # the client's name being looked up (`peername.Names.find`)
        self.peername = None    # what it found (a `peername.Peername`), once settled
        self.suspicious = False
        self.errors = 0         # 4xx/5xx replies (and junk commands past the limit)
        self.junk = 0
        self.bad_rcpts = 0      # recipients unknown in the recipient table
        self.anvil_held = False
        self.early = False      # talked before the banner (greet test not run)
        self.started = time.monotonic()
        self.hard_limit, self.junk_limit = cfg.hard_error_limit, cfg.junk_command_limit
        # As Postfix's ${stress?...}: read when the session starts (the stress timeout is
        # part of the connect decision, `early.on_connect`).
        self.stressed = stress
        if stress:
            self.hard_limit, self.junk_limit = (cfg.stress_hard_error_limit,
                                                cfg.stress_junk_command_limit)

    def flag(self, reason: Reason, action: str, line: str, because: str,
             client_text: str | None = None) -> Decision | None:
        """A test fired: log it, record the verdict, decide the action: nothing for ignore,
        a suspect's shorter timeout for enforce, and the 521 and close as well for drop.

        `line` is postscreen's log line for the test. The action follows it (`; action=`),
        or, when the line ends with the client's own text, comes on a line of its own, so
        that nothing a client sends can pass for it.
        """
        if client_text is None:
            self.log.info("%s; action=%s", line, action)
        else:
            self.log.info("%s: %s", line, client_text)
            self.log.info("%s action=%s for [%s]:%s", reason.name, action, *self.peer)
        self.verdict = self.verdict or reason.value
        if action == Action.IGNORE:
            return None
        suspect = self.suspect()
        if action == Action.DROP:
            return combine(suspect, Decision.refuse(R.R521_BLOCKED.format(ip=self.peer[0],
                                                                          reason=because)))
        self.blocked = self.blocked or because
        return suspect

    def enforced(self) -> R.Reply | None:
        """The reply every RCPT gets after an enforce action; None when none was applied."""
        return R.R550_BLOCKED.format(ip=self.peer[0], reason=self.blocked) if self.blocked \
            else None

    def note(self, reason: Reason) -> None:
        """A verdict without an action of its own (the caller answers)."""
        self.verdict = self.verdict or reason.value

    def suspect(self) -> Decision:
        """From now on the tarpit (if configured) and, as the decision returned says, the
        short timeout (suspicious_timeout)."""
        self.suspicious = True
        return Decision.suspect(self.cfg.suspicious_timeout)

    def trust(self) -> None:
        self.trusted = self.exempt = True

    def looks_like_nuisance(self, silent_since: float, said_nothing: bool) -> bool:
        """For the autoscaler's live nuisance ratio: a test fired, or silent since connect."""
        return bool(self.verdict) or self.suspicious or (said_nothing and
                                                         self.started < silent_since)


# Postfix's escape(): C escapes for control characters, octal for other bytes.
_NAMED_ESCAPES = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r",
                  92: "\\\\"}


def escape(data: bytes) -> str:
    """Client bytes as postscreen logs them: `EHLO bot\\r\\n` (printable ASCII only)."""
    return "".join(_NAMED_ESCAPES.get(b) or (chr(b) if 32 <= b < 127 else f"\\{b:03o}")
                   for b in data)


def delta_time(seconds: float) -> str:
    """Elapsed time as postscreen's format_tv prints it: two significant digits, at most two
    decimals (0.01, 0.12, 1.2, 15)."""
    if seconds >= 10:
        return str(int(seconds))
    text = f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.2f}"
    return text.rstrip("0").rstrip(".") or "0"
