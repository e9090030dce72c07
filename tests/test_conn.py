"""The line and DATA reader on real socket pairs."""

import socket
import threading

import pytest

from poolmgr.smtp.conn import Conn, Disconnected, LineTooLong, Timeout


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield Conn(a, timeout=5), b
    a.close()
    b.close()


def feed(peer, data: bytes, chunk: int = 0):
    def run():
        if chunk:
            for i in range(0, len(data), chunk):
                peer.sendall(data[i:i + chunk])
        else:
            peer.sendall(data)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_lines_crlf_and_lf(pair):
    conn, peer = pair
    peer.sendall(b"EHLO a\r\nNOOP\nQUIT\r\n")
    assert [conn.readline(100) for _ in range(3)] == [b"EHLO a", b"NOOP", b"QUIT"]


def test_line_too_long_is_skipped_to_its_end(pair):
    conn, peer = pair
    feed(peer, b"X" * 5000 + b"\r\nNOOP\r\n", chunk=1000).join()
    with pytest.raises(LineTooLong):
        conn.readline(512)
    assert conn.readline(512) == b"NOOP"


@pytest.mark.parametrize("chunk", [0, 1, 3, 7])
def test_data_end_unstuffing_and_leftover(pair, chunk):
    conn, peer = pair
    feed(peer, b"a\r\n..b\r\n\r\nc\r\n.\r\nQUIT\r\n", chunk).join()
    result = conn.read_data(1000)
    assert result.problem == "" and result.data == b"a\r\n.b\r\n\r\nc\r\n"
    assert conn.readline(100) == b"QUIT"


def test_empty_message_and_leading_dot(pair):
    conn, peer = pair
    peer.sendall(b".\r\n..x\r\n.\r\n")
    assert conn.read_data(100).data == b""
    assert conn.read_data(100).data == b".x\r\n"


@pytest.mark.parametrize("body,problem", [(b"a\nb\r\n", "bare_lf"), (b"a\rb\r\n", "bare_cr"),
                                          (b"a\r\n.\nMAIL FROM:<x>\r\n", "bare_lf")])
def test_bare_line_endings_are_reported(pair, body, problem):
    conn, peer = pair
    peer.sendall(body + b".\r\nNOOP\r\n")
    result = conn.read_data(1000)
    assert result.problem == problem and result.data is None
    assert conn.readline(100) == b"NOOP"  # still in step


def test_oversized_message_is_drained_and_dropped(pair):
    conn, peer = pair
    thread = feed(peer, b"x" * 100 + b"\r\n" * 50000 + b".\r\nNOOP\r\n", chunk=4096)
    result = conn.read_data(10000)
    thread.join()
    assert result.problem == "too_big" and result.data is None and result.size > 10000
    assert conn.readline(100) == b"NOOP"


def test_timeout_and_disconnect(pair):
    conn, peer = pair
    conn.timeout = 0.2
    with pytest.raises(Timeout):
        conn.readline(100)
    peer.close()
    with pytest.raises(Disconnected):
        conn.readline(100)


def test_tick_is_called_while_waiting(pair):
    conn, peer = pair
    ticks = []
    conn.tick = lambda: ticks.append(1)
    conn.timeout = 2.5
    with pytest.raises(Timeout):
        conn.readline(100)
    assert len(ticks) >= 2


def test_send_data_stuffs_dots(pair):
    conn, peer = pair
    conn.send_data(b".a\r\nb\r\n.c", 5)
    peer.settimeout(2)
    assert peer.recv(100) == b"..a\r\nb\r\n..c\r\n.\r\n"
