"""Freed memory goes back to the system after a peak (glibc's `malloc_trim`).

A storm leaves an SMTP worker with the memory of thousands of finished sessions freed, and
the master with a storm's worth of client state swept out of its caches; but glibc keeps
freed pages resident while live blocks lie around them, so each storm would leave the process
at a new high-water mark (a first hour-long soak grew the SMTP workers and the master by about
a fifth). `Trimmer.tick` asks glibc to hand back every whole free page (`malloc_trim(0)`: about 3
ms on a quiet 40 MB heap, 20-70 ms when a storm's hundreds of MB lie freed, a pause of the
worker's hub that is rare and comes when it is calm) at most once a `every` seconds, and not while the load is above half of
its peak since the last trim (a storm still going on would fault the pages straight back).
Elsewhere than glibc (musl, macOS) there is nothing to call and `tick` does nothing.
"""

__all__ = ["Trimmer", "TRIM_EVERY"]

import ctypes

TRIM_EVERY = 60.0  # seconds between trims, at least


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library this interpreter runs on
    except (OSError, AttributeError):
        return None


class Trimmer:
    def __init__(self, every: float = TRIM_EVERY):
        self.every = every
        self.trim = _malloc_trim()
        self.next = 0.0
        self.peak = 0  # the highest load since the last trim
        self.trims = 0

    def tick(self, load: int, now: float) -> bool:
        """Called about once a second with the current load (sessions; 0 where there is no
        such measure); True when it trimmed."""
        self.peak = max(self.peak, load)
        if self.trim is None or now < self.next or load * 2 > self.peak:
            return False
        self.trim(0)
        self.next, self.peak = now + self.every, load
        self.trims += 1
        return True
