"""What the sessions of one SMTP worker share about defences.

`Defence` is built once per SMTP worker from the `[defence]` config: access lists, the DNSBL
scorer, the client name lookup (`peername`), and the client state
(`clientstate.ClientState`) that holds the greet test's passes, the DNSBL answers and the
client names: the master's, shared by every SMTP worker of the host, or the cluster's.
"""

__all__ = ["Defence"]

from typing import Callable

from ..board import dnsbl_error_counters
from .clientstate import ClientState
from .dnsbl import Dnsbl
from .networks import in_networks
from .peername import Names


class Defence:
    """Everything the sessions of one SMTP worker share about defences."""

    def __init__(self, cfg, spawn: Callable, state: ClientState | None = None, log=None,
                 slot=None):
        d = cfg.defence
        self.cfg = d
        self.allowlist = d.allowlist
        self.denylist = d.denylist
        self.state = state
        count = None
        if slot is not None:  # the worker's board slot: error answers, in all and per site
            def count(position: int) -> None:
                for counter in dnsbl_error_counters(position):
                    slot.add(counter)
        self.dnsbl = Dnsbl(d.dnsbl_sites, d.nameservers, d.dnsbl_timeout, d.dnsbl_min_ttl,
                           d.dnsbl_max_ttl, state, log, count) if d.dnsbl_sites else None
        self.names = Names(d.nameservers, d.reverse_timeout, d.dnsbl_min_ttl, d.dnsbl_max_ttl,
                           state) if d.reverse_lookup else None
        self.spawn = spawn

    def allowlisted(self, ip: str) -> bool:
        return bool(self.allowlist) and in_networks(ip, self.allowlist)

    def denylisted(self, ip: str) -> bool:
        return bool(self.denylist) and in_networks(ip, self.denylist)

    def needs_greet_test(self, ip: str) -> bool:
        if self.cfg.greet_wait <= 0:
            return False
        return self.state is None or not self.state.greet_passed(ip)

    def greet_test_passed(self, ip: str) -> None:
        if self.state is not None and self.cfg.greet_ttl > 0:
            self.state.pass_greet(ip, self.cfg.greet_ttl)
