"""The rspamd back-end against a real rspamd (Debian's package, offline, see
poolmgr.testing.rspamd), and against small fake servers for the failures rspamd will not
produce on demand (error status, bad JSON, a silent daemon)."""

import http.server
import json
import shutil
import socket
import threading

import pytest

from poolmgr import config
from poolmgr.scanner.backends.base import CheckFailed, Message
from poolmgr.scanner.backends.rspamd import Backend, ask, request_headers
from poolmgr.testing import ENVELOPE_SYMBOL, Rspamd, free_port

# The GTUBE test string (https://spamassassin.apache.org/gtube/), which rspamd knows itself.
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def data(body: str, subject: str = "test") -> bytes:
    return (f"From: <a@x.example>\r\nTo: <b@y.example>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@x.example>\r\n\r\n{body}\r\n").encode()


def message(body: str = "Just a note.", **envelope) -> Message:
    fields = dict(queue_id="Q", sender="a@x", rcpts=("b@y",), client_addr="192.0.2.1",
                  client_name="", helo="h")
    return Message(data=data(body), **(fields | envelope))


def backend(url: str, timeout: str = "30s") -> Backend:
    cfg = config.from_dict({"scanner": {"checks": ["rspamd"],
                                        "rspamd": {"url": url, "timeout": timeout}}})
    return Backend(cfg)


@pytest.fixture(scope="module")
def rspamd():
    if not shutil.which("rspamd"):
        pytest.fail("rspamd is not installed: run scripts/test.sh, which installs it")
    daemon = Rspamd().start()
    yield daemon
    daemon.stop()


def test_gtube_is_rejected(rspamd):
    result = backend(rspamd.url).check(message(f"Please ignore.\r\n{GTUBE}"))
    assert result.check == "rspamd"
    assert result.action == "reject"
    assert "GTUBE" in result.tests
    assert result.score >= result.required == 15.0


def test_plain_message_scores_low(rspamd):
    result = backend(rspamd.url).check(message())
    assert (result.action, result.score, result.required) == ("no action", 0.5, 15.0)
    assert result.tests == (ENVELOPE_SYMBOL,)  # our rule, which hits every message


def envelope_seen(rspamd, msg: Message) -> list[str]:
    return ask(rspamd.url, 30.0, msg)["symbols"][ENVELOPE_SYMBOL]["options"]


def test_envelope_reaches_rspamd(rspamd):
    msg = message(queue_id="4XyZ1", sender="alice@example.org",
                  rcpts=("bob@example.test", "carol@example.test"), client_addr="192.0.2.7",
                  client_name="mail.example.org", helo="mail.example.org")
    assert envelope_seen(rspamd, msg) == [
        "ip=192.0.2.7", "from=alice@example.org", "rcpt=bob@example.test,carol@example.test",
        "helo=mail.example.org", "qid=4XyZ1", "hostname=mail.example.org"]
    assert "qid: <4XyZ1>, ip: 192.0.2.7, from: <alice@example.org>" in rspamd.log()


def test_null_sender_and_unknown_client_name(rspamd):
    options = envelope_seen(rspamd, message(sender="", client_name="", client_addr="2001:db8::1"))
    assert "from=" in options
    assert "ip=2001:db8::1" in options
    assert "hostname=" in options
    assert request_headers(message(sender="", client_name=""))[1] == ("From", b"<>")


def test_rspamd_down():
    port = free_port()  # nothing listens there
    with pytest.raises(CheckFailed) as failed:
        backend(f"http://127.0.0.1:{port}").check(message())
    assert failed.value.detail == f"connect to 127.0.0.1:{port}: Connection refused"


def test_silent_daemon_times_out():
    with socket.socket() as listener:  # connections queue in the backlog, never answered
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        with pytest.raises(CheckFailed) as failed:
            backend(f"http://127.0.0.1:{port}", timeout="300ms").check(message())
    assert failed.value.detail == f"no answer from 127.0.0.1:{port}: no answer within 0.3s"


class FakeRspamd(http.server.BaseHTTPRequestHandler):
    """Answers /checkv2 with the server's `status` and `body`, and records the request."""

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        self.server.requests.append((self.command, self.path, self.headers,
                                     self.rfile.read(length)))
        self.send_response(self.server.status)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake():
    server = http.server.HTTPServer(("127.0.0.1", 0), FakeRspamd)
    server.requests, server.status, server.body = [], 200, b""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_port}/"
    yield server
    server.shutdown()
    server.server_close()


def test_request_on_the_wire(fake):
    # An answer as rspamd's protocol documentation shows one, cut down.
    fake.body = json.dumps({
        "is_skipped": False, "score": 5.2, "required_score": 7, "action": "add header",
        "symbols": {"DATE_IN_PAST": {"name": "DATE_IN_PAST", "score": 0.1},
                    "BAYES_SPAM": {"name": "BAYES_SPAM", "score": 5.1,
                                   "options": ["99.99%"]}},
        "messages": {}, "message-id": "x@x.example"}).encode()
    msg = message(rcpts=("b@y", "c@z"), client_name="mail.example")
    result = backend(fake.url).check(msg)
    assert (result.score, result.required, result.action) == (5.2, 7.0, "add header")
    assert result.tests == ("BAYES_SPAM", "DATE_IN_PAST")
    [(method, path, headers, body)] = fake.requests
    assert (method, path, body) == ("POST", "/checkv2", msg.data)
    assert headers.get_all("Rcpt") == ["b@y", "c@z"]
    assert [headers[h] for h in ("IP", "From", "Helo", "Queue-Id", "Hostname")] == [
        "192.0.2.1", "a@x", "h", "Q", "mail.example"]


@pytest.mark.parametrize("status, body, detail", [
    (500, b'{"error": "cannot process\\nmessage"}',
     "HTTP 500 Internal Server Error: cannot process?message"),
    (404, b"<html>", "HTTP 404 Not Found"),
    (200, b"<html>not json", "answer is not JSON"),
    (200, b"[1, 2]", "answer is not a JSON object"),
    (200, b'{"score": 1.0, "action": "no action"}',
     "answer lacks score, required_score, action or symbols"),
    (200, b'{"score": "x", "required_score": 15, "action": "no action"}',
     "answer lacks score, required_score, action or symbols"),
])
def test_unusable_answers(fake, status, body, detail):
    fake.status, fake.body = status, body
    with pytest.raises(CheckFailed) as failed:
        backend(fake.url).check(message())
    assert (failed.value.check, failed.value.detail) == ("rspamd", detail)


def test_header_injection_is_refused(fake):
    with pytest.raises(CheckFailed) as failed:
        backend(fake.url).check(message(helo="h\r\nPass: all"))
    assert failed.value.detail.startswith("cannot send the request: Invalid header value")
    assert fake.requests == []


def test_bad_url():
    with pytest.raises(CheckFailed) as failed:
        backend("127.0.0.1:11333").check(message())
    assert failed.value.detail == "bad url '127.0.0.1:11333': expected http://host:port"


def test_through_poolmgr_gtube_is_rejected_and_plain_mail_tagged(make_poolmgr, rspamd):
    """checks = ["rspamd"]: GTUBE's score is above kill_level (spam_action reject: 554 before
    the queue); a plain message below tag_level -1 gets rspamd's score in X-Spam-Status."""
    pm = make_poolmgr(start=False)
    pm.configure("scanner", checks=["rspamd"], spam_action="reject", tag_level=-1.0,
                 quarantine=str(pm.dir / "quarantine"), rspamd={"url": rspamd.url})
    pm.start()
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"],
                               data("Just a note.", "plain")) == {}
        client.mail("alice@example.org")
        client.rcpt("bob@example.test")
        code, text = client.data(data(f"Please ignore.\r\n{GTUBE}", "gtube"))
    assert code == 554 and text.startswith(b"5.7.0 Rejected: spam, score=")
    (delivered,) = pm.delivered()
    head = delivered.split(b"\r\n\r\n")[0].decode().replace("\r\n\t", " ")
    assert "X-Spam-Flag: NO" in head
    assert "X-Spam-Status: No, score=0.500 tagged_above=-1 required=6.31" in head
    assert f"tests=[{ENVELOPE_SYMBOL}]" in head
    assert "X-Virus-Scanned" not in head  # no virus check ran
