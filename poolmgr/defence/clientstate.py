"""What the SMTP sessions know about a client beyond their own connection: the client state.

`ClientState` is the interface a session asks (the SMTP worker's side, under gevent): the
client's live connection count and its connection, message and recipient rates over
`defence.anvil_rate_time_unit` (Postfix's anvil), whether it passed the greet test within
`greet_ttl` (postscreen's cache), and the DNSBL answers and client names (`peername`) cached
for their TTL. Every method fails open: an answer it cannot get is None (no limit), False
(run the greet test) or missing (ask the DNS).

Two implementations:
- the host's own: the master keeps the counters and both caches (`anvil.Anvil`, with a
  `TtlCache` per cache), so every SMTP worker of the host shares them and they survive a
  reload or a worker recycle; each worker asks through `anvil.AnvilClient`;
- the cluster's: `cluster.RedisState`, the same questions asked of one Redis that several
  MX nodes share, with this host's own state as the fallback while Redis is down.
"""

__all__ = ["ClientState", "Usage", "TtlCache", "PassCache"]

import socket
from array import array
from bisect import bisect_left
from itertools import compress
from typing import NamedTuple

_MAX_ENTRIES = 200_000  # per cache: a storm of distinct clients cannot grow it without bound
_SWEEP_EVERY = 60.0  # seconds between sweeps of a cache's expired entries
_MERGE_AT = 4096  # new greet passes kept in a dict before they are merged into the arrays
_V4_END = 1 << 32  # PassCache: IPv4 addresses as ints lie below, IPv6 ones above 2**128


class Usage(NamedTuple):
    count: int  # live connections of the client, this one included
    rate: int   # events of the asked kind in the client's current window, this one included


class ClientState:
    """The questions a session asks about its client; see the module's docstring."""

    def connect(self, ip: str) -> Usage | None:
        raise NotImplementedError

    def disconnect(self, ip: str) -> None:
        raise NotImplementedError

    def message(self, ip: str) -> int | None:
        raise NotImplementedError

    def recipient(self, ip: str) -> int | None:
        raise NotImplementedError

    def greet_passed(self, ip: str) -> bool:
        raise NotImplementedError

    def pass_greet(self, ip: str, ttl: float) -> None:
        raise NotImplementedError

    def dnsbl_cached(self, ip: str, domains: list[str]) -> dict[str, bool]:
        """The cached answers of these sites for the client: domain -> listed."""
        raise NotImplementedError

    def cache_dnsbl(self, ip: str, domain: str, listed: bool, ttl: float) -> None:
        raise NotImplementedError

    def name_cached(self, ip: str) -> tuple[str, str] | None:
        """The client's cached name and PTR name (`peername.Peername`'s name and reverse,
        "unknown" where there is none), or None when nothing is cached."""
        raise NotImplementedError

    def cache_name(self, ip: str, name: str, reverse: str, ttl: float) -> None:
        raise NotImplementedError


class TtlCache:
    """Values that expire, bounded in size; the clock is passed in.

    Expired entries are swept out at most every `sweep_every` seconds (from `put`), and only
    once the earliest expiry is past, so a storm's clients leave the cache once their answers
    expire rather than when it is full (an hour of storms of distinct bots does not hold the
    memory of all of them), and a cache whose entries all still hold is not copied for
    nothing."""

    def __init__(self, max_entries: int = _MAX_ENTRIES, sweep_every: float = _SWEEP_EVERY):
        self.entries: dict = {}
        self.max_entries = max_entries
        self.sweep_every = sweep_every
        self.next_sweep = 0.0
        self.earliest = float("inf")  # the earliest expiry held (or one before it)

    def get(self, key, now: float):
        entry = self.entries.get(key)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def put(self, key, value, expires: float, now: float) -> None:
        self._make_room(now)
        self.entries[key] = (expires, value)
        self.earliest = min(self.earliest, expires)

    def _make_room(self, now: float) -> None:
        if now >= self.next_sweep:
            self.next_sweep = now + self.sweep_every
            if now >= self.earliest:
                self.purge(now)
        if len(self.entries) >= self.max_entries:
            self.purge(now)
            if len(self.entries) >= self.max_entries:
                self.clear()  # crude, but bounded

    def clear(self) -> None:
        self.entries.clear()
        self.earliest = float("inf")

    def purge(self, now: float) -> None:
        self.next_sweep = now + self.sweep_every
        self.entries = {k: v for k, v in self.entries.items() if v[0] > now}
        self.earliest = min((v[0] for v in self.entries.values()), default=float("inf"))

    def __len__(self) -> int:
        return len(self.entries)


class PassCache:
    """The greet test's passes: addresses held for `greet_ttl` (a day by default), so the
    cache that grows longest, by every new client (a storm's bots pass the test too). IPv4
    passes are kept as two sorted arrays, the addresses (8 bytes each) and their expiries (8
    bytes): no Python object per pass, so that a day of distinct clients neither grows the
    master's heap by 80 to 170 bytes each nor leaves it in fragments. New passes wait in a
    small dict and are merged into the arrays _MERGE_AT at a time (and at each sweep); IPv6
    passes (and anything that is not an address) are kept in a dict. Expired passes are swept
    out at most every `sweep_every` seconds, once the earliest expiry is past; over
    `max_entries` even then, the cache is emptied but for the newest pass (crude, but
    bounded)."""

    def __init__(self, max_entries: int = _MAX_ENTRIES, sweep_every: float = _SWEEP_EVERY):
        self.max_entries, self.sweep_every = max_entries, sweep_every
        self.keys = array("Q")       # IPv4 addresses as ints, ascending
        self.expiries = array("d")   # each one's expiry, at the same index
        self.fresh: dict[int, float] = {}  # IPv4 passes since the last merge
        self.others: dict = {}       # IPv6 addresses (ints above 2**32), other strings
        self.next_sweep = 0.0
        self.earliest = float("inf")

    @staticmethod
    def _key(ip: str):
        try:
            if ":" in ip:
                return int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big") | 1 << 128
            return int.from_bytes(socket.inet_aton(ip), "big") if ip.count(".") == 3 else ip
        except OSError:  # not an address (as in tests): itself
            return ip

    def _index(self, key) -> int | None:
        """Where an IPv4 pass is in the arrays (-1: not there); None for any other key."""
        if type(key) is not int or key >= _V4_END:
            return None
        keys = self.keys
        i = bisect_left(keys, key)
        return i if i < len(keys) and keys[i] == key else -1

    def holds(self, ip: str, now: float) -> bool:
        key = self._key(ip)
        expires = self.fresh.get(key)
        if expires is None:
            i = self._index(key)
            if i is None:
                expires = self.others.get(key)
            elif i >= 0:
                expires = self.expiries[i]
        return expires is not None and expires > now

    def add(self, ip: str, ttl: float, now: float) -> None:
        key, expires = self._key(ip), now + ttl
        i = self._index(key)
        if i is not None:
            if i >= 0:
                self.expiries[i] = expires  # renewed in place: a key is in one place only
            else:
                self.fresh[key] = expires
                if len(self.fresh) >= _MERGE_AT:
                    self._merge()
        else:
            self.others[key] = expires
        self.earliest = min(self.earliest, expires)
        if now >= self.next_sweep:
            self.next_sweep = now + self.sweep_every
            self._merge()
            if now >= self.earliest:
                self.purge(now)
        if len(self) > self.max_entries:  # full: the expired go first, then all but this one
            self.purge(now)
            if len(self) > self.max_entries:
                self.clear()
                self.add(ip, ttl, now)

    def _merge(self) -> None:
        """The fresh passes into the arrays, in order (the arrays copied once, slice by
        slice)."""
        if not self.fresh:
            return
        keys, expiries = self.keys, self.expiries
        new = sorted(self.fresh.items())  # none of them is in the arrays (see add)
        self.fresh = {}
        merged_keys, merged_expiries, start = array("Q"), array("d"), 0
        for key, expires in new:
            i = bisect_left(keys, key, start)
            merged_keys.extend(keys[start:i])
            merged_expiries.extend(expiries[start:i])
            merged_keys.append(key)
            merged_expiries.append(expires)
            start = i
        merged_keys.extend(keys[start:])
        merged_expiries.extend(expiries[start:])
        self.keys, self.expiries = merged_keys, merged_expiries

    def purge(self, now: float) -> None:
        self._merge()
        self.next_sweep = now + self.sweep_every
        held = array("b", map(float(now).__lt__, self.expiries))
        if not all(held):
            self.keys = array("Q", compress(self.keys, held))
            self.expiries = array("d", compress(self.expiries, held))
        self.others = {k: e for k, e in self.others.items() if e > now}
        self.earliest = min(min(self.expiries, default=float("inf")),
                            min(self.others.values(), default=float("inf")))

    def clear(self) -> None:
        self.keys, self.expiries, self.fresh, self.others = array("Q"), array("d"), {}, {}
        self.earliest = float("inf")

    def __len__(self) -> int:
        return len(self.keys) + len(self.fresh) + len(self.others)
