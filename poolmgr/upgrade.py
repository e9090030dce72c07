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

__all__ = ["start_successor", "predecessor", "FROM_ENV"]

import os
import socket
import subprocess
import sys

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
