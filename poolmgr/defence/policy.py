"""What the sessions of one SMTP worker share about defences.

`Defence` is built once per SMTP worker from the `[defence]` config: access lists, the DNSBL
scorer, the greet-test pass cache (per worker: a client that passed waits again on another
worker).

Exports: Defence.
"""

import time
from typing import Callable

from .dnsbl import Dnsbl
from .networks import in_networks

_MAX_PASSED = 200_000


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
