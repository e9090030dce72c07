"""The log lines a process could not write at once, kept in order until the log takes them.

A log handler (log.py) writes each line with a call that never waits (a datagram sent with
MSG_DONTWAIT, a write to a non-blocking pipe, a write to a file that may meet a full disk).
What that call cannot write now, `Backlog` keeps, oldest first, up to its limit of lines; a
line beyond the limit is dropped and counted, and where lines were dropped the log gets one
`warning: N log lines dropped` line, written in its place when writing resumes. Each new line
first writes what waits, so lines keep their order; the process also calls `flush` from its
own loop (log.flush), so that what waits goes out as the reader catches up even when nothing
new is logged. Threads (the master has a few) never wait for each other here either: one
that finds another writing keeps its line for the next write. Postfix's own logging
(postlogd, or syslog(3)) blocks instead; a mail server's sessions must not wait on its log.
"""

__all__ = ["Backlog", "DEFAULT_LIMIT"]

import threading
from collections import deque

DEFAULT_LIMIT = 10000  # lines: master.log_buffer's default


class _Gap:
    """Where lines were dropped: the place of the `N log lines dropped` line."""

    __slots__ = ("count",)

    def __init__(self):
        self.count = 0


class Backlog:
    """Lines (encoded, as the handler writes them) waiting for the log, at most `limit`.

    `write(data, send, gap_line)`: `send(data)` writes without waiting and returns how many
    bytes it wrote, or raises OSError when it could write nothing now (EAGAIN, ENOSPC, a
    syslog daemon gone); `gap_line(count)` makes the encoded drop line."""

    def __init__(self, limit: int = DEFAULT_LIMIT):
        self.limit = limit
        self.kept: deque = deque()
        self.lines = 0       # lines in `kept` (its gaps not counted)
        self.dropped = 0     # lines dropped since the process started: status and metrics
        self.writing = threading.Lock()  # taken without waiting, or the line is kept

    def __len__(self) -> int:
        return len(self.kept)

    def clear(self) -> None:
        """A new process (after fork): its parent writes its own lines and counts its own
        drops."""
        self.kept.clear()
        self.lines = self.dropped = 0
        self.writing = threading.Lock()  # another thread of the parent's may have held it

    def abandon(self) -> int:
        """The lines still waiting will never be written (the process exits, or its log
        destination changed): count them as dropped; how many."""
        lost = self.lines + sum(gap.count for gap in self.kept if isinstance(gap, _Gap))
        self.dropped += self.lines
        self.kept.clear()
        self.lines = 0
        return lost

    def write(self, data: bytes, send, gap_line) -> None:
        if not self.writing.acquire(blocking=False):  # another thread, or a signal handler
            self.keep(data)
            return
        try:
            if self.kept and not self._flush(send, gap_line):
                self.keep(data)
                return
            try:
                written = send(data)
            except OSError:
                written = 0
            if written < len(data):
                self.keep(data[written:], whole=written == 0)
        finally:
            self.writing.release()

    def keep(self, data: bytes, whole: bool = True) -> None:
        """Keep `data` for later, or drop it when the backlog is full. The rest of a line
        partly written is always kept: a half line must not run into the next one."""
        if whole and self.lines >= self.limit:
            if not self.kept or not isinstance(self.kept[-1], _Gap):
                self.kept.append(_Gap())
            self.kept[-1].count += 1
            self.dropped += 1
            return
        self.kept.append(data)
        self.lines += 1

    def flush(self, send, gap_line) -> bool:
        """Write what waits, in order, until the log takes no more; True when all went."""
        if not self.writing.acquire(blocking=False):
            return False
        try:
            return self._flush(send, gap_line)
        finally:
            self.writing.release()

    def _flush(self, send, gap_line) -> bool:
        kept = self.kept
        while kept:
            head = kept[0]
            data = gap_line(head.count) if isinstance(head, _Gap) else head
            try:
                written = send(data)
            except OSError:
                return False
            if written < len(data):
                if isinstance(head, _Gap):
                    self.lines += 1
                kept[0] = data[written:]
                return False
            kept.popleft()
            if not isinstance(head, _Gap):
                self.lines -= 1
        return True
