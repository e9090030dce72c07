"""The spamd check back-end against a real spamd (Debian's spamd and spamassassin packages),
local tests only; and its answer parser and failures against fake daemons."""

import json
import re
import socket
import threading

import pytest

from poolmgr import config
from poolmgr.scanner.backends.base import CheckFailed, Message, Result
from poolmgr.scanner.backends.spamd import Backend, parse_reply, request
from poolmgr.smtp.headers import subject_of
from poolmgr.testing import Spamd, free_port, wait_until

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

# A message with every header SpamAssassin looks for, so that it scores nothing but its text.
# (No address in Received: SpamAssassin scores the documentation ranges as RCVD_ILLEGAL_IP.)
PLAIN = (b"Received: from h.example.org\r\n"
         b"\tby mx.example.net with ESMTP id Q; Fri, 27 Nov 2026 10:00:00 +0000\r\n"
         b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
         b"From: Alice <alice@example.org>\r\n"
         b"To: Bob <bob@example.net>\r\n"
         b"Subject: minutes of Tuesday's meeting\r\n"
         b"Message-ID: <20261127100000.1@example.org>\r\n"
         b"MIME-Version: 1.0\r\n"
         b"Content-Type: text/plain; charset=us-ascii\r\n"
         b"\r\n"
         b"Hello Bob,\r\n\r\n"
         b"here are the minutes of Tuesday's meeting. We agreed to move the release to next\r\n"
         b"month and to review the test plan on Thursday.\r\n\r\nAlice\r\n")


def spam(body: bytes = GTUBE) -> bytes:
    return PLAIN.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + body + b"\r\n"


def message(data: bytes) -> Message:
    return Message(data=data, queue_id="Q", sender="a@x", rcpts=("b@y",),
                   client_addr="192.0.2.1", client_name="", helo="h")


def backend(address: str, **settings) -> Backend:
    cfg = config.from_dict({"scanner": {"checks": ["spamd"],
                                        "spamd": {"address": address, **settings}}})
    return Backend(cfg)


@pytest.fixture(scope="module")
def spamd():
    daemon = Spamd().start()
    yield daemon
    daemon.stop()


def test_gtube_is_spam(spamd):
    result = backend(spamd.address).check(message(spam()))
    assert result.check == "spamd"
    assert result.score >= 900  # GTUBE: 1000, give or take the other rules
    assert result.required == 5.0
    assert "GTUBE" in result.tests
    assert result.skipped == ""


def test_plain_message_is_clean(spamd):
    result = backend(spamd.address).check(message(PLAIN))
    assert result.score < 2, result
    assert "GTUBE" not in result.tests


def test_user_header_is_sent(spamd):
    result = backend(spamd.address, user="alice").check(message(spam()))
    assert "GTUBE" in result.tests
    # spamd logs each message with the user it was checked for.
    wait_until(lambda: "result: Y" in spamd.log() and "user=alice," in spamd.log(),
               timeout=5, what="spamd's log line for alice")
    assert "for alice:" in spamd.log()


def test_unix_socket(spamd):
    result = backend(f"unix:{spamd.socket}").check(message(spam()))
    assert "GTUBE" in result.tests


def test_larger_than_max_size_is_skipped_without_connecting():
    closed = free_port()  # nothing listens: a connection would fail the check
    check = backend(f"127.0.0.1:{closed}", max_size=100)
    assert check.check(message(spam())) == Result("spamd", skipped=f"size {len(spam())} > max_size")
    small = message(b"Subject: x\r\n\r\nx\r\n")
    with pytest.raises(CheckFailed):  # at or below max_size it is asked
        check.check(small)


def test_spamd_down_fails():
    port = free_port()
    with pytest.raises(CheckFailed) as failed:
        backend(f"127.0.0.1:{port}").check(message(PLAIN))
    assert failed.value.check == "spamd"
    assert failed.value.detail == f"connect to 127.0.0.1:{port}: Connection refused"


class FakeSpamd:
    """A listening socket that answers each connection with `reply` (after reading the request),
    or never answers when reply is None."""

    def __init__(self, reply: bytes | None):
        self.reply = reply
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                self.requests.append(data)
                if self.reply is None:
                    threading.Event().wait(5)
                else:
                    conn.sendall(self.reply)

    def close(self):
        self.server.close()


@pytest.fixture
def fake():
    made = []

    def make(reply):
        made.append(FakeSpamd(reply))
        return made[-1]
    yield make
    for server in made:
        server.close()


def test_request_is_spamc_1_5(fake):
    server = fake(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 5\r\nSpam: False ; 0.5 / 5.0\r\n"
                  b"\r\nA,B\r\n")
    data = b"Subject: x\r\n\r\nbody\r\n"
    result = backend(server.address, user="bob").check(message(data))
    assert result == Result("spamd", score=0.5, required=5.0, tests=("A", "B"))
    assert server.requests == [b"SYMBOLS SPAMC/1.5\r\nContent-length: 20\r\nUser: bob\r\n\r\n"
                               + data]
    assert request(data) == b"SYMBOLS SPAMC/1.5\r\nContent-length: 20\r\n\r\n" + data


def test_no_answer_times_out(fake):
    server = fake(None)
    with pytest.raises(CheckFailed) as failed:
        backend(server.address, timeout="300ms").check(message(PLAIN))
    assert failed.value.detail == f"no answer from {server.address} within 0.3s"


@pytest.mark.parametrize("reply, detail", [
    (b"", "closed the connection without answering"),
    (b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch: Expected 9 bytes, got 8 bytes)"
     b"\r\n", "spamd answered 76 Bad header line: (Content-Length mismatch: Expected 9 bytes, "
              "got 8 bytes)"),
    (b"SPAMD/1.1 69 EX_UNAVAILABLE\r\n\r\n", "spamd answered 69 EX_UNAVAILABLE"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a spamd answer: HTTP/1.1 400 Bad Request"),
    (b"\x00\xff\x1b[31m\r\n", "not a spamd answer: ???[31m"),
    (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n", "no score in spamd's answer: "
                                                        "Spam: (missing)"),
    (b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\n\r\n", "no score in spamd's answer: Spam: maybe"),
    (b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 9 / 5\r\n", "spamd's answer ends before its body"),
    (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 9\r\nSpam: True ; 9 / 5\r\n\r\nA",
     "spamd's answer has 1 bytes of body, its Content-length says 9"),
])
def test_bad_answers_fail(fake, reply, detail):
    server = fake(reply)
    with pytest.raises(CheckFailed) as failed:
        backend(server.address).check(message(PLAIN))
    assert detail in failed.value.detail
    assert failed.value.detail.isprintable()


def test_parse_reply_without_content_length():
    """SPAMC/1.5 answers carry Content-length; older spamd did not for SYMBOLS."""
    assert parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: Yes ; -1.5 / 5.0\r\n\r\nX_1,Y_2\r\n") == \
        Result("spamd", score=-1.5, required=5.0, tests=("X_1", "Y_2"))
    assert parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0.0 / 5.0\r\n\r\n").tests == ()


def test_user_with_spaces_is_refused():
    with pytest.raises(ValueError):
        backend("127.0.0.1:783", user="a b")


# -- through poolmgr: levels, headers and actions (scanner/verdict.py) with the real spamd

def with_spamd(make_poolmgr, address: str, **scanner):
    pm = make_poolmgr(start=False)
    pm.configure("scanner", checks=["builtin", "spamd"], quarantine=str(pm.dir / "quarantine"),
                 spamd={"address": address, "timeout": "20s"}, **scanner)
    return pm.start()


def send(pm, data: bytes) -> tuple[int, bytes]:
    with pm.smtp() as client:
        client.ehlo()
        client.mail("alice@example.org")
        client.rcpt("bob@example.test")
        return client.data(data)


def head(delivered: bytes) -> str:
    return delivered.split(b"\r\n\r\n")[0].decode().replace("\r\n\t", " ")


def test_tag_and_tag2_levels_through_poolmgr(make_poolmgr, spamd):
    """tag_level far down: every message gets the X-Spam headers; GTUBE (1000 points) is at
    tag2_level: flagged and its Subject tagged, and below kill_level it is delivered."""
    pm = with_spamd(make_poolmgr, spamd.address, tag_level=-100.0, tag2_level=50.0,
                    kill_level=5000.0)
    assert send(pm, PLAIN)[0] == 250
    assert send(pm, spam())[0] == 250
    plain, gtube = (head(m) for m in pm.delivered())
    if "GTUBE" in plain:
        plain, gtube = gtube, plain
    assert "X-Spam-Flag: NO" in plain and "X-Spam-Status: No, score=" in plain
    assert "tagged_above=-100 required=50" in plain
    assert "Subject: minutes" in plain
    # GTUBE is 1000 points; other rules move it a little (ALL_TRUSTED -1, ...).
    assert "X-Spam-Flag: YES" in gtube and re.search(r"X-Spam-Status: Yes, score=9\d\d\.|"
                                                     r"X-Spam-Status: Yes, score=1\d\d\d\.", gtube)
    assert "GTUBE" in gtube and "X-Spam-Level: " + "*" * 64 + "\r\n" in gtube
    assert "Subject: ***Spam*** minutes" in gtube
    assert "X-Virus-Scanned: poolmgr at" in gtube
    assert "Passed SPAMMY" in pm.log() and "Passed CLEAN" in pm.log()


def test_a_subject_tag_that_is_not_ascii_reaches_the_next_hop_encoded(make_poolmgr, spamd):
    """spam_subject_tag `[СПАМ] ` (amavisd's $sa_spam_subject_tag may be any text): the tagged
    Subject reaches the next hop as RFC 2047 encoded words, the header all ASCII."""
    pm = with_spamd(make_poolmgr, spamd.address, tag2_level=50.0, kill_level=5000.0,
                    spam_subject_tag="[\u0421\u041f\u0410\u041c] ")
    assert send(pm, spam())[0] == 250
    (delivered,) = pm.delivered()
    assert delivered.split(b"\r\n\r\n")[0].isascii()
    assert subject_of(delivered) == "[\u0421\u041f\u0410\u041c] minutes of Tuesday's meeting"


def test_gtube_at_kill_level_is_rejected_before_the_queue(make_poolmgr, spamd):
    pm = with_spamd(make_poolmgr, spamd.address, spam_action="reject")
    code, text = send(pm, spam())
    assert code == 554
    assert re.fullmatch(rb"5\.7\.0 Rejected: spam, score=(9\d\d|1\d\d\d)\.\d+", text)
    assert pm.delivered() == []
    assert "Blocked SPAM {Rejected,Quarantined}" in pm.log()


def test_gtube_at_kill_level_is_discarded_into_the_quarantine(make_poolmgr, spamd):
    pm = with_spamd(make_poolmgr, spamd.address, spam_action="discard")
    code, text = send(pm, spam())
    assert code == 250 and b"discarded" in text
    assert pm.delivered() == []
    (entry,) = json.loads(pm.run_cli("quarantine", "list", "--json", check=True).stdout)
    assert entry["verdict"] == "spam_killed"
    assert re.fullmatch(r"SPAM \(score=(9\d\d|1\d\d\d)\.\d+\)", entry["reason"])


@pytest.mark.log_allows(r"spamd check failed")
def test_spamd_down_passes_unchecked_by_default(make_poolmgr):
    pm = with_spamd(make_poolmgr, f"127.0.0.1:{free_port()}")
    assert send(pm, spam())[0] == 250
    (delivered,) = pm.delivered()
    assert b"X-Poolmgr-Scan: clean (unchecked by spamd)" in delivered
    assert b"X-Spam-" not in delivered.split(b"\r\n\r\n")[0]


def test_bypass_spam_checks_for_own_networks(make_poolmgr, spamd):
    """amavisd's ORIGINATING: mail from scanner.bypass_spam_checks is not spam-checked (here
    the real client, from XFORWARD, is 127.0.0.1); the virus checks still run."""
    pm = with_spamd(make_poolmgr, spamd.address, spam_action="reject",
                    bypass_spam_checks=["127.0.0.0/8"])
    assert send(pm, spam())[0] == 250
    (delivered,) = pm.delivered()
    assert b"X-Spam-" not in delivered.split(b"\r\n\r\n")[0]
    assert b"X-Virus-Scanned: poolmgr at" in delivered
    assert pm.status()["scanner"]["checks"]["spamd"]["runs"] == 0
