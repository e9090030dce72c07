"""The listening sockets the master binds and the workers inherit, and their accept queue.

`bind` makes a listening socket (IPv4 or IPv6 by the address) or exits with a one-line
reason; `bind_all` binds each address of a list (`smtp.listen`). The IPv6 wildcard `::` is
bound dual stack (IPV6_V6ONLY off, set explicitly rather than left to net.ipv6.bindv6only),
so IPv4 clients reach it as `::ffff:a.b.c.d`, unless the same list also binds `0.0.0.0` on that
port: then `::` is IPv6 only and the two sockets split the families (as Postfix does).
`accept_queue` reads how many connections wait in the accept queues, from Linux's TCP_INFO:
for a listening socket the kernel reports the queue length in `tcpi_unacked` and the listen
backlog in `tcpi_sacked`.

Sockets already listening can be handed in instead of bound, so that no connection is refused
while poolmgr restarts: from systemd's socket activation (`LISTEN_PID`, `LISTEN_FDS`, the fds
from 3 on, sd_listen_fds(3)) or from the master a `USR2` upgrade replaces (`POOLMGR_FDS`, a
comma-separated list, see upgrade.py). `inherited` reads them, keyed by the address each is
bound to; `bind` takes the one for its address.
"""

__all__ = ["bind", "bind_all", "accept_queue", "inherited", "INHERIT_ENV", "bind_pools"]

import os
import socket
import struct

from .config import format_address

_TCP_INFO_SIZE = 104
_UNACKED_SACKED = 24  # offset of tcpi_unacked, tcpi_sacked (u32 each) in struct tcp_info


INHERIT_ENV = "POOLMGR_FDS"
_SD_LISTEN_FDS_START = 3


def inherited(environ=os.environ) -> dict[tuple[str, int], socket.socket]:
    """Listening TCP sockets handed to this process, by (host, port); the variables that
    named them are removed, so that workers and successors do not take them again."""
    fds: list[int] = []
    if environ.get("LISTEN_PID") == str(os.getpid()):
        try:
            fds = list(range(_SD_LISTEN_FDS_START,
                             _SD_LISTEN_FDS_START + int(environ.get("LISTEN_FDS", "0"))))
        except ValueError:
            fds = []
    elif environ.get(INHERIT_ENV):
        fds = [int(fd) for fd in environ[INHERIT_ENV].split(",") if fd.strip().isdigit()]
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", INHERIT_ENV):
        environ.pop(name, None)
    found = {}
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        if sock.type != socket.SOCK_STREAM or \
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0:
            sock.detach()
            continue
        sock.set_inheritable(False)
        host, port = sock.getsockname()[:2]
        found[(host, port)] = sock
    return found


def bind(address: tuple[str, int], listen_backlog: int, v6only: bool = False,
         handed: dict[tuple[str, int], socket.socket] | None = None) -> socket.socket:
    """A socket listening on `address`: the one handed in for it, or a new one."""
    if handed and address in handed:
        return handed.pop(address)
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if address[0] == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SystemExit(f"fatal: bind {format_address(address)}: {exc.strerror}") from None
    sock.listen(listen_backlog)
    return sock


def bind_all(addresses, listen_backlog: int,
             handed: dict[tuple[str, int], socket.socket] | None = None) -> list[socket.socket]:
    """One listening socket per address, in order; the first that fails closes the others."""
    socks: list[socket.socket] = []
    try:
        for host, port in addresses:
            socks.append(bind((host, port), listen_backlog,
                              v6only=host == "::" and ("0.0.0.0", port) in addresses,
                              handed=handed))
    except SystemExit:
        for sock in socks:
            sock.close()
        raise
    return socks


def bind_pools(cfg, log) -> dict[str, list[socket.socket]]:
    """Both pools' listening sockets: the SMTP pool's (one per smtp.listen address; none in
    scanner-only mode) and the scanner pool's (scanner.listen and each policy bank's), taken
    over where inherited."""
    handed = inherited()  # systemd's socket activation, or a USR2 upgrade
    smtp = () if cfg.scanner_only else cfg.smtp.listen
    sockets = {"smtp": bind_all(smtp, cfg.smtp.listen_backlog, handed),
               "scanner": bind_all(cfg.scanner_addresses(), cfg.scanner.listen_backlog, handed)}
    for address, sock in handed.items():
        log.warning("inherited socket %s is not in the configuration: closed",
                    format_address(address))
        sock.close()
    return sockets


def _queue(sock: socket.socket, listen_backlog: int) -> tuple[int, int]:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        queued, backlog = struct.unpack_from("=II", info, _UNACKED_SACKED)
        return queued, max(1, backlog)
    except (OSError, struct.error):
        return 0, max(1, listen_backlog)


def accept_queue(socks, listen_backlog: int) -> tuple[int, int]:
    """(connections waiting to be accepted, listen backlog) of the fullest of the listening
    sockets `socks`: a full queue refuses its clients however idle the others are. (0, the
    configured backlog) where TCP_INFO cannot be read."""
    return max((_queue(sock, listen_backlog) for sock in socks),
               key=lambda q: q[0] / q[1], default=(0, max(1, listen_backlog)))
