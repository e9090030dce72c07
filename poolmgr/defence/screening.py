"""One SMTP session's defence state, kept apart from the session's SMTP state.

A `Screening` is made per session and changes only through its verbs: `flag` (a test fired:
record the verdict and apply its action, the one place actions are applied), `suspect`
(short timeout, tarpit) and `trust` (allowlisted: every later test is skipped). The tests
themselves are in `early` (at connect and around the banner) and `limits` (in the dialogue).

Exports: Screening.
"""

import time

from ..smtp import replies as R
from .verdicts import Action, Reason


class Screening:
    __slots__ = ("cfg", "conn", "peer", "log", "verdict", "blocked", "trusted", "exempt",
                 "dnsbl_job", "suspicious", "errors", "junk", "bad_rcpts", "anvil_held",
                 "early", "started", "hard_limit", "junk_limit")

    def __init__(self, cfg, conn, peer, log, stress: bool):
        self.cfg = cfg          # the [defence] section
        self.conn, self.peer, self.log = conn, peer, log
        self.verdict = ""       # the first nuisance test that fired (a Reason value)
        self.blocked = ""       # why every RCPT is refused (enforce action), "" when not
        self.trusted = False    # allowlisted: skips every test
        self.exempt = False     # allowlisted or in mynetworks: no anvil limits
        self.dnsbl_job = None
        self.suspicious = False
        self.errors = 0         # 4xx/5xx replies (and junk commands past the limit)
        self.junk = 0
        self.bad_rcpts = 0      # recipients unknown in the recipient table
        self.anvil_held = False
        self.early = False      # talked before the banner (greet test not run)
        self.started = time.monotonic()
        self.hard_limit, self.junk_limit = cfg.hard_error_limit, cfg.junk_command_limit
        if stress:  # as Postfix's ${stress?...}: read when the session starts
            conn.timeout = min(conn.timeout, cfg.stress_timeout)
            self.hard_limit, self.junk_limit = (cfg.stress_hard_error_limit,
                                                cfg.stress_junk_command_limit)

    def flag(self, reason: Reason, action: str, what: str, because: str) -> R.Reply | None:
        """A test fired: log it, record the verdict, apply the action; the 521 for drop."""
        self.log.info("%s [%s]:%s; action=%s", what, self.peer[0], self.peer[1], action)
        self.verdict = self.verdict or reason.value
        if action == Action.IGNORE:
            return None
        self.suspect()
        if action == Action.DROP:
            return R.R521_BLOCKED.format(ip=self.peer[0], reason=because)
        self.blocked = self.blocked or because
        return None

    def note(self, reason: Reason) -> None:
        """A verdict without an action of its own (the caller answers)."""
        self.verdict = self.verdict or reason.value

    def suspect(self) -> None:
        """Short timeout, and the tarpit if configured."""
        self.suspicious = True
        self.conn.timeout = min(self.conn.timeout, self.cfg.suspicious_timeout)

    def trust(self) -> None:
        self.trusted = self.exempt = True

    def looks_like_nuisance(self, silent_since: float, said_nothing: bool) -> bool:
        """For the autoscaler's live nuisance ratio: a test fired, or silent since connect."""
        return bool(self.verdict) or self.suspicious or (said_nothing and
                                                         self.started < silent_since)
