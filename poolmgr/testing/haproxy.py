"""A private HAProxy (Debian's haproxy) in front of SMTP nodes: its own config on loopback
ports, `mode tcp`, each server sent the client's address in a PROXY header
(`send-proxy-v2`, or `send-proxy` for version 1) and health-checked with a LOCAL header
(`check-send-proxy`), in the foreground (-db) and stopped by its PID.

HAProxy connects to its servers from 127.0.0.1; its clients come from other 127.x.y.z
addresses, the ones the nodes must see.
"""

__all__ = ["HAProxy", "HAPROXY"]

import os
import subprocess
import tempfile
from pathlib import Path

from .wait import WaitTimeout, free_port, terminate, wait_until

HAPROXY = "/usr/sbin/haproxy"


class HAProxy:
    """`frontends`: name -> the SMTP ports of the servers it balances (round robin); each
    frontend gets a port of its own (`ports[name]`)."""

    def __init__(self, frontends: dict[str, list[int]], send_proxy: str = "send-proxy-v2",
                 workdir: Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="poolmgr-haproxy-", dir=workdir))
        self.frontends = frontends
        self.send_proxy = send_proxy
        self.ports = {name: free_port() for name in frontends}
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        """The configuration as docs/operations.md gives it, on loopback ports."""
        lines = ["global", "    maxconn 2000", "defaults", "    mode tcp",
                 "    timeout connect 5s", "    timeout client 5m", "    timeout server 5m"]
        for name, servers in self.frontends.items():
            lines += [f"listen {name}", f"    bind 127.0.0.1:{self.ports[name]}",
                      "    balance roundrobin"]
            lines += [f"    server {name}{n} 127.0.0.1:{port} {self.send_proxy} check "
                      f"check-send-proxy inter 2s" for n, port in enumerate(servers, 1)]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> "HAProxy":
        if not os.access(HAPROXY, os.X_OK):
            raise FileNotFoundError(f"{HAPROXY} not found: install Debian's haproxy")
        conf = self.dir / "haproxy.cfg"
        conf.write_text(self.config())
        self.log_path = self.dir / "haproxy.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(conf)], stdout=log,
                                         stderr=log, stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: self.proc.poll() is not None or
                       set(self.ports.values()) <= _listening(),
                timeout=timeout, interval=0.05, what="haproxy")
        except WaitTimeout:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with status {self.proc.returncode}:\n"
                               f"{self.log()[-2000:]}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None


def _listening() -> set[int]:
    """The local TCP ports in LISTEN state (read from the kernel: a test connection would be
    a session on the nodes behind)."""
    ports = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
