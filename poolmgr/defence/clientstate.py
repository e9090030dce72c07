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
from typing import NamedTuple

_MAX_ENTRIES = 200_000  # per cache: a storm of distinct clients cannot grow it without bound
_SWEEP_EVERY = 60.0  # seconds between sweeps of a cache's expired entries


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

    def _expiry(self, entry) -> float:
        return entry[0]

    def purge(self, now: float) -> None:
        self.next_sweep = now + self.sweep_every
        expiry = self._expiry
        self.entries = {k: v for k, v in self.entries.items() if expiry(v) > now}
        self.earliest = min(map(expiry, self.entries.values()), default=float("inf"))

    def __len__(self) -> int:
        return len(self.entries)


class PassCache(TtlCache):
    """The greet test's passes: addresses held for `greet_ttl` (a day by default), so the
    cache that grows longest. Each is kept small (about 70 bytes, against 170 as a
    `TtlCache` entry): the address as an int, its expiry rounded down to a 1,024th of the
    TTL and shared by every pass that expires then (a pass ends at most that much early)."""

    def __init__(self, max_entries: int = _MAX_ENTRIES, sweep_every: float = _SWEEP_EVERY):
        super().__init__(max_entries, sweep_every)
        self.stamps: dict[float, float] = {}  # each expiry in use, one object for all

    @staticmethod
    def _key(ip: str):
        try:
            if ":" in ip:
                return int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big") | 1 << 128
            return int.from_bytes(socket.inet_aton(ip), "big") if ip.count(".") == 3 else ip
        except OSError:  # not an address (as in tests): itself
            return ip

    def holds(self, ip: str, now: float) -> bool:
        expires = self.entries.get(self._key(ip))
        return expires is not None and expires > now

    def add(self, ip: str, ttl: float, now: float) -> None:
        self._make_room(now)
        grain = ttl / 1024
        expires = now + ttl if grain <= 0 else (now + ttl) // grain * grain
        expires = self.stamps.setdefault(expires, expires)
        self.entries[self._key(ip)] = expires
        self.earliest = min(self.earliest, expires)

    def _expiry(self, entry) -> float:
        return entry

    def purge(self, now: float) -> None:
        super().purge(now)
        self.stamps = {t: t for t in self.stamps if t > now}

    def clear(self) -> None:
        super().clear()
        self.stamps.clear()
