"""Zero-downtime upgrade of poolmgr itself (gunicorn's USR2): the running master starts a new
master from the installed code, handing it the listening sockets; the new master binds nothing,
starts its pools on those sockets, and once both serve it tells the old master to stop
(SIGTERM), which drains its workers as on any graceful stop. The kernel's accept queues never
close, so no connection is refused during the switch.

The new master learns of its predecessor from `POOLMGR_UPGRADE_FROM` (the old master's pid)
and of its sockets from `POOLMGR_FDS` (listen.inherited). It may take over the pidfile and the
control socket while the old master still runs; the old one then leaves both alone when it
stops (`Master.teardown`).
"""

__all__ = ["start_successor", "predecessor", "FROM_ENV", "Upgrade"]

import os
import signal
import socket
import subprocess
import sys

import psutil

from .listen import INHERIT_ENV

FROM_ENV = "POOLMGR_UPGRADE_FROM"


def start_successor(config_path: str | None, sockets: list[socket.socket]) -> int:
    """Start `poolmgr run` from the installed code with `sockets`; the new master's pid.
    Raises OSError when it cannot be started."""
    fds = [sock.fileno() for sock in sockets]
    env = {**os.environ, INHERIT_ENV: ",".join(map(str, fds)), FROM_ENV: str(os.getpid())}
    command = [sys.executable, "-m", "poolmgr", "run"]
    if config_path:
        command += ["-c", config_path]
    proc = subprocess.Popen(command, pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
    return proc.pid


def predecessor(environ=os.environ) -> int | None:
    """The pid of the master this one replaces (removed from the environment: read once)."""
    value = environ.pop(FROM_ENV, "")
    return int(value) if value.isdigit() else None


class Upgrade:
    """This master's part in upgrades: the master it replaces, and the one it started."""

    def __init__(self):
        self.predecessor = predecessor()
        self.successor = 0

    def starting(self) -> bool:
        """A successor this master started still runs."""
        return bool(self.successor) and psutil.pid_exists(self.successor)

    def start(self, config_path: str | None, sockets: list[socket.socket]) -> int:
        """Start the successor (OSError when it cannot be); its pid."""
        self.successor = start_successor(config_path, sockets)
        return self.successor

    def relieve(self) -> int | None:
        """This master serves: stop its predecessor (SIGTERM, a graceful stop); its pid."""
        pid, self.predecessor = self.predecessor, None
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        return pid
