"""The log's backlog (logbuffer.py): lines kept in order while the log cannot take them, a
bound beyond which they are dropped and counted, and the `N log lines dropped` line in their
place once writing resumes; through log.py, a syslog socket nobody reads never makes the
process wait."""

import errno
import os
import re
import socket
import subprocess
import sys
import threading
import time

from helpers import wait_until
from poolmgr import config, log
from poolmgr.logbuffer import Backlog


class Log:
    """A destination that takes `room` more writes, then says EAGAIN (or `error`)."""

    def __init__(self, room=0, error=errno.EAGAIN):
        self.room, self.error, self.got = room, error, []

    def send(self, data: bytes) -> int:
        if self.room <= 0:
            raise OSError(self.error, os.strerror(self.error))
        self.room -= 1
        self.got.append(data)
        return len(data)


def gap(count: int) -> bytes:
    return b"warning: %d log lines dropped" % count


def test_lines_wait_in_order_and_go_when_the_log_takes_them():
    backlog, sink = Backlog(limit=10), Log(room=2)
    for n in range(5):
        backlog.write(b"line %d" % n, sink.send, gap)
    assert sink.got == [b"line 0", b"line 1"] and len(backlog) == 3
    sink.room = 1
    backlog.write(b"line 5", sink.send, gap)  # what waits goes first
    assert sink.got[-1] == b"line 2" and len(backlog) == 3
    sink.room = 100
    assert backlog.flush(sink.send, gap)
    assert sink.got == [b"line %d" % n for n in range(6)]
    assert backlog.dropped == 0 and len(backlog) == 0


def test_beyond_the_bound_lines_are_dropped_counted_and_said_once_in_their_place():
    backlog, sink = Backlog(limit=3), Log(room=0, error=errno.ENOSPC)
    for n in range(10):
        backlog.write(b"line %d" % n, sink.send, gap)
    assert backlog.dropped == 7 and backlog.lines == 3
    sink.room = 2
    assert not backlog.flush(sink.send, gap)  # the log took two, one waits, then the gap
    backlog.write(b"line 10", sink.send, gap)  # room again: kept after the gap
    sink.room = 100
    backlog.write(b"line 11", sink.send, gap)
    assert sink.got == [b"line 0", b"line 1", b"line 2", gap(7), b"line 10", b"line 11"]
    assert backlog.dropped == 7 and len(backlog) == 0


def test_a_second_stall_gets_its_own_drop_line():
    backlog, sink = Backlog(limit=1), Log()
    for n in range(3):
        backlog.write(b"a%d" % n, sink.send, gap)
    sink.room = 2
    backlog.flush(sink.send, gap)
    for n in range(4):
        backlog.write(b"b%d" % n, sink.send, gap)
    sink.room = 100
    backlog.flush(sink.send, gap)
    assert sink.got == [b"a0", gap(2), b"b0", gap(3)] and backlog.dropped == 5


def test_the_rest_of_a_line_partly_written_is_kept_even_when_full():
    written = []

    def half(data):
        written.append(data[:2])
        return 2

    backlog = Backlog(limit=0)
    backlog.write(b"abcdef\n", half, gap)
    assert list(backlog.kept) == [b"cdef\n"] and backlog.dropped == 0
    backlog.flush(lambda data: written.append(data) or len(data), gap)
    assert b"".join(written) == b"abcdef\n"


def receive_all(sock) -> list[str]:
    lines = []
    while True:
        try:
            lines.append(sock.recv(65536).decode())
        except BlockingIOError:
            return lines


def test_a_syslog_nobody_reads_never_makes_the_process_wait(tmp_path, fresh_logging):
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(str(tmp_path / "log"))
    reader.setblocking(False)
    master = config.from_dict({"master": {"log": "syslog", "syslog_socket": str(tmp_path / "log"),
                                          "log_buffer": 50}}).master
    log.setup("poolmgr/smtpd", master)
    started = time.monotonic()
    for n in range(500):
        log.get("smtpd").info("line %d", n)
    assert time.monotonic() - started < 1.0  # a blocking send would hang at the 11th line
    assert log.pending() == 51 and log.dropped() > 0 and log.waiting() is not None
    lines = []
    while log.pending():  # the reader catches up
        lines += receive_all(reader)
        log.flush()
    lines += receive_all(reader)
    log.get("smtpd").info("after")
    lines += receive_all(reader)
    numbers = [int(m.group(1)) for line in lines if (m := re.search(r"line (\d+)$", line))]
    assert numbers == list(range(len(numbers)))  # in order, none missing before the gap
    drop = [line for line in lines if "log lines dropped" in line]
    assert drop == [f"<20>poolmgr/smtpd[{os.getpid()}]: warning: {log.dropped()} log lines "
                    "dropped"]
    assert len(numbers) + log.dropped() == 500
    assert lines.index(drop[0]) == len(numbers) and lines[-1].endswith("smtpd[%d]: after"
                                                                       % os.getpid())


def test_a_line_logged_while_another_is_being_written_waits_instead_of_the_writer():
    """A signal handler (or another thread) logging in the middle of a write: its line is
    kept for the next write, nobody waits for a lock."""
    backlog, sink = Backlog(limit=10), Log(room=100)

    def send(data):
        if data == b"outer":
            backlog.write(b"inner", sink.send, gap)  # re-entered mid-write
        return sink.send(data)

    backlog.write(b"outer", send, gap)
    assert sink.got == [b"outer"] and list(backlog.kept) == [b"inner"]
    backlog.write(b"next", sink.send, gap)
    assert sink.got == [b"outer", b"inner", b"next"]


def test_a_full_disk_keeps_then_drops_and_never_raises(fresh_logging):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    log.setup("poolmgr/smtpd", config.from_dict({"master": {"log": "/dev/full",
                                                            "log_buffer": 10}}).master)
    for n in range(100):
        log.get("smtpd").info("line %d", n)
    log.get("smtpd").warning("and a warning")
    assert (log.pending(), log.dropped(), log.waiting()) == (11, 91, -1)
    assert log.flush() == 11


def test_lines_still_waiting_at_exit_or_at_a_new_destination_count_as_dropped(tmp_path,
                                                                              fresh_logging):
    """A worker exiting while its log is stalled (drain gives up), or a reload that changes
    the log's destination: what still waits is lost, and counted, never silently."""
    log.setup("poolmgr/smtpd", config.from_dict({"master": {"log": "/dev/full",
                                                            "log_buffer": 10}}).master)
    for n in range(15):
        log.get("smtpd").info("line %d", n)
    assert (log.pending(), log.dropped()) == (11, 5)  # 10 lines and the drop line
    log.drain(timeout=0.1)
    assert (log.pending(), log.dropped(), log.take_dropped()) == (0, 15, 15)
    for n in range(4):
        log.get("smtpd").info("line %d", n)
    log.setup("poolmgr/smtpd", config.from_dict(
        {"master": {"log": str(tmp_path / "mail.log")}}).master)
    assert log.take_dropped() == 4 and log.pending() == 0


def test_the_handlers_lock_never_waits_and_is_a_context_manager(fresh_logging):
    """Python 3.13's Handler.handle says `with self.lock:`; a handler's lock of None made
    every log.exception raise (and with it, the master's loop)."""
    log.setup("poolmgr/master", config.from_dict({"master": {"log": "stderr"}}).master)
    (handler,) = log._handlers()
    with handler.lock:
        assert handler.lock.acquire() is True
    try:
        raise ValueError("a bug")
    except ValueError:
        log.get("master").exception("caught")  # the standard way, through Handler.handle


# A process whose stderr is a pipe nobody reads: it logs far more than the pipe holds, says
# what waits and was dropped, and once the test reads the pipe, writes the rest and one more.
STDERR_CHILD = """
import sys, time
from poolmgr import config, log
log.setup("poolmgr/scanner", config.from_dict({"master": {"log": "stderr",
                                                          "log_buffer": 100}}).master)
for n in range(20000):
    log.get("scanner").info("line %d %s", n, "x" * 80)
print(log.pending(), log.dropped(), flush=True)
sys.stdin.readline()
while log.flush():
    time.sleep(0.01)
log.get("scanner").info("after")
"""


def test_a_stderr_pipe_nobody_reads_never_makes_the_process_wait():
    child = subprocess.Popen([sys.executable, "-c", STDERR_CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    said, err = [], []
    threading.Thread(target=lambda: said.append(child.stdout.readline()), daemon=True).start()
    try:
        wait_until(lambda: said, timeout=30, what="the child to finish logging")
        pending, dropped = map(int, said[0].split())
        reader = threading.Thread(target=lambda: err.append(child.stderr.read()), daemon=True)
        reader.start()
        child.stdin.write(b"go\n")
        child.stdin.close()
        assert child.wait(30) == 0
        reader.join(30)
    finally:
        child.kill()
    assert pending == 101 and dropped > 0
    lines = err[0].decode().splitlines()
    numbers = [int(m.group(1)) for line in lines if (m := re.search(r": line (\d+) x+$", line))]
    assert numbers == list(range(len(numbers))) and len(numbers) + dropped == 20000
    assert re.search(rf"poolmgr/scanner\[{child.pid}\]: warning: {dropped} log lines dropped$",
                     lines[len(numbers)])
    assert lines[-1].endswith(f"poolmgr/scanner[{child.pid}]: after")


def test_drops_are_taken_once_for_the_board(fresh_logging):
    log.setup("poolmgr/smtpd", config.from_dict({"master": {"log": "/dev/full",
                                                            "log_buffer": 0}}).master)
    log.take_dropped()
    for n in range(5):
        log.get("smtpd").info("line %d", n)
    assert log.take_dropped() == 5 and log.take_dropped() == 0


def test_a_restarted_syslog_daemon_gets_the_lines_that_waited(tmp_path, fresh_logging):
    path = str(tmp_path / "log")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(path)
    log.setup("poolmgr/master", config.from_dict({"master": {
        "log": "syslog", "syslog_socket": path}}).master)
    first.close()
    os.unlink(path)  # syslogd stopped
    log.get("master").info("while syslogd was away")
    assert log.pending() == 1
    second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    second.bind(path)  # ... and started again
    second.setblocking(False)
    wait_until(lambda: log.flush() == 0, what="the reconnection")  # once a SYSLOG_RECONNECT
    log.get("master").info("after")
    assert [line.split(": ", 1)[1] for line in receive_all(second)] == \
        ["while syslogd was away", "after"]
