"""heap.Trimmer: after a peak, the memory it freed goes back to the system; never during one."""

import ctypes

import pytest

from poolmgr.heap import Trimmer


def rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4


def test_trimming_after_a_peak_gives_freed_memory_back():
    trimmer = Trimmer(every=60)
    if trimmer.trim is None:
        pytest.fail("no malloc_trim in this C library: the Debian machines this runs on have it")
    trimmer.trim(0)
    before = rss_kib()
    # A storm's worth of sessions: blocks above pymalloc's limit (glibc's heap), a few of them
    # outliving the rest so that the freed ones lie between live ones.
    blocks = [bytearray(700) for _ in range(60_000)]
    kept = blocks[::64]
    del blocks
    held = rss_kib() - before
    assert held > 20_000  # freed, yet still resident
    assert trimmer.tick(load=0, now=1000.0) is True
    assert rss_kib() - before < held / 3  # what is left: the pages the kept blocks lie on
    assert trimmer.trims == 1 and kept


def test_no_trim_while_the_load_is_above_half_its_peak_nor_more_than_once_a_period():
    trimmer = Trimmer(every=60)
    trimmer.trim = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_size_t)(lambda pad: 1)
    assert trimmer.tick(load=0, now=0.0) is True  # idle: trims
    assert trimmer.tick(load=0, now=30.0) is False  # not twice within the period
    assert [trimmer.tick(load=n, now=61.0 + n) for n in (100, 800, 500)] == [False] * 3  # storm
    assert trimmer.tick(load=390, now=70.0) is True  # under half of the peak (800): over
    assert trimmer.tick(load=10, now=100.0) is False and trimmer.trims == 2
