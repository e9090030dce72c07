"""DNSBL scoring, postscreen style.

A site is written as in Postfix's postscreen_dnsbl_sites: `domain[=filter][*weight]`, where the
filter matches the A record of the reply octet by octet (`127.0.0.2`, `127.0.0.[2..11]`,
`127.0.0.[2;4;6]`) and the weight (default 1, may be negative) is added once per site that
answers with a matching address. `Dnsbl.score(ip)` sends every site's query at once
(`dnsquery.Stub.ask`), then reads the answers, waiting at most `timeout` in all; a site that
has not answered scores nothing. Answers are cached per (site, client) for their TTL, clamped to
[min_ttl, max_ttl], in the client state (`clientstate.ClientState`: the master's, shared by
the host's SMTP workers, or the cluster's); NXDOMAIN is cached for min_ttl. The cache is asked
once per score for every site, and only the sites it does not know are queried.

An A record in 127.255.255.0/24, or outside 127.0.0.0/8, is the DNSBL's error code, not a
listing (`error_answer`: Spamhaus answers 127.255.255.254 to every query that comes through a
public resolver): it never scores, whatever the site's filter, and is cached as "not listed".
Each such answer is counted (`count`, with the site's position in the list); the worker's
Dnsbl logs once when a site starts answering errors, and once when it answers normally again.
"""

__all__ = ["Site", "parse_site", "Dnsbl", "Score", "error_answer", "ERROR_CODES"]

import ipaddress
import re
import time
from typing import Callable, NamedTuple

from .dnsquery import Stub

_SITE = re.compile(r"([A-Za-z0-9._-]+?)(?:=([0-9.;\[\]]+))?(?:\*(-?\d+))?")
_OCTET = re.compile(r"(\d{1,3})|\[([0-9;.]+)\]")


class Site(NamedTuple):
    domain: str
    filter: tuple[frozenset[int], ...] | None  # four sets of allowed octet values
    weight: int
    text: str

    def matches(self, address: str) -> bool:
        if self.filter is None:
            return True
        octets = address.split(".")
        return len(octets) == 4 and all(int(o) in allowed for o, allowed in zip(octets,
                                                                                  self.filter))


def _octet_set(text: str) -> frozenset[int]:
    match = _OCTET.fullmatch(text)
    if not match:
        raise ValueError(f"bad octet {text!r}")
    if match.group(1):
        values = {int(match.group(1))}
    else:
        values = set()
        for part in match.group(2).split(";"):
            low, sep, high = part.partition("..")
            values.update(range(int(low), int(high) + 1) if sep else [int(low)])
    if not values or max(values) > 255:
        raise ValueError(f"bad octet {text!r}")
    return frozenset(values)


def parse_site(text: str) -> Site:
    match = _SITE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"bad DNSBL site {text!r}: use domain[=filter][*weight]")
    domain, filter_text, weight = match.groups()
    octet_filter = None
    if filter_text:
        parts = re.findall(r"\[[^\]]*\]|[^.]+", filter_text)
        if len(parts) != 4:
            raise ValueError(f"bad DNSBL reply filter {filter_text!r}: four octets, e.g. "
                             f"127.0.0.[2..11]")
        octet_filter = tuple(_octet_set(p) for p in parts)
    return Site(domain.lower().rstrip("."), octet_filter, int(weight or 1), text.strip())


def query_name(ip: str, domain: str) -> str:
    """1.2.3.4 -> 4.3.2.1.domain; IPv6 -> its 32 reversed nibbles (RFC 5782)."""
    address = ipaddress.ip_address(ip)
    reverse = address.reverse_pointer.rsplit(".", 2)[0]  # drop in-addr.arpa / ip6.arpa
    return f"{reverse}.{domain}"


# What the error codes in 127.255.255.0/24 mean: the codes Spamhaus documents (its "return
# codes" for public mirrors and DQS), which other DNSBLs follow.
ERROR_CODES = {
    "127.255.255.252": "typo in the DNSBL name or DQS key",
    "127.255.255.254": "query refused (public resolver)",
    "127.255.255.255": "query refused (excessive number of queries)",
}
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_ERRORS = ipaddress.ip_network("127.255.255.0/24")


def error_answer(address: str) -> str | None:
    """What an A record of a DNSBL's answer means when it is an error, not a listing: one in
    127.255.255.0/24 (ERROR_CODES, else "error answer") or one outside 127.0.0.0/8 ("not a
    DNSBL answer": a resolver that redirects NXDOMAIN, a wildcard). None for a listing."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return "not a DNSBL answer"
    if ip not in _LOOPBACK:
        return "not a DNSBL answer"
    if ip in _ERRORS:
        return ERROR_CODES.get(address, "error answer")
    return None


class Score(NamedTuple):
    total: int
    hits: tuple[str, ...]        # "domain(weight)" of each matching site
    unanswered: tuple[str, ...]  # sites that timed out or failed

    def describe(self) -> str:
        return ",".join(self.hits) or "none"

    @property
    def listed(self) -> tuple[str, ...]:
        """The domains of the sites that scored."""
        return tuple(hit.rpartition("(")[0] for hit in self.hits)


class Dnsbl:
    def __init__(self, sites: tuple[Site, ...], nameservers: tuple, timeout: float,
                 min_ttl: float, max_ttl: float, state=None, log=None,
                 count: Callable[[int], None] | None = None):
        import dns.resolver
        # dnspython imports an rdata class at its first answer of that type; import them now,
        # in init_process, while the worker may still read every file (privileges.drop).
        import dns.rdtypes.ANY.CNAME  # noqa: F401
        import dns.rdtypes.ANY.SOA  # noqa: F401
        import dns.rdtypes.IN.A  # noqa: F401

        self.sites = sites
        self.timeout = timeout
        self.min_ttl, self.max_ttl = min_ttl, max(min_ttl, max_ttl)
        self.state = state  # a clientstate.ClientState, or None: no cache
        self.queries = 0
        self.log = log
        self.count = count  # called with the site's position for each error answer
        self.erroring: dict[str, str] = {}  # site text -> the error answer it last gave
        self.dns = Stub(nameservers, timeout)

    def _listed(self, site: Site, ip: str, reply) -> bool | None:
        """Whether `site` lists `ip` by its `reply`; None without one (timeout, SERVFAIL)."""
        import dns.rdatatype

        if reply is None:
            return None
        addresses, ttl = [], self.min_ttl
        for rrset in reply.answer:
            if rrset.rdtype == dns.rdatatype.A:
                addresses += [r.address for r in rrset]
                ttl = rrset.ttl
        errors = [a for a in addresses if error_answer(a)]
        self._note_errors(site, errors)
        if errors:  # an error is no listing: cached as such, for the shortest time
            ttl = self.min_ttl
        listed = any(site.matches(a) for a in addresses if a not in errors)
        if self.state is not None:
            self.state.cache_dnsbl(ip, site.text, listed,
                                   min(self.max_ttl, max(self.min_ttl, ttl)))
        return listed

    def _note_errors(self, site: Site, errors: list[str]) -> None:
        """Count an answer with error codes; log when the site starts answering errors (or
        another one) and when it answers normally again."""
        if errors:
            if self.count is not None:
                self.count(self.sites.index(site))
            if self.erroring.get(site.text) != errors[0]:
                self.erroring[site.text] = errors[0]
                if self.log is not None:
                    self.log.warning("dnsbl: %s: %s: %s; answers ignored", site.domain,
                                     errors[0], error_answer(errors[0]))
        elif self.erroring.pop(site.text, None) is not None and self.log is not None:
            self.log.info("dnsbl: %s answers again", site.domain)

    def score(self, ip: str) -> Score:
        import dns.rdatatype

        deadline = time.monotonic() + self.timeout
        cached = self.state.dnsbl_cached(ip, [s.text for s in self.sites]) if self.state else {}
        asked = {site.text: self.dns.ask(query_name(ip, site.domain), dns.rdatatype.A)
                 for site in self.sites if site.text not in cached}
        self.queries += len(asked)
        total, hits, unanswered = 0, [], []
        try:
            for site in self.sites:
                question = asked.pop(site.text, None)
                if question is None:
                    listed = cached[site.text]
                else:
                    for other in asked.values():  # a failed server: on to the next, all
                        other.advance()
                    listed = self._listed(site, ip, question.answer(deadline))
                    if listed is None:  # timeout, SERVFAIL, refused: the site scores nothing
                        unanswered.append(site.domain)
                        continue
                if listed:
                    total += site.weight
                    hits.append(f"{site.domain}({site.weight:+d})")
        finally:  # killed, or a failure: the questions not read are given up
            for question in asked.values():
                question.cancel()
        return Score(total, tuple(hits), tuple(unanswered))
