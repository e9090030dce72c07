"""Shared counters between workers and the master (the scoreboard).

An anonymous shared mmap created by the master before it forks; each worker owns one slot and
writes its heartbeat, live gauges and cumulative counters there; the master only reads, and
folds a dead worker's counters into its pool's totals when it frees the slot. Each field is an
aligned 4- or 8-byte store, so a reader never sees a torn value. After the slots, host-wide
words that only the master writes: stress mode, and the hand-off share (how many hand-offs
to the scanner pool one SMTP worker may have at once).
"""

__all__ = ["Board", "Slot", "COUNTERS", "SLOTS", "LATENCY_BUCKETS", "DNSBL_SITES_COUNTED",
           "dnsbl_error_counters"]

import bisect
import mmap
import struct
import time

from .defence.verdicts import REASONS
from .scanner.backends import NAMES as CHECK_NAMES
from .scanner.verdict import KINDS as VERDICT_KINDS

# Cumulative per-worker counters, by index. Append only: the layout is shared by all processes.
COUNTERS = (
    "connections",          # sessions accepted (SMTP pool: clients; scanner pool: hand-offs)
    "messages_accepted",    # 250 after DATA (next hop accepted)
    "messages_rejected",    # 5xx after DATA
    "messages_tempfailed",  # 4xx after DATA
    "handoffs",             # hand-offs to the proxy filter (scanner pool)
    "handoff_wait_ms",      # total time spent in hand-offs, milliseconds
    "scanned",              # messages a scanner worker finished
    "scan_ms",              # total scanner time, milliseconds
    "legit",                # sessions classified legit when they closed
) + tuple("nuisance_" + reason for reason in REASONS)  # ... or with one nuisance reason
# Latency histograms (Slot.observe): a time counts in the first bucket whose bound in seconds
# it is within; times above the last bound count only in the total (handoffs, scanned, _count).
LATENCY_BUCKETS = (0.01, 0.05, 0.25, 1.0, 5.0, 30.0)
_BUCKETS = tuple(f"le_{i}" for i in range(len(LATENCY_BUCKETS)))
# The scanner's verdicts by kind, and per check back-end: runs, failures, total microseconds,
# and its latency histogram; the hand-off (SMTP pool) and scan (scanner pool) histograms.
COUNTERS += tuple(f"verdict_{kind}" for kind in VERDICT_KINDS) + tuple(
    f"check_{name}_{what}" for name in CHECK_NAMES
    for what in ("count", "failed", "us", *_BUCKETS)) + tuple(
    f"{what}_{bucket}" for what in ("handoff", "scan") for bucket in _BUCKETS)
# The SMTP workers' calls to the cluster's Redis (cluster.RedisState): calls answered, their
# total microseconds and latency histogram, calls that failed, questions answered locally.
COUNTERS += ("cluster_calls", "cluster_us", "cluster_failures", "cluster_local") + tuple(
    f"cluster_{bucket}" for bucket in _BUCKETS)
# Time hand-offs spent waiting for their turn at a scanner worker (handoff.HandoffGate),
# microseconds: over an interval, divided by its length, the mean number waiting.
COUNTERS += ("handoff_queue_us",)
# DNSBL answers that were error codes (defence.dnsbl.error_answer): in all, and per site by its
# position in [defence] dnsbl_sites for the first DNSBL_SITES_COUNTED sites (the board's
# counters are fixed; a longer list counts its later sites in the total only).
DNSBL_SITES_COUNTED = 16
COUNTERS += ("dnsbl_errors",) + tuple(f"dnsbl_errors_{i}" for i in range(DNSBL_SITES_COUNTED))
# Log lines the worker dropped because its log could not take them (log.py, logbuffer.py).
COUNTERS += ("log_dropped",)
# SMTP workers' requests to the master's anvil that failed open (defence.anvil.AnvilClient).
COUNTERS += ("anvil_fallbacks",)
# Sessions of a load balancer's own (a PROXY header that names no client: its health checks),
# closed without a message: neither legit nor nuisance.
COUNTERS += ("health_checks",)
_NCOUNTERS = 128
assert len(COUNTERS) <= _NCOUNTERS
_COUNTER_INDEX = {name: i for i, name in enumerate(COUNTERS)}
SLOTS = 1024  # generous: pools of up to 128 workers each, plus workers still draining
# pid, kind, generation, number, heartbeat, started, sessions, busy, suspect, transacting,
# counters[_NCOUNTERS]
_HEAD = struct.Struct("=iiiiddIIII")
_SLOT_SIZE = _HEAD.size + 8 * _NCOUNTERS
_OFF_HEARTBEAT = 16
_OFF_SESSIONS = 32
_OFF_BUSY = 36
_OFF_SUSPECT = 40
_OFF_COUNTERS = _HEAD.size
KINDS = {"smtp": 1, "scanner": 2}


def dnsbl_error_counters(position: int) -> tuple[str, ...]:
    """The counters an error answer of the site at `position` in dnsbl_sites adds to."""
    if position < DNSBL_SITES_COUNTED:
        return ("dnsbl_errors", f"dnsbl_errors_{position}")
    return ("dnsbl_errors",)


class Slot:
    """A worker's handle on its own slot."""

    def __init__(self, board: "Board", index: int):
        self._mm = board._mm
        self.index = index
        self._base = index * _SLOT_SIZE
        self._flags = board.flags_offset
        # Every field this worker writes while the master reads is one item assignment
        # through a typed view (slots and counters are 8-aligned): a single store, which
        # the master never sees half done. struct.pack_into clears its bytes before it
        # writes them, and the master read a heartbeat of 0.0 there (1 read in 50 while a
        # worker beat in a loop): "no heartbeat for" the machine's uptime, and a healthy
        # worker killed.
        self._words, self._doubles, self._u32 = board._words, board._doubles, board._u32
        self._first = (self._base + _OFF_COUNTERS) // 8

    def beat(self) -> None:
        self._doubles[(self._base + _OFF_HEARTBEAT) // 8] = time.monotonic()

    def set_sessions(self, value: int) -> None:
        self._u32[(self._base + _OFF_SESSIONS) // 4] = value

    def set_busy(self, value: int) -> None:
        self._u32[(self._base + _OFF_BUSY) // 4] = value

    def set_states(self, suspect: int, transacting: int) -> None:
        """SMTP sessions by state: suspect (a test fired, or silent too long), in a mail
        transaction."""
        at = (self._base + _OFF_SUSPECT) // 4
        self._u32[at] = suspect
        self._u32[at + 1] = transacting

    def stress(self) -> bool:
        """Stress mode, as the master set it for every worker."""
        return bool(struct.unpack_from("=I", self._mm, self._flags)[0])

    def handoff_share(self) -> int:
        """Hand-offs this SMTP worker may have at once (0: not set yet, no limit)."""
        return struct.unpack_from("=I", self._mm, self._flags + 4)[0]

    def add(self, counter: str, amount: int = 1) -> None:
        self._words[self._first + _COUNTER_INDEX[counter]] += amount

    def observe(self, prefix: str, seconds: float) -> None:
        """Count `seconds` in the histogram `prefix` (its `PREFIX_le_I` bucket counters)."""
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        if index < len(LATENCY_BUCKETS):
            self.add(f"{prefix}_le_{index}")


class Board:
    """The master's view: allocates slots before fork, reads them, frees them on reap."""

    def __init__(self, slots: int = SLOTS):
        self.flags_offset = slots * _SLOT_SIZE
        self._mm = mmap.mmap(-1, self.flags_offset + 8)
        # The board as 8-byte words, doubles and 4-byte words (see Slot), one view each.
        view = memoryview(self._mm)
        self._words, self._doubles, self._u32 = view.cast("Q"), view.cast("d"), view.cast("I")
        self._free = list(range(slots - 1, -1, -1))

    def alloc(self, kind: str, generation: int, number: int) -> int:
        index = self._free.pop()
        now = time.monotonic()
        _HEAD.pack_into(self._mm, index * _SLOT_SIZE, 0, KINDS[kind], generation, number,
                        now, now, 0, 0, 0, 0)
        self._mm[index * _SLOT_SIZE + _OFF_COUNTERS:(index + 1) * _SLOT_SIZE] = \
            bytes(8 * _NCOUNTERS)
        return index

    def set_stress(self, on: bool) -> None:  # one store each, as a worker's own fields
        self._u32[self.flags_offset // 4] = int(on)

    def set_handoff_share(self, share: int) -> None:
        self._u32[self.flags_offset // 4 + 1] = share

    def slot(self, index: int) -> Slot:
        return Slot(self, index)

    def read(self, index: int) -> dict:
        base = index * _SLOT_SIZE
        pid, kind, generation, number, _, started, sessions, busy, suspect, \
            transacting = _HEAD.unpack_from(self._mm, base)
        heartbeat = self._doubles[(base + _OFF_HEARTBEAT) // 8]  # one load: never torn
        counters = struct.unpack_from(f"={_NCOUNTERS}Q", self._mm, base + _OFF_COUNTERS)
        return {"heartbeat": heartbeat, "sessions": sessions, "busy": busy, "suspect": suspect,
                "transacting": transacting,
                "counters": dict(zip(COUNTERS, counters))}

    def serving(self, index: int) -> bool:
        """Whether the worker has beaten once: its first heartbeat comes after its listeners
        are open (the SMTP worker's servers started, the scanner worker in its accept loop)."""
        heartbeat, started = struct.unpack_from("=dd", self._mm,
                                                index * _SLOT_SIZE + _OFF_HEARTBEAT)
        return heartbeat > started

    def free(self, index: int) -> dict:
        """Release a dead worker's slot; returns its final counters."""
        counters = self.read(index)["counters"]
        self._free.append(index)
        return counters
