"""The listening sockets the master binds and the workers inherit, and their accept queue.

`bind` makes a listening socket (IPv4 or IPv6 by the address) or exits with a one-line
reason. `accept_queue` reads how many connections wait in a listening socket's accept queue,
from Linux's TCP_INFO: for a listening socket the kernel reports the queue length in
`tcpi_unacked` and the listen backlog in `tcpi_sacked`.

Exports: bind, accept_queue.
"""

import socket
import struct

from .config import format_address

_TCP_INFO_SIZE = 104
_UNACKED_SACKED = 24  # offset of tcpi_unacked, tcpi_sacked (u32 each) in struct tcp_info


def bind(address: tuple[str, int], listen_backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SystemExit(f"fatal: bind {format_address(address)}: {exc.strerror}") from None
    sock.listen(listen_backlog)
    return sock


def accept_queue(sock: socket.socket, listen_backlog: int) -> tuple[int, int]:
    """(connections waiting to be accepted, listen backlog); (0, the configured backlog) where
    TCP_INFO cannot be read."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        queued, backlog = struct.unpack_from("=II", info, _UNACKED_SACKED)
        return queued, max(1, backlog)
    except (OSError, struct.error):
        return 0, max(1, listen_backlog)
