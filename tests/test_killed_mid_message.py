"""A worker SIGKILLed in the middle of a message: an SMTP worker while the client is in DATA
or while its hand-off waits on the scanner, a scanner worker while it holds the message (its
next hop has the data and has not answered yet). The client is never told 250 for mail that
did not reach the next hop, and its retry delivers it; a duplicate is allowed, a loss is not.

The next hop is `testing.recorder`, holding its end-of-DATA reply (`hold`), and the scan is
made slow by a spamd that holds its answer (`SlowSpamd`), so that the kill lands at a known
point without a sleep."""

import os
import signal
import socket
import threading

import psutil
import pytest

from helpers import Raw, free_port, message, served_by, wait_until
from poolmgr.testing import Recorder

BOB = "bob@example.test"
ENVELOPE = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<%s>\r\nDATA\r\n" % BOB.encode()


@pytest.fixture
def hop():
    recorder = Recorder().start()
    yield recorder
    recorder.stop()


@pytest.fixture
def pm(make_poolmgr, hop):
    return make_poolmgr({"scanner": {"next_hop": f"smtp:127.0.0.1:{hop.port}"}})


def begin(pm, source: str, before: bytes = b"") -> Raw:
    """A client at `source` that has been told 354 (after sending the message `before`)."""
    client = Raw(pm.smtp_port, source)
    assert client.reply()[0] == 220
    client.send(b"EHLO client.test\r\n")
    assert client.reply()[0] == 250
    if before:
        client.send(ENVELOPE + before + b".\r\n")
        assert [client.reply()[0] for _ in range(4)] == [250, 250, 354, 250]
    client.send(ENVELOPE)
    assert [client.reply()[0] for _ in range(3)] == [250, 250, 354]
    return client


def smtp_worker_of(pm, source: str) -> int:
    (pid,) = wait_until(lambda: served_by(pm, source), what=f"the worker serving {source}")
    return pid


def scanner_worker_talking_to(pm, peer: tuple[str, int]) -> int:
    """The scanner worker whose connection to the next hop has `peer` as its local end."""
    def find():
        for pid in pm.worker_pids("scanner"):
            process = psutil.Process(pid)
            connections = getattr(process, "net_connections", process.connections)("tcp")
            if any(tuple(c.laddr) == peer for c in connections):
                return pid
        return None
    return wait_until(find, what=f"the scanner worker connected from {peer}")


class SlowSpamd:
    """A stand-in for spamd (SPAMC/1.5) that holds each answer while `hold` is set -- the scan
    is then in progress for as long as a test needs -- and answers "not spam" otherwise."""

    ANSWER = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nSpam: False ; 0.0 / 5.0\r\n\r\n"

    def __init__(self):
        self.port = free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.hold = True
        self.held = threading.Event()
        self.held_peer: tuple[str, int] | None = None
        self.release = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn, peer), daemon=True).start()

    def _answer(self, conn, peer):
        with conn:
            while conn.recv(65536):  # the request, up to spamc's shutdown(SHUT_WR)
                pass
            if self.hold:
                self.held_peer = peer
                self.held.set()
                self.release.wait()
            try:
                conn.sendall(self.ANSWER)
            except OSError:
                pass  # the scanner worker was killed meanwhile

    def stop(self):
        self.release.set()
        self.sock.close()


def arrived(hop: Recorder, subject: str) -> int:
    return sum(f"Subject: {subject}\r\n".encode() in c.data for c in hop.copies(BOB))


def retry(pm, sent: bytes) -> None:
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", [BOB], sent) == {}


@pytest.mark.log_allows(r"smtp worker \d+ pid \d+ killed by signal 9")
def test_smtp_worker_killed_during_data(pm, hop):
    sent = message("killed in DATA", body="first half\r\n" * 200 + "second half\r\n")
    client = begin(pm, "127.0.0.71")
    client.send(sent)  # all but the final dot: the worker holds a whole message, unfinished
    os.kill(smtp_worker_of(pm, "127.0.0.71"), signal.SIGKILL)
    assert client.closed()  # and with no reply before
    assert hop.rcpt_log == [] and hop.accepted == []  # nothing went on
    retry(pm, sent)
    assert arrived(hop, "killed in DATA") == 1


@pytest.mark.log_allows(r"smtp worker \d+ pid \d+ killed by signal 9")
def test_smtp_worker_killed_while_its_hand_off_waits(pm, hop):
    """The scanner goes on and delivers; the client, told nothing, retries: a duplicate."""
    sent = message("killed in hand-off")
    hop.hold = True
    client = begin(pm, "127.0.0.72")
    client.send(sent + b".\r\n")
    assert hop.held.wait(15), "the message never reached the next hop"
    os.kill(smtp_worker_of(pm, "127.0.0.72"), signal.SIGKILL)
    assert client.closed()  # no 250: the worker died before the next hop answered
    hop.hold = False
    hop.release.set()
    wait_until(lambda: arrived(hop, "killed in hand-off") == 1, what="the scanner's delivery")
    retry(pm, sent)
    assert arrived(hop, "killed in hand-off") == 2


@pytest.mark.log_allows(r"scanner worker \d+ pid \d+ killed by signal 9")
@pytest.mark.parametrize("warm", [False, True], ids=["new-connection", "cached-connection"])
def test_scanner_worker_killed_while_it_holds_the_message(pm, hop, warm):
    """On a new connection to the scanner pool the SMTP worker answers 4xx. On a cached one
    (`warm`: a message went before) it may send the message again over a new connection and
    answer what that one says: a 250 then, but only once the next hop accepted a copy."""
    sent = message("killed in scan")
    client = begin(pm, "127.0.0.73", before=message("warm-up") if warm else b"")
    hop.hold = True
    client.send(sent + b".\r\n")
    assert hop.held.wait(15), "the message never reached the next hop"
    os.kill(scanner_worker_talking_to(pm, hop.held_peer), signal.SIGKILL)
    wait_until(lambda: hop.aborted, what="the next hop to see the scanner hang up")
    assert arrived(hop, "killed in scan") == 0
    hop.hold = False
    hop.release.set()  # a copy sent again (the cached connection's retry) may go on now
    code, lines = client.reply()
    if code == 250:
        assert warm, lines  # a new connection that broke is a 4xx, never a second try
        assert arrived(hop, "killed in scan") == 1
    else:
        assert 400 <= code < 500, lines
        retry(pm, sent)
        assert arrived(hop, "killed in scan") >= 1


@pytest.fixture
def spamd():
    stand_in = SlowSpamd()
    yield stand_in
    stand_in.stop()


@pytest.mark.log_allows(r"scanner worker \d+ pid \d+ killed by signal 9")
def test_scanner_worker_killed_during_its_scan(make_poolmgr, hop, spamd):
    pm = make_poolmgr({"scanner": {"next_hop": f"smtp:127.0.0.1:{hop.port}",
                                   "checks": ["builtin", "spamd"]},
                       "scanner.spamd": {"address": f"127.0.0.1:{spamd.port}"}})
    sent = message("killed in spamd")
    client = begin(pm, "127.0.0.74")
    client.send(sent + b".\r\n")
    assert spamd.held.wait(15), "the scan never asked spamd"
    os.kill(scanner_worker_talking_to(pm, spamd.held_peer), signal.SIGKILL)
    code, lines = client.reply()
    assert 400 <= code < 500, lines
    assert hop.rcpt_log == []  # killed mid-scan: nothing went on
    spamd.hold = False
    spamd.release.set()
    retry(pm, sent)
    assert arrived(hop, "killed in spamd") == 1
    assert "spamd check failed" not in pm.log()  # the retry was scanned, not passed unchecked
