"""The master with real processes: status, signals, ctl, supervision, stopping."""

import os
import re
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest

from helpers import Raw, message, stopped, wait_until


def titles(pm) -> list[str]:
    out = []
    for child in psutil.Process(pm.proc.pid).children():
        try:
            out.append(" ".join(child.cmdline()))
        except psutil.Error:
            pass
    return out


def smtp_titles(pm) -> list[str]:
    return [t for t in titles(pm) if t.startswith("poolmgr: smtp worker") and "draining" not in t]


def test_status_json_contract(make_poolmgr):
    pm = make_poolmgr()
    status = pm.cli_status()  # the real `poolmgr status --json`; the harness asks the socket
    direct = pm.status()
    assert direct["master"]["pid"] == status["master"]["pid"] and direct.keys() == status.keys()
    smtp, scanner = status["pools"]["smtp"], status["pools"]["scanner"]
    assert smtp["workers"] == 2 and scanner["workers"] == 2
    assert smtp["slots"] == 2 * 2000 and smtp["sessions"] == 0
    assert scanner["busy"] == 0
    assert (smtp["floor"], smtp["ceiling"], scanner["floor"], scanner["ceiling"]) == (2, 6, 2, 4)
    assert status["master"]["pid"] == pm.proc.pid
    assert re.search(r"open files limit: \d+ \(hard limit \d+\)", pm.log())
    table = pm.run_cli("status").stdout
    assert re.search(r"^smtp\s+2\s+2\s+2\s+6\s+0\s+4000", table, re.M), table
    # Every key the README's status paragraph promises, from the very first status on.
    for path in README_STATUS_KEYS:
        value = status
        for key in path.split("."):
            assert isinstance(value, dict) and key in value, f"status --json lacks {path}"
            value = value[key]
    assert status["autoscale"]["enabled"] is True and status["autoscale"]["phase"] == "calm"
    assert status["storm"]["active"] is False and status["stress"]["on"] is False


README_STATUS_KEYS = [
    "pools.smtp.workers", "pools.smtp.sessions", "pools.smtp.slots", "pools.scanner.workers",
    "pools.scanner.busy", *(f"pools.{kind}.{key}" for kind in ("smtp", "scanner")
                            for key in ("floor", "ceiling", "target")),
    "storm.active", "storm.phase", "storm.since", "stress.on", "stress.source", "stress.since",
    *(f"autoscale.{key}" for key in ("enabled", "phase", "pressure", "occupancy", "backlog",
                                     "nuisance_ratio", "decisions")),
    "nuisance", "anvil"]


def test_accept_queue_is_read_from_the_listening_socket(make_poolmgr):
    """The autoscaler's backlog figure is the kernel's accept queue (TCP_INFO): with every
    SMTP worker stopped, connections wait there and status counts them."""
    pm = make_poolmgr({"smtp": {"listen_backlog": 64}, "autoscale": {"interval": "0.2s"}})
    with stopped(pm.worker_pids("smtp")):  # no SMTP worker accepts
        clients = [socket.create_connection(("127.0.0.1", pm.smtp_port), timeout=5,
                                            source_address=(f"127.0.2.{n}", 0))
                   for n in range(1, 8)]
        status = wait_until(lambda: (lambda s: s["autoscale"]["backlog"] == 7 and s)(
            pm.status()), timeout=10, what="7 connections in the accept queue")
        assert status["autoscale"]["backlog_max"] == 64
        assert status["autoscale"]["pressure"] == round(7 / 64, 3)
    for client in clients:  # accepted once the workers run again
        assert client.recv(100).startswith(b"220")
        client.close()
    wait_until(lambda: pm.status()["autoscale"]["backlog"] == 0, timeout=10,
               what="an empty accept queue")


def test_process_titles_show_role_and_sessions(make_poolmgr):
    pm = make_poolmgr()
    assert any(t.startswith("poolmgr: master [smtp 2/6, scanner 2/4]") for t in
               [" ".join(psutil.Process(pm.proc.pid).cmdline())])
    clients = [Raw(pm.smtp_port, f"127.0.1.{n}") for n in range(1, 6)]
    for client in clients:
        client.reply()
    wait_until(lambda: pm.status()["pools"]["smtp"]["sessions"] == 5, what="5 sessions")

    def sessions_in_titles():
        found = [re.search(r"\[(\d+) sessions\]", t) for t in smtp_titles(pm)]
        return sum(int(m.group(1)) for m in found if m) == 5
    wait_until(sessions_in_titles, what="titles adding up to 5 sessions")
    assert sorted(t.split(" [")[0] for t in smtp_titles(pm)) == \
        ["poolmgr: smtp worker 1", "poolmgr: smtp worker 2"]
    for client in clients:
        client.close()


def test_ttin_ttou_resize_the_smtp_pool(make_poolmgr):
    pm = make_poolmgr()
    # A pending signal that arrives again is merged by the kernel: the next one is sent once
    # the master has handled the last (the floor moved).
    def floor() -> int:
        return pm.status()["pools"]["smtp"]["floor"]
    pm.send_signal(signal.SIGTTIN)
    wait_until(lambda: floor() == 3, what="the first TTIN handled")
    pm.send_signal(signal.SIGTTIN)
    status = pm.wait_workers(4, 2)
    assert status["pools"]["smtp"]["floor"] == 4
    wait_until(lambda: len(smtp_titles(pm)) == 4, what="4 smtp worker titles in ps")
    pm.send_signal(signal.SIGTTOU)
    pm.wait_workers(3, 2)
    wait_until(lambda: len(smtp_titles(pm)) == 3, what="3 smtp worker titles in ps")
    pm.send_signal(signal.SIGTTOU)
    wait_until(lambda: floor() == 2, what="the TTOU to 2 handled")
    pm.send_signal(signal.SIGTTOU)
    wait_until(lambda: "fewer than the 2 scanner workers" in pm.log(), what="refusal")
    pm.wait_workers(2, 2)
    time.sleep(1)
    assert pm.status()["pools"]["smtp"]["workers"] == 2  # the rule held


def test_ctl_resizes_and_enforces_the_rule(make_poolmgr):
    pm = make_poolmgr()
    result = pm.run_cli("ctl", "smtp", "4")
    assert result.returncode == 0 and "smtp pool 2 -> 4 workers" in result.stdout
    pm.wait_workers(4, 2)
    result = pm.run_cli("ctl", "scanner", "+3")
    assert result.returncode == 1
    assert "refused: scanner 5 is above the pool's ceiling 4 (scanner.max_workers)" in result.stderr
    result = pm.run_cli("ctl", "scanner", "4")
    assert result.returncode == 0 and "scanner pool 2 -> 4 workers" in result.stdout
    pm.wait_workers(4, 4)
    result = pm.run_cli("ctl", "smtp", "-1")
    assert result.returncode == 1
    assert "refused: 3 SMTP workers would be fewer than the 4 scanner workers" in result.stderr
    result = pm.run_cli("ctl", "smtp", "7")
    assert result.returncode == 1 and "above the pool's ceiling 6" in result.stderr
    pm.run_cli("ctl", "scanner", "1", check=True)
    pm.run_cli("ctl", "smtp", "1", check=True)
    pm.wait_workers(1, 1)
    result = pm.run_cli("ctl", "scanner", "3")  # raises the SMTP pool with it
    assert result.returncode == 0 and "smtp pool raised 1 -> 3 with it" in result.stdout
    pm.wait_workers(3, 3)


@pytest.mark.log_allows(r"smtp worker \d+ pid \d+ killed by signal 9")
def test_killed_worker_is_replaced(make_poolmgr):
    pm = make_poolmgr()
    victim = pm.worker_pids("smtp")[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in pm.worker_pids("smtp") and
               len(pm.worker_pids("smtp")) == 2, what="a replacement worker")
    assert f"pid {victim} killed by signal 9" in pm.log()
    with pm.smtp() as client:
        assert client.sendmail("a@example.org", ["bob@example.test"], message()) == {}


@pytest.mark.log_allows(r"scanner worker \d+ pid \d+ killed by signal 9")
def test_hung_worker_is_found_by_heartbeat_and_replaced(make_poolmgr):
    pm = make_poolmgr({"master": {"worker_timeout": "2s"}})
    victim = pm.worker_pids("scanner")[0]
    os.kill(victim, signal.SIGSTOP)
    wait_until(lambda: f"pid {victim}: no heartbeat for" in pm.log(), timeout=15,
               what="the hung worker to be noticed")
    wait_until(lambda: victim not in pm.worker_pids("scanner") and
               len(pm.worker_pids("scanner")) == 2, what="a replacement scanner worker")


@pytest.mark.log_allows(r"warning: master: did not run for \d+s")
def test_a_host_that_wakes_from_a_pause_kills_no_worker(make_poolmgr):
    """A suspended host or a paused VM stops the master and its workers alike: when it
    wakes, every heartbeat is old though no worker hung (a paused CI VM once had a healthy
    scanner worker killed for "no heartbeat for 30254s"). The master did not run either: it
    says so, and judges heartbeats from its waking."""
    pm = make_poolmgr({"master": {"worker_timeout": "2s"}})
    workers = pm.worker_pids("smtp") + pm.worker_pids("scanner")
    for pid in (pm.proc.pid, *workers):
        os.kill(pid, signal.SIGSTOP)
    time.sleep(3)  # the pause itself: longer than worker_timeout
    os.kill(pm.proc.pid, signal.SIGCONT)  # the master first: it finds every heartbeat 3 s old
    wait_until(lambda: re.search(r"warning: master: did not run for [3-9]s", pm.log()),
               what="the master to notice its own pause")
    for pid in workers:
        os.kill(pid, signal.SIGCONT)
    with pm.smtp() as client:
        assert client.sendmail("a@example.org", ["bob@example.test"], message()) == {}
    assert sorted(pm.worker_pids("smtp") + pm.worker_pids("scanner")) == sorted(workers)
    assert "no heartbeat" not in pm.log()


def test_a_worker_asked_for_its_stack_writes_it_and_serves_on(make_poolmgr):
    """The master asks a hung worker for its stack (SIGUSR2) before it kills it: each worker
    writes where it is to stderr, and a worker that was not hung after all goes on."""
    pm = make_poolmgr()
    stacks = re.compile(r"(?m)^(?:Current thread|Thread) 0x")
    for kind in ("scanner", "smtp"):
        pid, written = pm.worker_pids(kind)[0], len(stacks.findall(pm.log()))
        os.kill(pid, signal.SIGUSR2)
        wait_until(lambda: len(stacks.findall(pm.log())) > written,
                   what=f"the {kind} worker's stack")
        assert pid in pm.worker_pids(kind)
    # The SMTP worker's stack (the last one written): its hub's, or the greenlet's it was
    # running just then.
    assert re.search(r'(?m)^  File ".*/(?:gevent/hub|poolmgr/[\w/]+)\.py", line \d+',
                     stacks.split(pm.log())[-1])
    assert re.search(r'(?m)^  File ".*/poolmgr/scanner/worker\.py", line \d+ in serve$',
                     pm.log())
    with pm.smtp() as client:
        assert client.sendmail("a@example.org", ["bob@example.test"], message()) == {}


@pytest.mark.log_allows(r"error: scanner worker \d+ failed \(NotADirectoryError",
                         r"scanner worker \d+ pid \d+ exit status 1")
def test_crash_loop_is_throttled(make_poolmgr, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    pm = make_poolmgr({"scanner": {"next_hop": f"maildir:{blocker}/maildir"}}, start=False)
    pm.start(wait=False)
    wait_until(pm.accepting, what="the SMTP pool")
    time.sleep(6)
    log = pm.log()
    failures = len(re.findall(r"scanner worker \d+ pid \d+ exit status 1", log))
    assert "scanner pool: worker died at start-up -- throttling for" in log
    assert 2 <= failures <= 10, failures  # without back-off: about 12 forks a second
    assert pm.accepting()  # the SMTP pool is unaffected


def test_master_never_imports_gevent(make_poolmgr):
    pm = make_poolmgr()
    with open(f"/proc/{pm.proc.pid}/maps") as maps:
        assert "gevent" not in maps.read()
    with open(f"/proc/{pm.worker_pids('smtp')[0]}/maps") as maps:
        assert "gevent" in maps.read()  # the SMTP worker has it, after its fork


def test_control_socket_mode_and_pidfile(make_poolmgr):
    pm = make_poolmgr()
    sock = pm.dir / "ctl.sock"
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert (pm.dir / "poolmgr.pid").read_text().strip() == str(pm.proc.pid)
    assert pm.stop() == 0
    assert not sock.exists() and not (pm.dir / "poolmgr.pid").exists()


def test_second_instance_is_refused(make_poolmgr):
    pm = make_poolmgr()
    result = subprocess.run([sys.executable, "-m", "poolmgr", "run", "-c", str(pm.config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"poolmgr is already running (pid {pm.proc.pid}" in result.stderr


def term_during_a_message(pm, connect) -> dict:
    """Send one message through the client `connect()` makes; SIGTERM the master while a
    scanner worker has it; the master must exit 0. Returns what sendmail gave back."""
    outcome = {}

    def send():
        with connect() as client:
            outcome["refused"] = client.sendmail("a@example.org", ["bob@example.test"],
                                                 message("in flight"))
    sender = threading.Thread(target=send)
    sender.start()
    wait_until(lambda: pm.status()["pools"]["scanner"]["busy"] == 1, what="a busy scanner")
    pm.send_signal(signal.SIGTERM)
    assert pm.proc.wait(60) == 0
    sender.join(10)
    return outcome


def test_term_lets_in_flight_messages_finish_and_exits_0(make_poolmgr, make_sink):
    sink = make_sink(extra=["-w", "3"])  # the next hop takes 3 s to answer DATA
    pm = make_poolmgr({"scanner": {"next_hop": f"smtp:127.0.0.1:{sink.port}"}})
    assert term_during_a_message(pm, pm.smtp) == {"refused": {}}
    assert len(sink.messages()) == 1
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                   for p in psutil.process_iter() if p.ppid() == pm.proc.pid)


def test_a_draining_scanner_gets_scanner_timeout_for_its_message(make_poolmgr, make_sink):
    """Postfix's content_filter hands a message to the scanner pool, whose next hop takes
    20 s, longer than graceful_timeout plus the kill margin (16 s): the stopping master does
    not kill the scanner in the middle of that message, and the message is delivered."""
    sink = make_sink(extra=["-w", "20"])
    pm = make_poolmgr({"master": {"graceful_timeout": "1s"},
                       "smtp": {"proxy_timeout": "60s"},
                       "scanner": {"next_hop": f"smtp:127.0.0.1:{sink.port}", "timeout": "40s"}})
    def content_filter():
        return smtplib.SMTP("127.0.0.1", pm.scanner_port, local_hostname="postfix.test",
                            timeout=60)
    assert term_during_a_message(pm, content_filter) == {"refused": {}}
    assert len(sink.messages()) == 1 and "killing" not in pm.log()


def test_int_is_a_fast_stop(make_poolmgr):
    pm = make_poolmgr()
    workers = pm.worker_pids("smtp") + pm.worker_pids("scanner")
    idle = Raw(pm.smtp_port)
    idle.reply()
    started = time.monotonic()
    pm.send_signal(signal.SIGINT)
    assert pm.proc.wait(15) == 0
    # Workers exit at once on the master's SIGQUIT: well before its SIGKILL after
    # FAST_STOP_WAIT (3 s), which would show as "killed by signal 9" lines.
    assert time.monotonic() - started < 1.5
    assert "killed by signal" not in pm.log()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() !=
                   psutil.STATUS_ZOMBIE for pid in workers)
    idle.close()


def test_hup_replaces_workers_without_losing_or_refusing(make_poolmgr):
    pm = make_poolmgr()
    before = set(pm.worker_pids("smtp") + pm.worker_pids("scanner"))
    results, errors = [], []

    def stream():
        for n in range(40):
            try:
                with pm.smtp() as client:
                    results.append(client.sendmail("a@example.org", ["bob@example.test"],
                                                   message(f"hup {n}")))
            except Exception as exc:  # any refusal or failure is what this test looks for
                errors.append(repr(exc))
            time.sleep(0.05)
    sender = threading.Thread(target=stream)
    sender.start()
    time.sleep(0.5)
    pm.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    pm.send_signal(signal.SIGHUP)
    sender.join(120)
    assert errors == []
    assert results == [{}] * 40
    assert len(pm.delivered()) == 40
    status = pm.wait_workers(2, 2)
    assert status["master"]["generation"] == 3
    after = set(pm.worker_pids("smtp") + pm.worker_pids("scanner"))
    assert not before & after


@pytest.mark.log_allows(r"error: reload: .*\[bogus\]: unknown section",
                         r"error: reload failed: keeping the running configuration")
def test_hup_with_a_bad_config_keeps_running(make_poolmgr):
    pm = make_poolmgr()
    good = pm.config.read_text()
    pm.config.write_text(good + "\n[bogus]\n")
    pm.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed: keeping the running configuration" in pm.log(),
               what="the reload error")
    assert "[bogus]: unknown section" in pm.log()
    assert pm.status()["master"]["generation"] == 1
    pm.config.write_text(good.replace("min_workers = 2\nmax_workers = 6",
                                      "min_workers = 3\nmax_workers = 6"))
    pm.send_signal(signal.SIGHUP)
    pm.wait_workers(3, 2)


def test_usr1_reopens_the_log_file(make_poolmgr, tmp_path):
    logfile = tmp_path / "mail.log"
    pm = make_poolmgr({"master": {"log_file": str(logfile)}})
    wait_until(lambda: logfile.exists() and "daemon started" in logfile.read_text(),
               what="the log file")
    rotated = tmp_path / "mail.log.1"
    logfile.rename(rotated)
    pm.send_signal(signal.SIGUSR1)
    wait_until(logfile.exists, what="a new log file")
    time.sleep(0.5)  # the workers reopen on their own signal
    with pm.smtp() as client:
        client.noop()
    wait_until(lambda: "noop=1 quit=1" in logfile.read_text(),
               what="a worker's line in the new file")
    assert "noop=1" not in rotated.read_text()


def test_config_with_fewer_smtp_than_scanner_workers_starts_with_the_rule_applied(make_poolmgr):
    pm = make_poolmgr({"smtp": {"min_workers": 1}, "scanner": {"min_workers": 2}}, start=False)
    pm.start(wait=False)
    status = pm.wait_workers(2, 2)
    assert status["pools"]["smtp"]["floor"] == 2
    assert "warning: " in pm.log() and "the SMTP pool starts at 2" in pm.log()


def test_malformed_control_requests_are_answered_and_the_master_stays_up(make_poolmgr):
    from poolmgr import control

    pm = make_poolmgr()
    sock = str(pm.dir / "ctl.sock")
    for request in ({"cmd": "ctl", "args": [["smtp"], "+1"]}, {"cmd": "ctl", "args": 5},
                    {"cmd": "ctl", "args": ["smtp"]}, {"cmd": "ctl", "args": ["smtp", 3]},
                    {"cmd": "ctl", "args": ["__init__", "x"]}, {"cmd": "ctl", "args": ["a", "b"]},
                    {"cmd": 7}, {"cmd": ["status"]}, {}, {"cmd": "ctl", "args": None}):
        answer = control.request(sock, request)
        assert answer["ok"] is False and answer["message"], (request, answer)
    assert pm.status()["pools"]["smtp"]["workers"] == 2
    assert pm.run_cli("ctl", "smtp", "3").returncode == 0


def test_workers_exit_when_the_master_dies_and_a_new_master_binds_the_ports(make_poolmgr):
    pm = make_poolmgr()
    workers = pm.worker_pids("smtp") + pm.worker_pids("scanner")
    pm.send_signal(signal.SIGKILL)
    pm.proc.wait(10)

    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    wait_until(lambda: not any(alive(pid) for pid in workers), timeout=10,
               what="the orphaned workers to exit")
    assert "the master is gone -- draining and exiting" in pm.log()
    pm.start()  # the same config, the same ports: nothing holds them any more
    with pm.smtp() as client:
        assert client.sendmail("a@example.org", ["bob@example.test"], message("again")) == {}


def test_a_trickling_control_client_does_not_hold_up_the_master(make_poolmgr):
    """A control client that trickles its request: status is answered meanwhile, the
    trickler gets "request timed out" after 2 s, and TERM still stops the master fast."""
    from poolmgr import control

    pm = make_poolmgr()
    sock = str(pm.dir / "ctl.sock")
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(sock)
    started = time.monotonic()
    for byte in b'{"cmd"':
        slow.send(bytes([byte]))
        asked = time.monotonic()
        assert control.request(sock, {"cmd": "status"})["ok"] is True
        assert time.monotonic() - asked < 0.5
        time.sleep(0.2)
    assert time.monotonic() - started < 2  # still inside the trickler's deadline
    slow.settimeout(5)
    assert b"request timed out" in slow.recv(1000)
    assert 1.5 < time.monotonic() - started < 4
    slow.close()
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(pm.dir / "ctl.sock"))  # connected, silent
    stopping = time.monotonic()
    pm.send_signal(signal.SIGTERM)
    assert pm.proc.wait(15) == 0 and time.monotonic() - stopping < 5
    idle.close()


def test_usr1_to_a_worker_still_starting_is_kept_not_fatal(make_poolmgr):
    """USR1 (log rotation) that reaches a worker before its handlers are in place is kept and
    replayed, not its default action (the worker killed): TTIN forks a worker, USR1 follows
    at once, so the master signals the new worker while it is still importing gevent."""
    pm = make_poolmgr()
    pm.send_signal(signal.SIGTTIN)
    time.sleep(0.05)
    pm.send_signal(signal.SIGUSR1)
    pm.wait_workers(3, 2)
    time.sleep(1)
    assert "killed by signal" not in pm.log()
    assert pm.wait_workers(3, 2)["pools"]["smtp"]["workers"] == 3


FAULT = """\
import poolmgr.master as master

_sample, _calls = master.Master.sample, [0]


def sample(self):
    _calls[0] += 1
    if 3 <= _calls[0] <= 5:
        raise ZeroDivisionError("a bug injected by the test")
    return _sample(self)


master.Master.sample = sample
"""


@pytest.mark.log_allows(r"error: master: sample failed; carrying on")
def test_a_bug_in_one_loop_step_is_logged_and_the_master_goes_on(make_poolmgr, tmp_path,
                                                                   monkeypatch):
    """A step of the master's loop that raises (here `sample`, made to fail three times by a
    sitecustomize the master imports) is logged; signals, reaping and control still work."""
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FAULT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path / "fault"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    pm = make_poolmgr()
    wait_until(lambda: pm.log().count("master: sample failed; carrying on") == 3,
               what="the injected failures")
    assert "sample failed; carrying on (ZeroDivisionError('a bug injected" in pm.log()
    os.kill(pm.proc.pid, signal.SIGTTIN)
    wait_until(lambda: len(pm.worker_pids("smtp")) == 3, what="a third SMTP worker")
    assert pm.status()["pools"]["smtp"]["workers"] == 3
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], message()) == {}
