"""The embedded maildir next hop: safe local delivery for the default configuration.

A message is written to `tmp/`, fsynced, renamed into `new/` and the directory fsynced, the
Maildir protocol (https://cr.yp.to/proto/maildir.html): once `deliver` returns, the message
survives a crash, which is what lets the scanner answer 250.
"""

__all__ = ["prepare", "deliver", "write_synced"]

import itertools
import os
import socket
import time

_counter = itertools.count(1)


def prepare(path: str) -> list[str]:
    """Create the maildir; its directories, for the master to hand to the workers' user."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    return [path] + [os.path.join(path, sub) for sub in ("tmp", "new", "cur")]


def write_synced(tmp: str, final: str, data: bytes) -> None:
    """Write `data` to the new file `tmp`, sync it, and rename it to `final`: the file is
    either complete under its final name or not there. Raises OSError (nothing left behind)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, final)


def deliver(path: str, data: bytes) -> str:
    """Write one message; returns its file name in new/. Raises OSError on failure."""
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    name = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}.{host}"
    write_synced(os.path.join(path, "tmp", name), os.path.join(path, "new", name), data)
    dirfd = os.open(os.path.join(path, "new"), os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return name
