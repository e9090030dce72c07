"""The kernel's side of a large storm, as the bench sees it: the settings to check before one,
the target's accept queue while it lasts, and the connections the kernel dropped.

`settings` reads what bounds a listener holding tens of thousands of sessions on one box
(README, "Large storms"): `net.core.somaxconn` (the cap on any listen backlog),
`net.ipv4.tcp_max_syn_backlog` and `tcp_syncookies` (half-open connections), the ephemeral
port range (ports per source address and destination: the load generator uses one source
address per client for that reason), `nf_conntrack_max` when connection tracking is loaded
(every connection, both ends, takes an entry), and the open-files limit of one process.
`warnings` says which of them a run of that many connections and that listen backlog would
hit. `accept_queue` is the connections waiting to be accepted on the target's listening
ports now (`ss -ltn`: Recv-Q of a listener), `drops` the kernel's counters of connections
refused because an accept queue was full (`TcpExtListenOverflows`, `TcpExtListenDrops` in
/proc/net/netstat, as `nstat` shows them) and of SYN cookies sent: counters of the whole
machine, so the bench reports their change over its run, to loopback only.
"""

__all__ = ["settings", "warnings", "accept_queue", "drops", "DROP_COUNTERS"]

import resource
import subprocess
from pathlib import Path

SYSCTL = {"somaxconn": "net/core/somaxconn",
          "tcp_max_syn_backlog": "net/ipv4/tcp_max_syn_backlog",
          "tcp_syncookies": "net/ipv4/tcp_syncookies",
          "ip_local_port_range": "net/ipv4/ip_local_port_range",
          "nf_conntrack_max": "net/netfilter/nf_conntrack_max",
          "nf_conntrack_count": "net/netfilter/nf_conntrack_count",
          "file_max": "fs/file-max"}
DROP_COUNTERS = ("ListenOverflows", "ListenDrops", "SyncookiesSent")


def _sysctl(name: str) -> str | None:
    try:
        return (Path("/proc/sys") / name).read_text().strip()
    except OSError:  # not on this kernel (nf_conntrack not loaded)
        return None


def settings() -> dict:
    """The kernel settings that bound a large storm on this machine (None: not present)."""
    found: dict = {}
    for key, name in SYSCTL.items():
        text = _sysctl(name)
        if key == "ip_local_port_range":
            low, high = (int(v) for v in text.split()) if text else (0, -1)
            found["ephemeral_ports_per_source"] = high - low + 1
        else:
            found[key] = int(text) if text is not None else None
    found["open_files_per_process"] = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return found


def warnings(found: dict, connections: int, listen_backlog: int,
             sessions_per_worker: int | None = None) -> list[str]:
    """What in `found` (`settings()`) a run of `connections` at once, with this listen
    backlog (and poolmgr's sessions per worker), would run into."""
    out = []
    if found.get("somaxconn") is not None and listen_backlog > found["somaxconn"]:
        out.append(f"listen_backlog {listen_backlog} is above net.core.somaxconn "
                   f"{found['somaxconn']}: the kernel caps it there")
    if found.get("nf_conntrack_max") is not None and 2 * connections > found["nf_conntrack_max"]:
        out.append(f"nf_conntrack_max {found['nf_conntrack_max']} is under the "
                   f"{2 * connections} entries both ends of {connections} connections take")
    files = found["open_files_per_process"]
    if sessions_per_worker is not None and sessions_per_worker >= files:
        out.append(f"max_sessions_per_worker {sessions_per_worker} is not below the "
                   f"open-files limit {files}")
    if found.get("file_max") is not None and 2 * connections > found["file_max"]:
        out.append(f"fs.file-max {found['file_max']} is under the {2 * connections} sockets "
                   f"of both ends")
    return out


def accept_queue(ports: list[int]) -> int | None:
    """Connections waiting in the accept queues of the listeners on `ports` (None when `ss`
    cannot say)."""
    try:
        text = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True,
                              timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    queued = 0
    for line in text.splitlines():
        fields = line.split()  # State Recv-Q Send-Q Local:Port Peer:Port
        if len(fields) >= 4 and fields[3].rpartition(":")[2].isdigit() and \
                int(fields[3].rpartition(":")[2]) in ports:
            queued += int(fields[1])
    return queued


def drops() -> dict[str, int]:
    """The machine's accept-queue drop and SYN cookie counters now (TcpExt)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:])))
            return {key: table.get(key, 0) for key in DROP_COUNTERS}
    return {}
