"""The master's signal queue (Postfix's master_sig.c): handlers only enqueue.

Python runs a handler once for several deliveries of one signal, but its C-level handler
writes one byte per delivery to the wakeup fd: those bytes are the queue, so three TTINs are
three workers (unless the kernel merged them while pending). The master's loop selects on
`fd` and takes the signals with `take`; only the loop acts on them.
"""

__all__ = ["SignalQueue"]

import collections
import os
import signal

from .worker import MASTER_SIGNALS


class SignalQueue:
    def __init__(self):
        self.pending: collections.deque[int] = collections.deque()
        self.fd, self.write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self.write_fd, False)
        signal.set_wakeup_fd(self.write_fd)
        for sig in MASTER_SIGNALS:
            signal.signal(sig, lambda signum, frame: None)

    def fds(self) -> list[int]:
        """Both ends of the pipe: a forked worker closes them."""
        return [self.fd, self.write_fd]

    def read(self) -> None:
        """What the wakeup fd holds, into the queue."""
        try:
            self.pending.extend(os.read(self.fd, 4096))
        except BlockingIOError:
            pass

    def take(self):
        """The queued signals, oldest first."""
        while self.pending:
            yield self.pending.popleft()
