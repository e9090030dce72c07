"""The rspamd back-end against a real rspamd (Debian's package, offline, see
poolmgr.testing.rspamd), and against small fake servers for the failures rspamd will not
produce on demand (error status, bad JSON, a silent daemon)."""

import base64
import hashlib
import http.server
import json
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import threading

import pytest

from poolmgr import config
from poolmgr.scanner.backends.base import CheckFailed, Message
from poolmgr.scanner.backends.rspamd import Backend, ask, edits, request_headers, result
from poolmgr.smtp import replies as R
from poolmgr.smtp.headers import Insertion, Removal, subject_of
from poolmgr.testing import ENVELOPE_SYMBOL, Recorder, Rspamd, free_port
from poolmgr.testing.rspamd import DKIM_DOMAIN

# The GTUBE test string (https://spamassassin.apache.org/gtube/), which rspamd knows itself.
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def data(body: str, subject: str = "test") -> bytes:
    return (f"From: <a@x.example>\r\nTo: <b@y.example>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@x.example>\r\n\r\n{body}\r\n").encode()


def message(body: str = "Just a note.", **envelope) -> Message:
    fields = dict(queue_id="Q", sender="a@x", rcpts=("b@y",), client_addr="192.0.2.1",
                  client_name="", helo="h")
    return Message(data=data(body), **(fields | envelope))


def backend(url: str, timeout: str = "30s", use_action: bool = True) -> Backend:
    cfg = config.from_dict({"scanner": {"checks": ["rspamd"], "rspamd": {
        "url": url, "timeout": timeout, "use_action": use_action}}})
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
    # our rule, which hits every message, and the dkim module's "no signature" (score 0)
    assert result.tests == (ENVELOPE_SYMBOL, "R_DKIM_NA")
    assert result.decision == "clean"


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
    assert f"tests=[{ENVELOPE_SYMBOL}]" in head  # rspamd's dkim module skips local clients
    assert "X-Virus-Scanned" not in head  # no virus check ran


# rspamd's actions, forced by the private rspamd's POOLMGR_FORCE rule on the Subject.

def forced(subject: str, extra: str = "", body: str = "Hello.") -> bytes:
    return (f"Received: from upstream by mx.example; Mon, 7 Dec 2026 10:00:00 +0000\r\n"
            f"From: <a@{DKIM_DOMAIN}>\r\nTo: <b@y.example>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@x.example>\r\n{extra}\r\n"
            f"{body}\r\n").encode()


@pytest.mark.parametrize("subject, body, action, decision, text", [
    ("force greylist", "Hello.", "greylist", "defer", ""),
    ("force soft reject: Ratelimit exceeded", "Hello.", "soft reject", "defer",
     "Ratelimit exceeded"),
    ("force add header", "Hello.", "add header", "tag", ""),
    ("force rewrite subject", "Hello.", "rewrite subject", "tag", ""),
    ("gtube", f"Please ignore.\r\n{GTUBE}", "reject", "kill", "Gtube pattern"),
    ("plain", "Hello.", "no action", "clean", ""),
])
def test_rspamd_actions_become_decisions(rspamd, subject, body, action, decision, text):
    msg = Message(forced(subject, body=body), "Q", "a@x", ("b@y",), "192.0.2.1", "", "h")
    result = backend(rspamd.url).check(msg)
    assert (result.action, result.decision) == (action, decision)
    assert result.reply_text == text  # rspamd's messages.smtp_message
    assert result.subject == ("[SPAM] force rewrite subject" if action == "rewrite subject"
                              else "")
    # use_action = false: the levels decide, rspamd's score meets them as spamd's does
    assert backend(rspamd.url, use_action=False).check(msg).decision == ""


def test_milter_headers_and_dkim_signature_become_edits(rspamd):
    msg = Message(forced("plain"), "4XyZ1", "a@x", ("b@y",), "192.0.2.1", "", "h")
    found = backend(rspamd.url).check(msg).edits
    removed = {e.name: e.index for e in found if isinstance(e, Removal)}
    added = [e for e in found if isinstance(e, Insertion)]
    assert removed["X-Drop-Me"] == 0  # every one
    assert removed["X-Spamd-Result"] == removed["X-Rspamd-Queue-Id"] == 0
    # removals first, then the additions, then the signature at the top, as rspamd's milter
    assert found.index(added[0]) == len(removed)
    positions = {e.name: e.index for e in added}
    assert positions == {"X-Poolmgr-Top": 0, "X-Spamd-Result": -1, "X-Rspamd-Queue-Id": -1,
                         "DKIM-Signature": 0}
    assert added[-1].name == "DKIM-Signature"
    assert next(e for e in added if e.name == "X-Rspamd-Queue-Id").value == "4XyZ1"
    spamd_result = next(e for e in added if e.name == "X-Spamd-Result").value
    assert spamd_result.startswith("default: False [0.50 / 15.00];\r\n\t")  # folded


def test_edits_of_any_shape_rspamd_documents():
    answer = {"milter": {
        "add_headers": {"X-A": "plain", "X-B": {"value": "at 2", "order": 2},
                        "X-C": [{"value": "one"}, {"value": "two", "order": -1}, 7],
                        "X-D": {"order": 1}},
        "remove_headers": {"X-E": 1, "X-F": -1, "X-G": "all", "X-H": True}},
        "dkim-signature": ["v=1; first", "v=1; second"]}
    assert edits(answer) == (
        Removal("X-E", 1), Removal("X-F", -1), Insertion("X-A", "plain"),
        Insertion("X-B", "at 2", 2), Insertion("X-C", "one"), Insertion("X-C", "two", -1),
        Insertion("DKIM-Signature", "v=1; first", 0),
        Insertion("DKIM-Signature", "v=1; second", 1))
    assert edits({"milter": "x", "dkim-signature": 3}) == ()


def test_answers_no_message_can_carry_fail_or_are_left_out():
    """JSON carries what no score or header can: numbers past a float, NaN, lone surrogates.
    A score that is not a number fails the check (on_failure decides); a text that cannot go
    into a header is left out. Neither may escape as an exception (451 for ever)."""
    base = {"score": 1.0, "required_score": 15.0, "action": "rewrite subject", "symbols": {}}
    for bad in ({"score": 10 ** 400}, {"score": float("nan")}, {"required_score": 1e400}):
        with pytest.raises(CheckFailed, match="answer lacks score"):
            result({**base, **bad})
    odd = result({**base, "subject": "\ud800 spam", "milter": {
        "add_headers": {"X-Ok": "fine", "X-Bad": "\udfff", "\ud800": "v"},
        "remove_headers": {"\ud800": 1}}, "dkim-signature": ["v=1; \ud800", "v=1; ok"]})
    assert odd.subject == "" and odd.decision == "tag"
    assert odd.edits == (Insertion("X-Ok", "fine"), Insertion("DKIM-Signature", "v=1; ok", 0))


def fields(data: bytes) -> list[tuple[str, str]]:
    """The header fields of `data` in order, as (name, value unfolded)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    return [(name, " ".join(value.split())) for name, value in
            (f.split(":", 1) for f in re.split(r"\r\n(?![ \t])", head))]


def relaxed_header(field: str) -> str:
    """RFC 6376 section 3.4.2."""
    name, value = field.split(":", 1)
    value = re.sub(r"[ \t]+", " ", re.sub(r"\r\n(?=[ \t])", "", value)).strip()
    return f"{name.strip().lower()}:{value}"


def dkim_verifies(data: bytes, public_key, tmp_path) -> bool:
    """Verify the first DKIM-Signature of `data` (rsa-sha256, relaxed/relaxed, as rspamd
    signs) with `public_key`: the body hash here, the signature by openssl."""
    head, body = data.split(b"\r\n\r\n", 1)
    raw = re.split(r"\r\n(?![ \t])", head.decode())
    signature = next(f for f in raw if f.lower().startswith("dkim-signature:"))
    tags = dict(t.strip().split("=", 1) for t in
                re.sub(r"\s+", "", signature.split(":", 1)[1]).split(";") if t)
    assert (tags["a"], tags["c"]) == ("rsa-sha256", "relaxed/relaxed")
    lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in body.split(b"\r\n")]
    while lines and not lines[-1]:
        lines.pop()
    canonical_body = b"".join(line + b"\r\n" for line in lines)
    if base64.b64encode(hashlib.sha256(canonical_body).digest()).decode() != tags["bh"]:
        return False
    unused = list(raw)
    signed = []
    for name in tags["h"].split(":"):  # the last unused field of each name, upwards
        match = next((f for f in reversed(unused) if f.split(":", 1)[0].strip().lower()
                      == name.lower()), None)
        if match is not None:
            unused.remove(match)
            signed.append(relaxed_header(match) + "\r\n")
    unsigned = re.sub(r"(\bb=)[^;]*", r"\1", signature)
    (tmp_path / "signed").write_bytes(("".join(signed) + relaxed_header(unsigned)).encode())
    (tmp_path / "signature").write_bytes(base64.b64decode(tags["b"]))
    checked = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(public_key),
                              "-signature", str(tmp_path / "signature"),
                              str(tmp_path / "signed")], capture_output=True)
    return checked.returncode == 0


def test_through_poolmgr_rspamd_actions_headers_and_signature(make_poolmgr, rspamd, tmp_path):
    """use_action: greylist and soft reject are 451 4.7.1 (not delivered: the client retries),
    add header and rewrite subject reach the next hop flagged, with rspamd's milter headers at
    their places and its DKIM signature, which verifies there unless the Subject changed."""
    hop = Recorder().start()
    try:
        pm = make_poolmgr(start=False)
        pm.configure("scanner", checks=["rspamd"], rspamd={"url": rspamd.url},
                     next_hop=f"smtp:127.0.0.1:{hop.port}")
        pm.start()
        with pm.smtp() as client:
            client.ehlo()
            replies = {}
            for subject in ("force greylist", "force soft reject: Ratelimit exceeded",
                            "force add header", "force rewrite subject", "plain"):
                client.mail(f"a@{DKIM_DOMAIN}")
                client.rcpt("b@y.example")
                replies[subject] = client.data(forced(
                    subject, extra="X-Drop-Me: forged\r\nX-Spam-Flag: NO\r\n"))
        # As Postfix's content_filter hands a message over: the client in XFORWARD.
        with smtplib.SMTP("127.0.0.1", pm.scanner_port, local_hostname="postfix.test",
                          timeout=30) as postfix:
            postfix.ehlo()
            assert postfix.docmd("XFORWARD", "NAME=mail.example.org ADDR=192.0.2.7 "
                                 "HELO=helo.example.org")[0] == 250
            assert postfix.sendmail(f"a@{DKIM_DOMAIN}", ["b@y.example"],
                                    forced("forwarded")) == {}
    finally:
        hop.stop()
    assert replies["force greylist"] == (451, b"4.7.1 Try again later")
    assert replies["force soft reject: Ratelimit exceeded"] == (451, b"4.7.1 Ratelimit exceeded")
    assert str(R.R451_DEFERRED_BY_CHECK.format(text="Try again later")) == \
        "451 4.7.1 Try again later"
    assert [code for code, _ in replies.values()] == [451, 451, 250, 250, 250]
    log = pm.log()
    assert "Blocked DEFERRED (greylist) {Deferred}" in log
    assert "Blocked DEFERRED (soft reject) {Deferred}" in log
    delivered = {dict(fields(c.data))["Message-ID"]: c.data for c in hop.accepted}
    assert len(delivered) == 4  # the deferred two were not delivered
    envelope = dict(fields(delivered["<forwarded@x.example>"]))["X-Spamd-Result"]
    assert "[ip=192.0.2.7,from=a@dkim.example,rcpt=b@y.example,helo=helo.example.org," \
           "qid=" in envelope and ",hostname=mail.example.org]" in envelope
    tagged, rewritten, plain = (delivered[f"<{s.replace(' ', '.')}@x.example>"]
                                for s in ("force add header", "force rewrite subject", "plain"))
    for data, flag in ((tagged, "YES"), (rewritten, "YES"), (plain, None)):
        names = [name for name, _ in fields(data)]
        head = dict(fields(data))
        assert head.get("X-Spam-Flag") == flag  # poolmgr's own; the client's copy is gone
        assert names.count("X-Spam-Flag") == (1 if flag else 0)
        assert "X-Drop-Me" not in names  # milter.remove_headers
        # Our trace and verdict headers, then rspamd's DKIM-Signature and its header at the
        # top (order 0), the message's own fields, and rspamd's others at the end (order -1).
        ours = names.index("X-Poolmgr-Scan")
        assert names[ours + 1:ours + 4] == ["DKIM-Signature", "X-Poolmgr-Top", "Received"]
        assert set(names[-2:]) == {"X-Spamd-Result", "X-Rspamd-Queue-Id"}
        # The signature covers the Subject as rspamd saw it: rspamd's own rewrite breaks it
        # (as it does behind rspamd's milter); the message left as signed verifies.
        assert dkim_verifies(data, rspamd.dkim_public_key, tmp_path) == (data is not rewritten)
    assert dict(fields(tagged))["Subject"] == "force add header"  # add header leaves it
    assert dict(fields(rewritten))["Subject"] == "[SPAM] force rewrite subject"
    assert dict(fields(plain))["Subject"] == "plain"
    assert dict(fields(tagged))["X-Spamd-Result"].startswith("default: False [7.00 / 15.00];")


def test_a_rewritten_subject_that_is_not_ascii_reaches_the_next_hop_encoded(make_poolmgr,
                                                                           rspamd):
    """rspamd decodes the Subject to match its rules and returns the rewritten one as RFC 2047
    encoded words: it reaches the next hop so, the header all ASCII, saying what rspamd
    wrote."""
    pm = make_poolmgr(start=False)
    pm.configure("scanner", checks=["rspamd"], rspamd={"url": rspamd.url})
    pm.start()
    encoded = "=?utf-8?q?force_rewrite_subject_=28Gr=C3=BC=C3=9Fe=29?="
    with pm.smtp() as client:
        assert client.sendmail(f"a@{DKIM_DOMAIN}", ["b@y.example"], forced(encoded)) == {}
    (delivered,) = pm.delivered()
    head = delivered.split(b"\r\n\r\n")[0]
    assert head.isascii()
    assert subject_of(delivered) == "[SPAM] force rewrite subject (Gr\u00fc\u00dfe)"
    assert dict(fields(delivered))["X-Spam-Flag"] == "YES"


def test_poolmgr_scan_answers_each_action(rspamd, tmp_path):
    """`poolmgr scan` with rspamd's action deciding: greylist is 75 (the message would be
    tried again later), add header 1 (spam), no action 0."""
    config = tmp_path / "scan.toml"
    config.write_text(f'[scanner]\nhostname = "mx.test"\nchecks = ["rspamd"]\n\n'
                      f'[scanner.rspamd]\nurl = "{rspamd.url}"\n')
    codes = {}
    for subject in ("force greylist", "force add header", "plain"):
        done = subprocess.run([sys.executable, "-m", "poolmgr", "scan", "-", "-c", str(config)],
                              input=forced(subject), capture_output=True, timeout=60)
        codes[subject] = done.returncode, done.stdout.decode()
    assert codes["force greylist"][0] == 75 and "deferred" in codes["force greylist"][1]
    assert codes["force add header"][0] == 1 and codes["plain"][0] == 0
