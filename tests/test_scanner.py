"""The scanner pool on its own: LMTP both ways, recycling, access control, XFORWARD, BDAT."""

import re
import smtplib
import time

import pytest

from helpers import HELO, Raw, message, only_worker, wait_until


def test_lmtp_next_hop_and_lmtp_hand_off(make_poolmgr):
    """poolmgr A re-injects over LMTP into poolmgr B's scanner pool, a real LMTP server."""
    downstream = make_poolmgr(name="downstream")
    upstream = make_poolmgr({"scanner": {
        "next_hop": f"lmtp:127.0.0.1:{downstream.scanner_port}"}}, start=False, name="upstream")
    upstream.configure("smtp", proxy_filter=f"lmtp:127.0.0.1:{upstream.scanner_port}").start()
    with upstream.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test", "carol@example.test"],
                               message("over lmtp")) == {}
    (delivered,) = downstream.delivered()
    assert b"Subject: over lmtp" in delivered
    assert delivered.count(b"(poolmgr scanner) with LMTP") == 2  # through both scanner pools
    # Each scanner removes the X-Poolmgr-Scan it was given: only the last verdict is there.
    assert delivered.count(b"X-Poolmgr-Scan: clean") == 1
    # The upstream scanner logs its disconnect line once the SMTP worker's QUIT is in, which
    # may be after the client has its 250.
    wait_until(lambda: "lhlo=1" in upstream.log(), timeout=10, what="the LMTP session's end")
    # The upstream scanner keeps its next-hop connection for the next message
    # (timeouts.connection_cache_time_limit), then says QUIT.
    wait_until(lambda: "lhlo=1 xforward=1 mail=1 rcpt=2 data=1 quit=1" in downstream.log(), timeout=10)



@pytest.mark.parametrize("time_limit, expected", [
    ("5s", ["ehlo=1 xforward=2 mail=2 rcpt=2 data=2 quit=1"]),
    ("0s", ["ehlo=1 xforward=1 mail=1 rcpt=1 data=1 quit=1"] * 2),
])
def test_scanner_reuses_its_next_hop_connection(make_poolmgr, time_limit, expected):
    """timeouts.connection_cache_time_limit: two messages in a row share one connection to the
    next hop (here another poolmgr's scanner pool), or take one each when it is 0."""
    downstream = make_poolmgr(name="downstream")
    upstream = make_poolmgr({"scanner": {"min_workers": 1,
                                         "next_hop": f"smtp:127.0.0.1:{downstream.scanner_port}"},
                             "timeouts": {"connection_cache_time_limit": time_limit}},
                            name="upstream")
    for subject in ("first", "second"):
        with upstream.smtp() as client:
            assert client.sendmail("alice@example.org", ["bob@example.test"],
                                   message(subject)) == {}
    wait_until(lambda: len(downstream.delivered()) == 2, timeout=10)

    def sessions():
        return re.findall(r"poolmgr/scanner\[\d+\]: disconnect from \S+ (.*) commands=",
                          downstream.log())
    wait_until(lambda: len(sessions()) == len(expected), timeout=20)
    assert sessions() == expected


def test_idle_next_hop_connection_is_closed_while_the_client_stays(make_poolmgr):
    """Postfix keeps its content_filter connection open between messages; meanwhile the
    scanner's own idle connection to the next hop is closed after the time limit."""
    downstream = make_poolmgr(name="downstream")
    upstream = make_poolmgr({"scanner": {"min_workers": 1,
                                         "next_hop": f"smtp:127.0.0.1:{downstream.scanner_port}"},
                             "timeouts": {"connection_cache_time_limit": "1s"}},
                            name="upstream")
    raw = Raw(upstream.scanner_port)
    raw.reply()
    raw.send(b"EHLO postfix.test\r\n")
    raw.reply()
    for n in (1, 2):
        raw.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        assert [raw.reply()[0] for _ in range(3)] == [250, 250, 354]
        raw.send(b"Subject: %d\r\n\r\nhi\r\n.\r\n" % n)
        assert raw.reply()[0] == 250
        wait_until(lambda: downstream.log().count("data=1 quit=1") == n, timeout=10)
    raw.send(b"QUIT\r\n")
    assert raw.reply()[0] == 221
    raw.close()
    assert len(downstream.delivered()) == 2


def test_lmtp_gives_one_reply_per_recipient(make_poolmgr):
    pm = make_poolmgr()
    raw = Raw(pm.scanner_port)
    assert raw.reply()[0] == 220
    raw.send(b"LHLO upstream.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"
             b"RCPT TO:<c@example.test>\r\nDATA\r\n")
    code, lines = raw.reply()
    assert code == 250 and "250-PIPELINING" in lines
    assert [raw.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    raw.send(b"Subject: two\r\n\r\nhi\r\n.\r\n")
    assert [raw.reply()[0] for _ in range(2)] == [250, 250]
    raw.close()


def test_xforward_names_the_real_client(make_poolmgr):
    pm = make_poolmgr()
    raw = Raw(pm.scanner_port)
    raw.reply()
    raw.send(b"EHLO mx.test\r\n")
    code, lines = raw.reply()
    assert any(line[4:].startswith("XFORWARD NAME ADDR") for line in lines)
    raw.send(b"XFORWARD NAME=spike.example ADDR=192.0.2.55 PROTO=ESMTP HELO=spike\r\n"
             b"XFORWARD IDENT=ABCDEF1234 SOURCE=REMOTE\r\n"
             b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert [raw.reply()[0] for _ in range(5)] == [250, 250, 250, 250, 354]
    raw.send(b"Subject: forwarded\r\n\r\nhi\r\n.\r\nXFORWARD FROB=1\r\n"
             b"XFORWARD IDENT=AB+0AReceived:+20forged\r\nQUIT\r\n")
    assert raw.reply()[0] == 250
    assert raw.reply()[1][-1].startswith("501 5.5.4")
    assert raw.reply()[1][-1].startswith("501 5.5.4")  # a line feed in a value: refused
    assert raw.reply()[0] == 221
    assert "ABCDEF1234: client=spike.example[192.0.2.55]" in pm.log()


def test_bdat_chunks_make_one_message_and_a_refused_chunk_is_never_run(make_poolmgr):
    """CHUNKING (RFC 3030), which the SMTP pool's hand-off uses: chunks are taken as octets,
    also when the command is refused, so a chunk that looks like commands is never run."""
    pm = make_poolmgr()
    raw = Raw(pm.scanner_port)
    raw.reply()
    raw.send(b"EHLO mx.test\r\n")
    assert "250-CHUNKING" in raw.reply()[1]
    smuggled = b"QUIT\r\nMAIL FROM:<x@evil.example>\r\n"
    raw.send(b"BDAT %d\r\n" % len(smuggled) + smuggled + b"NOOP\r\n")
    assert raw.reply()[1] == ["503 5.5.1 Error: need MAIL command"]
    assert raw.reply()[0] == 250  # the NOOP: the chunk's QUIT and MAIL were not run
    first, last = b"Subject: chunks\r\n\r\n.leading dot kept\r\n", b"end\r\n"
    raw.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"
             b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (len(first), first, len(last), last))
    assert [raw.reply()[0] for _ in range(3)] == [250, 250, 250]
    assert raw.reply()[0] == 250
    (delivered,) = pm.delivered()
    assert delivered.endswith(first + last) and b"X-Poolmgr-Scan: clean" in delivered
    bare = b"Subject: bare\n\nx\r\n"
    raw.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nBDAT 1\r\nxDATA\r\n"
             b"BDAT %d LAST\r\n%s" % (len(bare), bare))
    assert [raw.reply()[0] for _ in range(3)] == [250, 250, 250]
    assert raw.reply()[1] == ["503 5.5.1 Error: mixing BDAT and DATA in one transaction"]
    assert raw.reply()[1] == ["550 5.5.2 Error: bare <LF> received"]
    assert len(pm.delivered()) == 1
    raw.send(b"BDAT ten LAST\r\n")
    assert raw.reply()[1] == ["501 5.5.4 Syntax: BDAT count [LAST]"]
    assert raw.closed()
    wait_until(lambda: "mail=2 rcpt=2 data=0/1 bdat=3/6 noop=1 commands=" in pm.log(), what="disconnect line")


def test_the_hand_off_to_the_scanner_pool_is_one_bdat(make_poolmgr):
    pm = make_poolmgr()
    with pm.smtp() as client:
        assert client.sendmail("a@example.org", ["bob@example.test"], message("chunked")) == {}
    assert b"Subject: chunked" in pm.delivered()[0]
    pm.stop()
    assert re.search(r"poolmgr/scanner\[\d+\]: disconnect from unknown\[127\.0\.0\.1\] ehlo=1 "
                     r"xforward=1 mail=1 rcpt=1 bdat=1 quit=1 commands=6", pm.log())


def test_scanner_refuses_clients_outside_inet_acl(make_poolmgr):
    pm = make_poolmgr({"scanner": {"inet_acl": ["127.0.0.1/32"]}})
    raw = Raw(pm.scanner_port, source="127.0.0.9")
    code, lines = raw.reply()
    assert code == 554 and lines[-1] == "554 5.7.1 Error: access denied for 127.0.0.9"
    assert raw.closed()


def test_scanner_workers_are_recycled_after_max_requests(make_poolmgr):
    pm = make_poolmgr({"scanner": {"max_requests": 2}})
    first = set(pm.worker_pids("scanner"))
    with pm.smtp() as client:
        for n in range(6):
            assert client.sendmail("a@example.org", ["bob@example.test"],
                                   message(f"recycle {n}")) == {}
    assert len(pm.delivered()) == 6
    wait_until(lambda: "recycling after 2 messages (scanner.max_requests)" in pm.log(),
               what="a recycled scanner worker")
    status = pm.wait_workers(2, 2)
    assert first - {w["pid"] for w in status["pools"]["scanner"]["worker_list"]}
    assert status["pools"]["scanner"]["counters"]["scanned"] == 6  # counters outlive workers


def test_scanner_as_a_plain_smtp_content_filter(make_poolmgr):
    """What Postfix's smtp client does with content_filter: SMTP, no XFORWARD needed."""
    pm = make_poolmgr()
    with smtplib.SMTP("127.0.0.1", pm.scanner_port, local_hostname=HELO, timeout=30) as client:
        assert client.sendmail("a@example.org", ["x@anywhere.example"], message("filter")) == {}
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("a@example.org", ["x@anywhere.example"], message(
                "v", "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*\r\n"))
        assert info.value.smtp_code == 554
    (delivered,) = pm.delivered()
    assert b"Subject: filter" in delivered and b"X-Poolmgr-Scan: clean" in delivered



def test_a_worker_busy_on_one_connection_keeps_its_heartbeat(make_poolmgr):
    """A client that sends message after message with no pause (an SMTP worker's kept
    hand-off connection under load) never leaves the scanner worker waiting for input; the
    worker still beats, and is not taken for hung and killed under its client."""
    pm = make_poolmgr({"master": {"worker_timeout": "2s"}, "scanner": {"max_requests": 10**6}})
    started = time.monotonic()
    sent = 0
    with smtplib.SMTP("127.0.0.1", pm.scanner_port, local_hostname=HELO, timeout=30) as client:
        while time.monotonic() - started < 5:
            assert client.sendmail("a@example.org", ["bob@example.test"], message()) == {}
            sent += 1
    assert "no heartbeat" not in pm.log()
    assert len(pm.delivered()) == sent


def test_help_lists_each_listeners_own_commands(make_poolmgr):
    """HELP comes from the listener's command table: the scanner speaks LHLO and XFORWARD and
    offers no STARTTLS; the SMTP pool without a certificate offers no STARTTLS either."""
    pm = make_poolmgr()
    for port, expected in (
            (pm.scanner_port, "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY "
                              "HELP BDAT LHLO XFORWARD"),
            (pm.smtp_port, "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY "
                           "HELP")):
        raw = Raw(port)
        raw.reply()
        raw.send(b"HELP\r\n")
        assert raw.reply()[1] == [expected]
        raw.close()


def test_scanner_worker_survives_accept_failures(make_poolmgr):
    """Out of file descriptors (EMFILE) at accept: the scanner worker logs, waits and goes on
    serving once descriptors are free again."""
    import os

    import psutil

    pm = make_poolmgr({"scanner": {"min_workers": 1}})
    (pid,) = pm.worker_pids("scanner")
    worker = psutil.Process(pid)
    limit = worker.rlimit(psutil.RLIMIT_NOFILE)
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = next(n for n in range(len(used) + 1) if n not in used)
    worker.rlimit(psutil.RLIMIT_NOFILE, (lowest_free, limit[1]))  # the next accept: EMFILE
    raw = Raw(pm.scanner_port)
    try:
        wait_until(lambda: "accept failed: Too many open files" in pm.log(), timeout=10,
                   what="the failed accept logged")
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    finally:
        worker.rlimit(psutil.RLIMIT_NOFILE, limit)
    assert raw.reply()[0] == 220  # served by the same worker, once it could accept
    raw.close()
    assert pm.worker_pids("scanner") == [pid]


def test_a_cached_hand_off_connection_never_starves_another_hand_off(make_poolmgr):
    """SMTP workers keep their hand-off connections open between messages; with one scanner
    worker, the first SMTP worker's idle connection holds it. A second SMTP worker's hand-off
    then waits in the accept queue, and the scanner worker lets the idle one go at once (421),
    rather than after the cache's 30 s."""
    pm = make_poolmgr({"scanner": {"min_workers": 1, "max_workers": 1},
                       "autoscale": {"enabled": False},
                       "timeouts": {"connection_cache_time_limit": "30s"}})
    first, second = pm.worker_pids("smtp")
    with only_worker(pm, first), pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], message("one")) == {}
    started = time.monotonic()
    with only_worker(pm, second), pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], message("two")) == {}
    assert time.monotonic() - started < 5
    assert len(pm.delivered()) == 2
    assert pm.status()["pools"]["scanner"]["counters"]["connections"] == 2


def test_a_hand_off_client_that_has_just_connected_is_not_let_go_for_another(make_poolmgr):
    """Only a connection kept between messages yields to a waiting hand-off: one that has
    yet to send its first message is served, then let go after it."""
    pm = make_poolmgr({"scanner": {"min_workers": 1, "max_workers": 1},
                       "autoscale": {"enabled": False}})
    first = Raw(pm.scanner_port)
    assert first.reply()[0] == 220
    waiting = Raw(pm.scanner_port)  # in the accept queue: the one scanner worker is busy
    time.sleep(0.5)  # the worker looks for waiting connections every 50 ms
    for line, code in ((b"EHLO smtpd.test", 250), (b"MAIL FROM:<alice@example.org>", 250),
                       (b"RCPT TO:<bob@example.test>", 250), (b"DATA", 354)):
        first.send(line + b"\r\n")
        assert first.reply()[0] == code, line
    first.send(message("first").replace(b"\n.", b"\n..") + b"\r\n.\r\n")
    assert first.reply()[0] == 250
    code, lines = first.reply()  # then let go for the waiting one
    assert code == 421 and "closing an idle connection for a waiting client" in lines[0]
    assert waiting.reply()[0] == 220
    waiting.close()
    assert len(pm.delivered()) == 1
