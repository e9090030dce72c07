"""A private redis-server (Debian's redis-server) for the cluster tests and the bench: its own
config on a loopback port or a Unix socket in a directory of its own, no persistence, started
and stopped by its PID; `stop` and `start` again on the same port and socket is Redis down and
back.
"""

__all__ = ["RedisServer", "ping"]

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from .wait import WaitTimeout, free_port, terminate, wait_until

REDIS_SERVER = "/usr/bin/redis-server"


def ping(host: str = "127.0.0.1", port: int = 0, path: str = "") -> bool:
    """Whether Redis answers PING with PONG (over TCP, or the Unix socket `path`)."""
    try:
        if path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = path
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (host, port)
        with sock:
            sock.settimeout(2)
            sock.connect(target)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """redis-server in the foreground on 127.0.0.1:`port` and the socket `socket`."""

    def __init__(self, workdir: Path | None = None, port: int | None = None):
        # A directory of our own: the socket path must stay under the 107-byte limit.
        self.dir = Path(tempfile.mkdtemp(prefix="poolmgr-redis-", dir=workdir))
        self.port = port or free_port()
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def write_config(self) -> Path:
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join([
            "bind 127.0.0.1", f"port {self.port}", f"unixsocket {self.socket}",
            "unixsocketperm 777", "daemonize no", "save \"\"", "appendonly no",
            f"dir {self.dir}", f"logfile {self.dir / 'redis.log'}", "databases 4",
            "protected-mode yes"]) + "\n")
        return conf

    def start(self, timeout: float = 20.0) -> "RedisServer":
        if not os.access(REDIS_SERVER, os.X_OK):
            raise FileNotFoundError(f"{REDIS_SERVER} not found: install Debian's redis-server")
        conf = self.write_config()
        self.proc = subprocess.Popen([REDIS_SERVER, str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: self.proc.poll() is not None or ping(port=self.port),
                       timeout=timeout, interval=0.05, what="redis-server")
        except WaitTimeout:
            self.stop(keep=True)
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with status {self.proc.returncode}:\n"
                               f"{self.log()[-2000:]}")
        return self

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, keep: bool = False) -> None:
        """Stop redis-server by its pid; `keep` keeps the directory for a restart."""
        terminate(self.proc)
        self.proc = None
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
