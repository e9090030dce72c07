"""The line and DATA reader on real socket pairs."""

import socket
import threading
import time

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


def trickle(peer, data: bytes, gap: float):
    """Send `data` one byte every `gap` seconds from a thread, until done or the reader left."""
    def run():
        for byte in data:
            try:
                peer.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(gap)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("per_record", [True, False])
def test_per_record_deadline_bounds_a_whole_line(pair, per_record):
    conn, peer = pair
    conn.timeout, conn.per_record = 1.0, per_record
    trickle(peer, b"EHLO x.test\r\n", 0.2)  # 2.6 s for the line, 0.2 s between bytes
    started = time.monotonic()
    if per_record:
        with pytest.raises(Timeout) as info:
            conn.readline(100)
        assert info.value.slow
        assert time.monotonic() - started < 2.2  # cut at about 1 s, not at the line's end
    else:
        assert conn.readline(100) == b"EHLO x.test"


def test_an_idle_client_is_not_slow(pair):
    conn, peer = pair
    conn.timeout, conn.per_record, conn.min_data_rate = 0.3, True, 500
    with pytest.raises(Timeout) as info:
        conn.readline(100)
    assert not info.value.slow
    with pytest.raises(Timeout) as info:
        conn.read_data(1000)
    assert not info.value.slow


@pytest.mark.parametrize("rate", [500, 0])
def test_min_data_rate_cuts_a_trickled_message(pair, rate):
    conn, peer = pair
    conn.timeout, conn.per_record, conn.min_data_rate = 1.0, True, rate
    trickle(peer, b"Subject: slow\r\n\r\nbody\r\n.\r\n", 0.1)  # 10 bytes/s, 2.6 s
    started = time.monotonic()
    if rate:
        with pytest.raises(Timeout) as info:
            conn.read_data(1000)
        assert info.value.slow
        assert time.monotonic() - started < 2.2  # about 1 s plus 10 bytes/s / 500
    else:  # 0: the timeout applies to each receive, as before
        assert conn.read_data(1000).data == b"Subject: slow\r\n\r\nbody\r\n"


def test_min_data_rate_lets_a_fast_long_message_through(pair):
    conn, peer = pair
    conn.timeout, conn.per_record, conn.min_data_rate = 1.0, True, 500
    body = b"x" * 998 + b"\r\n"

    def run():  # 2 MB in 2.5 s: far above 500 bytes/s, yet longer than the timeout
        for _ in range(10):
            peer.sendall(body * 200)
            time.sleep(0.25)
        peer.sendall(b".\r\n")
    thread = threading.Thread(target=run)
    thread.start()
    result = conn.read_data(10_000_000)
    thread.join()
    assert result.problem == "" and result.size == 2_000_000
