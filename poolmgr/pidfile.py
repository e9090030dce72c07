"""The master's pidfile: refuse to start beside a live poolmgr, write ours, remove it if ours.

A pidfile naming a process that is gone, or that is not poolmgr (a pid reused after a crash),
is stale and overwritten. After a USR2 upgrade the pidfile is the successor's: the old master
leaves it alone when it stops.
"""

__all__ = ["check", "write", "remove"]

import os

import psutil


def check(path: str, predecessor: int | None) -> None:
    """SystemExit when another poolmgr (not this one, not the master it replaces) runs."""
    try:
        with open(path) as handle:
            pid = int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return
    if not pid or pid in (os.getpid(), predecessor) or not psutil.pid_exists(pid):
        return
    try:
        alive = "poolmgr" in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        alive = False
    if alive:
        raise SystemExit(f"fatal: poolmgr is already running (pid {pid}, pidfile {path})")


def write(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(f"{os.getpid()}\n")


def remove(path: str) -> None:
    """Remove the pidfile if it still names this process."""
    try:
        with open(path) as handle:
            mine = handle.read().strip() == str(os.getpid())
        if mine:
            os.unlink(path)
    except OSError:
        pass
