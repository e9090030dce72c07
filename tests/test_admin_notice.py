"""scanner/admin_notice.py through a real poolmgr with smtp-sink as its next hop:
`scanner.virus_admin` gets one short notice from the null sender for each message blocked as a
virus or banned (amavisd's $virus_admin), none for clean mail, spam, a content rule's reject
or a deferred message; a notice that cannot be sent changes nothing for the message, and a
slow scan does not eat its time."""

import re
import smtplib
import socket
import struct
import threading

import pytest

from helpers import message, wait_until
from poolmgr import config
from poolmgr.scanner import admin_notice
from poolmgr.scanner.backends.builtin import EICAR
from poolmgr.testing import free_port
from test_banned import AMAVISD, banned_mail

ADMIN = "virusalert@example.test"


def envelope(dump: bytes) -> tuple[bytes, list[bytes]]:
    """smtp-sink's X-Mail-Args and X-Rcpt-Args of one dump."""
    lines = dump.split(b"\n")
    sender = next(line[13:] for line in lines if line.startswith(b"X-Mail-Args: "))
    return sender, [line[13:] for line in lines if line.startswith(b"X-Rcpt-Args: ")]


def with_admin(make_poolmgr, next_hop: str, **scanner):
    pm = make_poolmgr(start=False)
    pm.configure("scanner", **{"virus_admin": ADMIN, "next_hop": next_hop,
                               "banned_filenames": AMAVISD,
                               "quarantine": str(pm.dir / "quarantine"), **scanner})
    return pm.start()


def test_a_rejected_virus_is_announced_once(make_poolmgr, make_sink):
    sink = make_sink()
    pm = with_admin(make_poolmgr, f"smtp:127.0.0.1:{sink.port}")
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["carol@example.test"],
                               message("clean")) == {}
        client.ehlo()
        client.mail("alice@example.org")
        client.rcpt("bob@example.test")
        code, _ = client.data(message("see attached", EICAR.decode() + "\r\n"))
    assert code == 554
    wait_until(lambda: len(sink.messages()) == 2, what="the clean message and the notice")
    notices = [d for d in sink.messages() if b"Subject: INFECTED" in d]
    assert len(notices) == 1  # and the other one is the clean message
    (notice,) = notices
    assert envelope(notice) == (b"<>", [f"<{ADMIN}>".encode()])
    queue_id = re.search(r"(\w+): Blocked INFECTED", pm.log()).group(1)
    quarantined = re.search(r"quarantine: (virus-\S+),", pm.log()).group(1)
    assert b"Subject: INFECTED (Eicar-Test-Signature) in mail FROM <alice@example.org>" in notice
    for line in (f"Queue-ID: {queue_id}", "Action: Rejected", f"Quarantine: {quarantined}",
                 "Client: [127.0.0.1]", "Return-Path: <alice@example.org>",
                 "Recipients: <bob@example.test>", "Subject: see attached"):
        assert line.encode() in notice, line
    assert EICAR not in notice  # a notice, not a copy
    assert re.search(rf"{queue_id}: virus_admin notice \w+ to <{ADMIN}>: relay=smtp:", pm.log())


def test_a_discarded_banned_message_is_announced_and_spam_is_not(make_poolmgr, make_sink):
    sink = make_sink()
    pm = with_admin(make_poolmgr, f"smtp:127.0.0.1:{sink.port}", virus_action="discard",
                    rules=[{"name": "lottery", "header": "Subject", "pattern": "lottery",
                            "action": "tag"}])
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], banned_mail()) == {}
        assert client.sendmail("alice@example.org", ["bob@example.test"],
                               message("lottery")) == {}
    wait_until(lambda: len(sink.messages()) == 2, what="the notice and the tagged message")
    (notice,) = [d for d in sink.messages() if b"Subject: BANNED" in d]
    assert b"Subject: BANNED (multipart/mixed | application/pdf,.pdf,invoice.pdf.exe) in " \
           b"mail FROM <alice@example.org>" in notice
    assert b"Action: Discarded" in notice
    assert pm.log().count("virus_admin notice") == 1


@pytest.mark.log_allows(r"virus_admin notice to .* failed", r"next hop .* failed")
def test_a_notice_that_cannot_be_sent_changes_nothing(make_poolmgr):
    pm = with_admin(make_poolmgr, f"smtp:127.0.0.1:{free_port()}")  # nothing listens
    with pm.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("alice@example.org", ["bob@example.test"],
                            message("v", EICAR.decode() + "\r\n"))
        assert refused.value.smtp_code == 554
        with pytest.raises(smtplib.SMTPDataError) as deferred:  # not blocked: no notice
            client.sendmail("alice@example.org", ["bob@example.test"], message("clean"))
        assert deferred.value.smtp_code == 451
    wait_until(lambda: f"virus_admin notice to <{ADMIN}> failed at connect" in pm.log(),
               what="the failed notice logged")
    assert pm.log().count("virus_admin notice") == 1


def test_a_content_rule_reject_is_not_announced(make_poolmgr, make_sink):
    """builtin's rules reject with a verdict of kind banned; amavisd's $virus_admin hears of
    viruses and banned contents only."""
    sink = make_sink()
    pm = with_admin(make_poolmgr, f"smtp:127.0.0.1:{sink.port}",
                    rules=[{"name": "no-lottery", "header": "Subject", "pattern": "lottery"}])
    with pm.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("alice@example.org", ["bob@example.test"], message("lottery"))
        assert refused.value.smtp_code == 554
        assert b"content rule no-lottery" in refused.value.smtp_error
        client.ehlo()
        client.mail("alice@example.org")
        client.rcpt("bob@example.test")
        assert client.data(banned_mail())[0] == 554
    wait_until(lambda: sink.messages(), what="the banned message's notice")
    (notice,) = sink.messages()
    assert b"Subject: BANNED (multipart/mixed" in notice
    assert pm.log().count("virus_admin notice") == 1


class SlowClamd:
    """A stand-in for clamd (zINSTREAM) that finds a virus in everything, `delay` seconds
    after the message's last chunk: a scan longer than scanner.timeout. The delay is the
    condition under test (the scan's duration), not a wait for something to happen."""

    VIRUS = "Slow-Test-Signature"

    def __init__(self, delay: float):
        self.delay, self.port = delay, free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn, conn.makefile("rb") as reader:
            reader.read(len(b"zINSTREAM\0"))
            while (size := struct.unpack(">I", reader.read(4))[0]):
                reader.read(size)
            self.stopped.wait(self.delay)
            conn.sendall(f"stream: {self.VIRUS} FOUND\0".encode())

    def stop(self):
        self.stopped.set()
        self.sock.close()


def test_a_notice_after_a_scan_slower_than_scanner_timeout_still_goes(make_poolmgr,
                                                                     make_sink):
    """The notice has scanner.timeout of its own: a scan that took longer (clamd has its
    own, longer, timeout) does not leave it none."""
    sink, clamd = make_sink(), SlowClamd(delay=1.5)
    try:
        pm = with_admin(make_poolmgr, f"smtp:127.0.0.1:{sink.port}", timeout="1s",
                        checks=["builtin", "clamd"],
                        clamd={"address": f"127.0.0.1:{clamd.port}", "timeout": "10s"})
        with pm.smtp() as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("alice@example.org", ["bob@example.test"], message("slow"))
            assert refused.value.smtp_code == 554
    finally:
        clamd.stop()
    wait_until(lambda: sink.messages(), what="the notice")
    (notice,) = sink.messages()
    assert f"Subject: INFECTED ({SlowClamd.VIRUS}) in mail FROM".encode() in notice
    assert re.search(rf"virus_admin notice \w+ to <{ADMIN}>: relay=smtp:", pm.log())


def test_virus_admin_must_be_an_address():
    with pytest.raises(config.ConfigError) as error:
        config.from_dict({"scanner": {"virus_admin": "admin@example.test>\r\nDATA"}})
    assert "[scanner] virus_admin: not an address" in error.value.errors[0]


def test_a_notice_says_an_unknown_client_is_unknown():
    """A client Postfix forwarded as XFORWARD ADDR=[UNAVAILABLE] is no address: the notice
    says so, not `[]`."""
    notice = admin_notice.compose(
        admin=ADMIN, hostname="mx.example.test", notice_id="n1", summary="INFECTED (X)",
        outcome="Rejected", queue_id="Q1", quarantine_id="", client="", sender="a@example.org",
        rcpts=["b@example.test"], data=message("local"))
    assert b"Client: unknown\r\n" in notice and b"[]" not in notice
