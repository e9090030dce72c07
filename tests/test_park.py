"""Parked sessions (`smtp.park`): an idle session has no greenlet, yet it counts against
`smtp.max_sessions_per_worker`, wakes for its client's command, its greet pause and its
timeout, and a stopping worker closes it with 421."""

import re
import signal
import smtplib
import time

from helpers import HELO, Raw, message, wait_until


def one_worker(make_poolmgr, **smtp):
    return make_poolmgr({"smtp": {"min_workers": 1, "max_workers": 1, **smtp},
                         "scanner": {"min_workers": 1, "max_workers": 1}})


def test_parked_sessions_fill_a_worker_and_a_closed_one_makes_room(make_poolmgr):
    pm = one_worker(make_poolmgr, max_sessions_per_worker=3)
    idle = [Raw(pm.smtp_port) for _ in range(3)]
    for client in idle:
        assert client.reply()[0] == 220  # then parked: no command comes
    waiting = Raw(pm.smtp_port, timeout=1.5)
    try:
        waiting.reply()
        raise AssertionError("a fourth session was served by a full worker")
    except TimeoutError:
        pass  # in the accept queue
    idle.pop().close()
    waiting.sock.settimeout(10)
    assert waiting.reply()[0] == 220
    for client in idle + [waiting]:
        client.send(b"QUIT\r\n")
        assert client.reply()[0] == 221


def test_a_parked_session_wakes_for_each_command_and_delivers(make_poolmgr):
    pm = one_worker(make_poolmgr)
    with smtplib.SMTP("127.0.0.1", pm.smtp_port, local_hostname=HELO, timeout=15) as client:
        for _ in range(3):
            time.sleep(0.3)  # parked between commands
            assert client.noop()[0] == 250
        assert client.sendmail("alice@example.org", ["bob@example.test"],
                               message("after naps")) == {}
    assert wait_until(lambda: "data=1" in pm.log())


def test_the_greet_pause_and_the_timeout_run_out_while_parked(make_poolmgr):
    pm = make_poolmgr({"defence": {"greet_wait": "1s"}, "smtp": {"timeout": "2s"}})
    client = Raw(pm.smtp_port)
    started = time.monotonic()
    code, lines = client.reply()
    assert code == 220 and lines[0].startswith("220-")  # the two-part banner
    assert 0.9 < time.monotonic() - started < 3
    code, lines = client.reply()
    assert code == 421 and "4.4.2" in lines[0]
    assert 2.9 < time.monotonic() - started < 6
    assert client.closed()
    assert wait_until(lambda: "timeout after CONNECT from" in pm.log())
    assert re.search(r"PASS NEW \[127.0.0.1\]", pm.log())


def test_a_client_talking_in_the_greet_pause_is_caught_while_parked(make_poolmgr):
    pm = make_poolmgr({"defence": {"greet_wait": "2s"}})
    client = Raw(pm.smtp_port)
    client.send(b"EHLO bot\r\n")
    code, lines = client.reply()
    assert code == 220 and lines[0].startswith("220-")
    assert wait_until(lambda: re.search(
        r"PREGREET 10 after \S+ from \[127.0.0.1\]:\d+: EHLO bot\\r\\n", pm.log()))
    client.close()


def test_a_stopping_worker_closes_parked_sessions_with_421(make_poolmgr):
    pm = one_worker(make_poolmgr)
    idle = Raw(pm.smtp_port)
    assert idle.reply()[0] == 220
    time.sleep(2.5)  # past the drain's grace for a session just accepted
    pm.send_signal(signal.SIGTERM)
    code, lines = idle.reply()
    assert code == 421 and "4.3.2" in lines[0]
    assert pm.proc.wait(30) == 0
