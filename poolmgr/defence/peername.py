"""The client's name, as Postfix's smtpd finds it (smtpd_peer.c, `smtpd_peername_lookup`).

The address's PTR record gives a name; the name counts only when it resolves back to the
address (its A records for an IPv4 client, AAAA for IPv6: forward confirmation), otherwise
the client is `unknown`, as Postfix writes it. Postfix keeps both results: `name`, the
confirmed name that the log, the `Received:` header and XFORWARD show, and `reverse`, the
PTR's name whether or not it resolves back, which `reject_unknown_reverse_client_hostname`
(`defence.unknown_reverse_client_action`) reads: a client whose address has no PTR at all.

`Names.find(ip)` runs in a greenlet started at connect (`early.on_connect`, beside the
DNSBL queries) and gives up at `reverse_timeout`; a lookup that did not get its answers
(timeout, SERVFAIL, no resolver answering) is `temporary`. Answers are cached in the client
state (`clientstate.ClientState.name_cached`: the host's, or the cluster's) for their TTL,
clamped to [dnsbl_min_ttl, dnsbl_max_ttl]; a temporary failure is not cached. A PTR name that
is not a valid hostname (Postfix's valid_hostname) counts as none, so nothing a DNS zone says
reaches the log or a header but a plain name.
"""

__all__ = ["Peername", "Names", "UNKNOWN", "LOOKUP_FAILED", "valid_hostname"]

import ipaddress
import re
import time
from typing import NamedTuple

from .dnsquery import Stub

UNKNOWN = "unknown"
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def valid_hostname(name: str) -> bool:
    """Postfix's valid_hostname: labels of letters, digits, - and _, at most 255 octets,
    and not all numeric (a name that looks like an address is not one)."""
    labels = name.split(".")
    return (0 < len(name) <= 255 and all(_LABEL.fullmatch(label) for label in labels)
            and not all(label.isdigit() for label in labels))


class Peername(NamedTuple):
    name: str        # the forward-confirmed name, or "unknown"
    reverse: str     # the PTR's name, confirmed or not, or "unknown" (Postfix: reverse_name)
    temporary: bool  # the lookup did not get its answers (not cached)


LOOKUP_FAILED = Peername(UNKNOWN, UNKNOWN, True)


class Names:
    def __init__(self, nameservers: tuple, timeout: float, min_ttl: float, max_ttl: float,
                 state=None):
        import dns.resolver
        # dnspython imports an rdata class at its first answer of that type; import them now,
        # in init_process, while the worker may still read every file (privileges.drop).
        import dns.rdtypes.ANY.CNAME  # noqa: F401
        import dns.rdtypes.ANY.PTR  # noqa: F401
        import dns.rdtypes.ANY.SOA  # noqa: F401
        import dns.rdtypes.IN.A  # noqa: F401
        import dns.rdtypes.IN.AAAA  # noqa: F401

        self.timeout = timeout
        self.min_ttl, self.max_ttl = min_ttl, max(min_ttl, max_ttl)
        self.state = state  # a clientstate.ClientState, or None: no cache
        self.dns = Stub(nameservers, timeout)

    @staticmethod
    def _records(reply, rdtype) -> tuple[list[str], float]:
        """The answer's records of `rdtype` as text (CNAMEs followed by the server), and
        their TTL (the smallest)."""
        values, ttl = [], None
        for rrset in reply.answer:
            if rrset.rdtype == rdtype:
                values += [r.to_text() for r in rrset]
                ttl = rrset.ttl if ttl is None else min(ttl, rrset.ttl)
        return values, ttl or 0

    def find(self, ip: str) -> Peername:
        """The client's name (see the module's docstring); within `timeout`."""
        if self.state is not None:
            cached = self.state.name_cached(ip)
            if cached is not None:
                return Peername(*cached, False)
        import dns.rdatatype

        deadline = time.monotonic() + self.timeout
        address = ipaddress.ip_address(ip)
        reply = self.dns.query(address.reverse_pointer, dns.rdatatype.PTR, deadline)
        if reply is None:
            return LOOKUP_FAILED
        names, ttl = self._records(reply, dns.rdatatype.PTR)
        names = [n.rstrip(".").lower() for n in names]
        names = [n for n in names if valid_hostname(n)]
        if not names:  # NXDOMAIN, no PTR, or none that is a hostname: no name
            return self._cached(ip, Peername(UNKNOWN, UNKNOWN, False), self.min_ttl)
        # Postfix takes the name getnameinfo gives, the first; then asks for its addresses.
        name = names[0]
        forward_type = dns.rdatatype.AAAA if address.version == 6 else dns.rdatatype.A
        reply = self.dns.query(name + ".", forward_type, deadline)
        if reply is None:
            return Peername(UNKNOWN, name, True)
        addresses, forward_ttl = self._records(reply, forward_type)
        confirmed = any(ipaddress.ip_address(a) == address for a in addresses)
        ttl = min(ttl, forward_ttl) if addresses else ttl
        return self._cached(ip, Peername(name if confirmed else UNKNOWN, name, False), ttl)

    def _cached(self, ip: str, found: Peername, ttl: float) -> Peername:
        if self.state is not None:
            self.state.cache_name(ip, found.name, found.reverse,
                                  min(self.max_ttl, max(self.min_ttl, ttl)))
        return found

