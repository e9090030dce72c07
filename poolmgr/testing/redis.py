"""A private redis-server (Debian's redis-server) for the cluster tests and the bench: its own
config on a loopback port or a Unix socket in a directory of its own, no persistence, started
and stopped by its PID; `stop` and `start` again on the same port and socket is Redis down and
back, `kill` is a crash.

`SentinelGroup` is the highly available setup docs/operations.md gives: a master, a replica
(`replicaof` the master) and three sentinels (Debian's redis-sentinel: `redis-server CONF
--sentinel`, each with a config file of its own, which Sentinel rewrites), quorum 2, with a
short `down-after-milliseconds` and `failover-timeout` so that a failover takes seconds. With
`password`, the master and the replica ask for it (requirepass, masterauth) and the sentinels
use it (auth-pass); with `sentinel_password`, the sentinels ask for their own (requirepass,
sentinel-pass among themselves).
"""

__all__ = ["RedisServer", "RedisSentinel", "SentinelGroup", "ping", "ask"]

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from .wait import WaitTimeout, free_port, terminate, wait_until

REDIS_SERVER = "/usr/bin/redis-server"


def ask(port: int, *words: str, host: str = "127.0.0.1",
        password: str | None = None) -> list | str | int | None:
    """One command to the Redis or Sentinel on `port` (RESP2), its reply decoded: a list, a
    string, an int or None; an error reply raises RuntimeError. `password`: AUTH first."""
    with socket.create_connection((host, port), timeout=2) as sock:
        stream = sock.makefile("rb")
        for command in ([("AUTH", password)] if password else []) + [words]:
            request = f"*{len(command)}\r\n" + "".join(f"${len(w.encode())}\r\n{w}\r\n"
                                                        for w in command)
            sock.sendall(request.encode())
            reply = _reply(stream)
        return reply


def _reply(stream):
    line = stream.readline()
    if not line:
        raise ConnectionError("no reply")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        return None if int(rest) < 0 else stream.read(int(rest) + 2)[:-2].decode()
    if kind == b"*":
        return None if int(rest) < 0 else [_reply(stream) for _ in range(int(rest))]
    raise ConnectionError(f"unexpected reply {line!r}")


def ping(host: str = "127.0.0.1", port: int = 0, path: str = "") -> bool:
    """Whether Redis answers PING (over TCP, or the Unix socket `path`): PONG, or that it
    wants a password."""
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
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up, with a password
    except OSError:
        return False


class RedisServer:
    """redis-server in the foreground on 127.0.0.1:`port` and the socket `socket`."""

    def __init__(self, workdir: Path | None = None, port: int | None = None,
                 replica_of: int | None = None, password: str | None = None):
        # A directory of our own: the socket path must stay under the 107-byte limit.
        self.dir = Path(tempfile.mkdtemp(prefix="poolmgr-redis-", dir=workdir))
        self.port = port or free_port()
        self.socket = self.dir / "redis.sock"
        self.replica_of = replica_of  # the master's port on 127.0.0.1
        self.password = password  # requirepass, and a replica's masterauth
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

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
            "protected-mode yes",
            "repl-diskless-sync-delay 0"] +  # a replica syncs at once, not 5 s later
            ([f"replicaof 127.0.0.1 {self.replica_of}"] if self.replica_of else []) +
            ([f"requirepass {self.password}", f"masterauth {self.password}"]
             if self.password else [])) + "\n")
        return conf

    def start(self, timeout: float = 20.0) -> "RedisServer":
        if not os.access(REDIS_SERVER, os.X_OK):
            raise FileNotFoundError(f"{REDIS_SERVER} not found: install Debian's redis-server")
        conf = self.write_config()
        self.proc = subprocess.Popen(self.command(conf), stdout=subprocess.DEVNULL,
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

    def command(self, conf: Path) -> list[str]:
        return [REDIS_SERVER, str(conf)]

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, keep: bool = False) -> None:
        """Stop redis-server by its pid; `keep` keeps the directory for a restart."""
        terminate(self.proc)
        self.proc = None
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """A crash: SIGKILL by its pid (the directory stays, for its log)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisSentinel(RedisServer):
    """One sentinel (`redis-server CONF --sentinel`) watching the master on `master_port` as
    `name`, on 127.0.0.1:`port`, in a directory of its own."""

    def __init__(self, master_port: int, name: str, quorum: int, down_after_ms: int,
                 failover_timeout_ms: int, workdir: Path | None = None,
                 password: str | None = None, auth_pass: str | None = None):
        super().__init__(workdir, password=password)  # the sentinel's own requirepass
        self.master_port, self.name, self.quorum = master_port, name, quorum
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.auth_pass = auth_pass  # the master's and the replica's password

    def write_config(self) -> Path:
        conf = self.dir / "sentinel.conf"  # Sentinel rewrites it: its own file, writable
        conf.write_text("\n".join([
            "bind 127.0.0.1", f"port {self.port}", "daemonize no", f"dir {self.dir}",
            f"logfile {self.dir / 'redis.log'}", "protected-mode yes",
            f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}",
            f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.name} 1"] +
            ([f"sentinel auth-pass {self.name} {self.auth_pass}"] if self.auth_pass else []) +
            # The sentinels talk to each other with their own password.
            ([f"requirepass {self.password}", f"sentinel sentinel-pass {self.password}"]
             if self.password else [])) + "\n")
        return conf

    def command(self, conf: Path) -> list[str]:
        return [REDIS_SERVER, str(conf), "--sentinel"]

    def master(self) -> dict[str, str]:
        """`SENTINEL MASTER name`: this sentinel's view of the master, field by field."""
        fields = ask(self.port, "SENTINEL", "MASTER", self.name, password=self.password)
        return dict(zip(fields[::2], fields[1::2]))


class SentinelGroup:
    """A master, its replica and `count` sentinels on loopback: `addresses` is what
    `[cluster] sentinels` lists, `name` its `sentinel_master`. `ready()` waits until every
    sentinel knows the replica and the other sentinels, so that a failover can be voted."""

    def __init__(self, name: str = "poolmgr", count: int = 3, quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 2000,
                 workdir: Path | None = None, password: str | None = None,
                 sentinel_password: str | None = None):
        self.name = name
        self.password = password  # the master's and the replica's requirepass
        self.master = RedisServer(workdir, password=password)
        self.replica = RedisServer(workdir, replica_of=self.master.port, password=password)
        self.sentinels = [RedisSentinel(self.master.port, name, quorum, down_after_ms,
                                        failover_timeout_ms, workdir, sentinel_password,
                                        password) for _ in range(count)]

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def start(self, timeout: float = 20.0) -> "SentinelGroup":
        try:
            for server in (self.master, self.replica, *self.sentinels):
                server.start(timeout)
            self.ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self, timeout: float = 20.0) -> None:
        def replicating() -> bool:
            info = ask(self.replica.port, "INFO", "replication", password=self.password)
            return "master_link_status:up" in info

        def known(sentinel: RedisSentinel) -> bool:
            view = sentinel.master()
            return (view.get("num-other-sentinels") == str(len(self.sentinels) - 1) and
                    view.get("num-slaves") == "1" and view.get("flags") == "master")

        wait_until(replicating, timeout=timeout, interval=0.05, what="the replica in sync")
        # Sentinels find each other through the master's hello channel, every 2 s.
        wait_until(lambda: all(known(s) for s in self.sentinels), timeout=timeout,
                   interval=0.1, what="every sentinel seeing the replica and the others")

    def logs(self) -> str:
        return "\n".join(f"== {s.address}\n{s.log()[-3000:]}"
                         for s in (self.master, self.replica, *self.sentinels))

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            server.stop()

    def __enter__(self) -> "SentinelGroup":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
