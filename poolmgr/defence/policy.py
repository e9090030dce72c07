"""The SMTP worker's defence policy and the nuisance verdict of each session.

`Defence` is built once per SMTP worker from the `[defence]` config: access lists, the DNSBL
scorer, the greet-test pass cache. `classify` turns how a session went into exactly one label,
`legit` or a nuisance reason; the worker counts labels on the scoreboard and the master turns
them into the nuisance ratio.

Exports: Defence, classify, REASONS, ACTIONS.
"""

import time
from typing import Callable

from ..config import in_networks
from .dnsbl import Dnsbl

ACTIONS = ("ignore", "enforce", "drop")
# Every nuisance label a session can get; append only (scoreboard counters follow this list).
REASONS = ("pregreet", "dnsbl", "denylist", "rate_limit", "idle_timeout", "lost_after_connect",
           "lost_connection", "no_transaction", "bad_recipients", "hard_errors", "junk_commands",
           "unauth_pipelining", "tls_failure", "relay_denied", "content_rejected")
_MAX_PASSED = 200_000


def classify(verdict: str, accepted: int, rejected: int, transactions: int, ended: str,
             commands: int) -> str:
    """One label per closed session: `legit` or a reason from REASONS.

    Legit: a message was accepted, or a clean QUIT after a valid transaction (a sender
    verification probe). A test that fired names the nuisance; otherwise how it ended does.
    """
    if accepted:
        return "legit"
    if verdict:
        return verdict
    if rejected:
        return "content_rejected"
    if ended == "tls_failure":
        return "tls_failure"
    if ended == "timeout":
        return "idle_timeout"
    if ended in ("lost", "refused"):
        return "lost_after_connect" if commands == 0 else "lost_connection"
    if transactions and ended == "quit":
        return "legit"
    return "no_transaction"


class Defence:
    """Everything the sessions of one SMTP worker share about defences."""

    def __init__(self, cfg, spawn: Callable):
        d = cfg.defence
        self.cfg = d
        self.allowlist = d.allowlist
        self.denylist = d.denylist
        self.dnsbl = Dnsbl(d.dnsbl_sites, d.nameservers, d.dnsbl_timeout, d.dnsbl_min_ttl,
                           d.dnsbl_max_ttl, spawn) if d.dnsbl_sites else None
        self.spawn = spawn
        self.greet_passed: dict[str, float] = {}

    def allowlisted(self, ip: str) -> bool:
        return bool(self.allowlist) and in_networks(ip, self.allowlist)

    def denylisted(self, ip: str) -> bool:
        return bool(self.denylist) and in_networks(ip, self.denylist)

    def needs_greet_test(self, ip: str) -> bool:
        if self.cfg.greet_wait <= 0:
            return False
        return self.greet_passed.get(ip, 0.0) < time.monotonic()

    def greet_test_passed(self, ip: str) -> None:
        if len(self.greet_passed) >= _MAX_PASSED:
            now = time.monotonic()
            self.greet_passed = {k: v for k, v in self.greet_passed.items() if v > now}
            if len(self.greet_passed) >= _MAX_PASSED:
                self.greet_passed.clear()
        self.greet_passed[ip] = time.monotonic() + self.cfg.greet_ttl
