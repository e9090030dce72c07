"""Logging: master.log (syslog, stderr, a file; log_file as its former name), the syslog
datagrams Postfix's way, and a log that pflogsumm reads as it reads Postfix's."""

import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import free_port, message, wait_until
from poolmgr import config, log
from poolmgr.config import ConfigError


class SyslogSocket:
    """A syslog daemon's /dev/log, made by the test: every datagram, as text. `pause` stops
    reading (the kernel then queues net.unix.max_dgram_qlen datagrams, and a sender that
    waits for room waits), `resume` reads again."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.lines: list[str] = []
        self.reading = threading.Event()
        self.reading.set()
        self.paused = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            if not self.reading.is_set():
                self.paused.set()
                self.reading.wait()
            try:
                datagram = self.sock.recv(65536)
            except OSError:
                return
            if datagram:  # empty: pause's wake-up
                self.lines.append(datagram.decode("utf-8", "replace"))

    def pause(self):
        """Stop reading; returns once the reader has stopped."""
        self.paused.clear()
        self.reading.clear()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", self.path)
        wait_until(self.paused.is_set, what="the syslog reader to stop")

    def resume(self):
        self.reading.set()

    def find(self, pattern: str) -> list[str]:
        return [line for line in list(self.lines) if re.search(pattern, line)]

    def close(self):
        self.sock.close()


@pytest.fixture
def syslog(tmp_path):
    server = SyslogSocket(tmp_path / "log")
    yield server
    server.close()


@pytest.mark.parametrize("facility, priority", [("mail", 22), ("local0", 134)])
def test_syslog_lines_carry_the_facility_and_postfix_ident(make_poolmgr, syslog, facility,
                                                            priority):
    pm = make_poolmgr({"master": {"log": "syslog", "syslog_socket": syslog.path,
                                  "syslog_facility": facility}})
    master = wait_until(lambda: syslog.find(rf"^<{priority}>poolmgr/master\[{pm.proc.pid}\]: "
                                            r"daemon started"), what="the master's line")
    with pm.smtp() as client:
        client.noop()
    connect = wait_until(lambda: syslog.find(r"poolmgr/smtpd\[\d+\]: connect from "
                                             r"unknown\[127\.0\.0\.1\]$"), what="connect line")
    assert re.fullmatch(rf"<{priority}>poolmgr/smtpd\[\d+\]: connect from "
                        r"unknown\[127\.0\.0\.1\]", connect[0])
    assert master and not any(line.endswith("\0") for line in syslog.lines)
    assert "connect from" not in pm.log()  # nothing went to stderr


# Issue 24: "200 messages flow with a syslog reader that sleeps 20 s". The pause is the
# scenario (a reader that stops for that long), not a wait for a result.
SYSLOG_PAUSE = 20.0
MESSAGES, CLIENTS = 200, 8
REPLY_IN_TIME = 5.0  # seconds: a session held up by its log waits the whole pause


def send_timed(pm, number: int) -> float:
    """One message over its own connection; seconds from connect to the 250 after DATA."""
    started = time.monotonic()
    with pm.smtp() as client:
        refused = client.sendmail("alice@example.org", ["bob@example.test"],
                                  message(f"stalled log {number}"))
    assert refused == {}
    return time.monotonic() - started


def dropped_in_status(pm) -> dict[str, int]:
    status = pm.status()
    return {"master": status["master"]["log_dropped"],
            **{kind: status["pools"][kind]["counters"]["log_dropped"]
               for kind in ("smtp", "scanner")}}


def dropped_in_metrics(port: int) -> dict[str, int]:
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {sample.labels["process"]: sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == "poolmgr_log_dropped_total"}


@pytest.mark.parametrize("buffer", [10000, 100], ids=["kept", "dropped"])
def test_a_syslog_that_stops_reading_holds_up_no_session(make_poolmgr, syslog, buffer):
    """Every message gets its 250 in normal time while nobody reads the syslog socket; once
    reading resumes the log holds every line (a backlog big enough) or says how many were
    dropped, as many as status counts."""
    port = free_port()
    pm = make_poolmgr({"master": {"log": "syslog", "syslog_socket": syslog.path,
                                  "log_buffer": buffer},
                       "metrics": {"listen": f"127.0.0.1:{port}"}})
    wait_until(lambda: syslog.find(r"daemon started"), what="the master's first lines")
    syslog.pause()
    started = time.monotonic()
    resume = threading.Timer(SYSLOG_PAUSE, syslog.resume)
    resume.start()
    try:
        with ThreadPoolExecutor(CLIENTS) as clients:
            times = list(clients.map(lambda n: send_timed(pm, n), range(MESSAGES)))
        print(f"{MESSAGES} messages while the log was stalled: slowest 250 after "
              f"{max(times):.2f}s, all sent {time.monotonic() - started:.1f}s after the stall")
        assert not syslog.reading.is_set(), "all messages must go while the log is stalled"
        assert max(times) < REPLY_IN_TIME, f"slowest 250 after {max(times):.1f}s"
    finally:
        resume.join()  # the reader's pause ends
    if buffer >= 10000:
        wait_until(lambda: len(syslog.find(r"status=sent")) == MESSAGES, timeout=60,
                   what="every delivery line")
        for pattern in (r"smtpd\[\d+\]: \w+: proxy-accept: END-OF-MESSAGE: 250 ",
                        r"cleanup\[\d+\]: \w+: message-id=<stalled\.log\.\d+\.",
                        r"smtpd\[\d+\]: disconnect from "):
            wait_until(lambda: len(syslog.find(pattern)) >= MESSAGES, timeout=60,
                       what=pattern)
        assert not syslog.find(r"log lines dropped")
        assert set(dropped_in_status(pm).values()) == {0}
    else:
        def said():
            return sum(int(re.search(r"warning: (\d+) log lines dropped", line).group(1))
                       for line in syslog.find(r"warning: \d+ log lines dropped$"))
        counted = wait_until(lambda: (lambda c: said() > 0 and said() == sum(c.values()) and c)(
            dropped_in_status(pm)), timeout=60, what="the drop lines, as many as status counts")
        assert counted["smtp"] > 0 and counted["scanner"] > 0
        assert (f"log lines dropped: master {counted['master']}, smtp {counted['smtp']}, "
                f"scanner {counted['scanner']}") in pm.run_cli("status", check=True).stdout
        wait_until(lambda: dropped_in_metrics(port) == counted, what="the drops in the metrics")
    assert len(syslog.find(r"\]: \w+: client=")) > 10  # more than the kernel's queue held
    with pm.smtp(source="127.0.0.9") as client:  # and the log flows again
        client.noop()
    wait_until(lambda: syslog.find(r"connect from unknown\[127\.0\.0\.9\]$"),
               what="a line logged after the stall")


def test_log_file_is_the_former_name_of_log():
    assert config.from_dict({"master": {"log_file": "/tmp/x.log"}}).master.log == "/tmp/x.log"
    assert config.from_dict({"master": {"log": "syslog"}}).master.log == "syslog"
    with pytest.raises(ConfigError, match=r"\[master\] log: set only one of log and log_file"):
        config.from_dict({"master": {"log": "syslog", "log_file": "/tmp/x.log"}})
    with pytest.raises(ConfigError, match=r"\[master\] syslog_facility: must be one of"):
        config.from_dict({"master": {"syslog_facility": "mial"}})


def test_log_goes_to_syslog_under_systemd_or_without_a_terminal(monkeypatch):
    monkeypatch.setenv("INVOCATION_ID", "0123")
    assert log.target("") == "syslog"
    assert log.target("stderr") == "stderr" and log.target("/var/log/x") == "/var/log/x"
    monkeypatch.delenv("INVOCATION_ID")
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setattr(os, "isatty", lambda fd: True)
    assert log.target("") == "stderr"
    monkeypatch.setattr(os, "isatty", lambda fd: False)
    assert log.target("") == "syslog"


def test_file_lines_have_postfix_shape_and_program_names(tmp_path, fresh_logging):
    path = tmp_path / "mail.log"
    master = config.from_dict({"master": {"log": str(path)}}).master
    log.setup("poolmgr/scanner", master)
    assert log.file_of(master) == str(path)
    log.get("scanner").warning("odd\x07 thing")
    log.program("qmgr").info("ABC: from=<a@b>, size=1, nrcpt=1 (queue active)")
    stamp = r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ "
    lines = path.read_text().splitlines()
    assert re.fullmatch(stamp + rf"poolmgr/scanner\[{os.getpid()}\]: warning: odd\? thing",
                        lines[0])
    assert re.fullmatch(stamp + rf"poolmgr/qmgr\[{os.getpid()}\]: ABC: from=<a@b>, size=1, "
                        r"nrcpt=1 \(queue active\)", lines[1])


def test_missing_syslog_socket_falls_back_to_stderr(tmp_path, fresh_logging, capfd):
    master = config.from_dict({"master": {"log": "syslog",
                                          "syslog_socket": str(tmp_path / "none")}}).master
    log.setup("poolmgr/master", master)
    assert "poolmgr/master[" in capfd.readouterr().err


def pflogsumm_totals(text: str) -> dict[str, int]:
    """pflogsumm's "Grand Totals" messages block: {'received': N, 'delivered': N, ...}."""
    block = text.split("Grand Totals", 1)[1].split("bytes received", 1)[0]
    return {name: int(count) for count, name in re.findall(r"^\s*(\d+)\s+(\w+)", block, re.M)}


def test_pflogsumm_counts_received_delivered_and_rejected(make_poolmgr, tmp_path):
    assert shutil.which("pflogsumm"), "Debian's pflogsumm is needed: scripts/test.sh installs it"
    logfile = tmp_path / "mail.log"
    pm = make_poolmgr({"master": {"log": str(logfile)}})
    accepted, rejected = 3, 2
    for n in range(accepted):
        with pm.smtp() as client:
            client.sendmail("alice@example.org", ["bob@example.test"], message(f"pflogsumm {n}"))
    for n in range(rejected):
        with pm.smtp(source="127.0.0.2") as client:  # outside mynetworks
            client.ehlo()
            client.mail("alice@example.org")
            code, _ = client.rcpt(f"someone{n}@elsewhere.example")
            assert code == 554
    wait_until(lambda: logfile.read_text().count("status=sent") == accepted,
               what="the delivery lines")
    result = subprocess.run(["pflogsumm", "--syslog-name=poolmgr", str(logfile)],
                            capture_output=True, text=True, timeout=60, check=True)
    print(result.stdout)
    totals = pflogsumm_totals(result.stdout)
    assert (totals["received"], totals["delivered"], totals["rejected"]) == \
        (accepted, accepted, rejected)
    assert "bob@example.test" in result.stdout  # recipients by message count


def test_other_handlers_format_the_records_of_a_process_that_imported_poolmgr(caplog):
    """poolmgr's own handlers take a short way; a handler of another's (here pytest's caplog,
    whose format has %(filename)s) gets standard records, in a process that imported poolmgr
    (its records once lacked the fields poolmgr's formatter does not read)."""
    caplog.set_level(logging.INFO)
    logging.getLogger("poolmgr.probe").info("hello %s", "world")
    logging.getLogger("elsewhere").warning("and %d more", 2)
    assert "hello world" in caplog.text and "and 2 more" in caplog.text
