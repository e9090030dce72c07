"""scanner/banned.py: banned contents (amavisd's $banned_filename_re) by file name, declared
type, file type and zip member; and through a real poolmgr: answered as a virus is (reject
with amavisd's reply, or discard into the quarantine), logged as amavisd logs it."""

import io
import json
import logging
import re
import zipfile

import pytest

from helpers import message
from poolmgr import config
from poolmgr.scanner import banned, scan
from poolmgr.scanner.backends import builtin
from poolmgr.scanner.backends.base import (MIME_NESTING_LIMIT, TOO_DEEP, Result, TooDeep,
                                           leaf_parts)
from poolmgr.scanner.verdict import Failure
from test_clamd import mime, zipped

# amavisd's Debian default (20-debian_defaults), as the settings' help gives it.
AMAVISD = [r"\.[^./]*\.(exe|vbs|pif|scr|bat|cmd|com|cpl)\.?$",
           r"\{[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}\}?$",
           "^application/x-msdownload$", "^application/x-msdos-program$", "^application/hta$",
           r".\.(exe|vbs|pif|scr|bat|cmd|com|cpl)$",
           r"^\.exe-ms$"]
PROGRAM = b"MZ\x90\x00" + b"\x00" * 60 + b"This program cannot be run in DOS mode.\r\n"


def patterns(texts=AMAVISD):
    return config.from_dict({"scanner": {"banned_filenames": texts}}).scanner.banned_filenames


def find(data: bytes, texts=AMAVISD):
    return banned.find(data, patterns(texts))


@pytest.mark.parametrize("name, ctype, content, part", [
    ("invoice.pdf.exe", "application/pdf", b"%PDF-1.4 not really",
     "application/pdf,.pdf,invoice.pdf.exe"),                       # a double extension
    ("Screensaver.SCR", "application/octet-stream", b"data",
     "application/octet-stream,Screensaver.SCR"),                   # case does not matter
    ("setup.bin", "application/x-msdownload", b"data",
     "application/x-msdownload,setup.bin"),                         # the declared type
    ("report.txt", "text/plain", PROGRAM,
     "text/plain,.exe,.exe-ms,report.txt"),                         # a program by its content
])
def test_banned_parts(name, ctype, content, part):
    found = find(mime(content, name, ctype))
    assert found == banned.Banned(part, f"multipart/mixed | {part}")


@pytest.mark.parametrize("name, ctype, content", [
    ("report.pdf", "application/pdf", b"%PDF-1.4"),
    ("photo.jpg", "image/jpeg", b"\xff\xd8\xff"),
    ("notes.exe.txt", "text/plain", b"plain text"),  # the extension that counts is the last
])
def test_allowed_parts(name, ctype, content):
    assert find(mime(content, name, ctype)) is None


def test_inside_a_zip_as_amavisd_logs_the_path():
    data = mime(zipped("docs/PAGEANT.EXE", PROGRAM), "putty.zip", "application/zip")
    found = find(data)
    assert found.part == ".exe,.exe-ms,PAGEANT.EXE"
    assert found.path == ("multipart/mixed | application/zip,.zip,putty.zip | "
                          ".exe,.exe-ms,PAGEANT.EXE")
    assert find(mime(zipped("readme.txt", b"hello"), "docs.zip", "application/zip")) is None


def test_encoded_names_are_decoded_and_control_characters_shown_as_marks():
    data = mime(b"x", "=?utf-8?q?Rechnung_M=C3=A4rz.pdf.exe?=")
    assert find(data).part == "application/octet-stream,Rechnung März.pdf.exe"
    folded = mime(b"x", "a\r\n\tb.exe")  # a line break in a name must not break a log line
    assert find(folded).part == "application/octet-stream,a???b.exe"


def test_a_broken_encoded_name_is_matched_as_written():
    broken = mime(b"x", "=?utf-8?b?QUJDR?=")  # base64 that does not decode
    assert find(broken) is None
    assert find(broken, [r"^=\?utf-8\?b\?QUJDR\?=$"]).part == \
        "application/octet-stream,=?utf-8?b?QUJDR?="


def damaged_member(name: str) -> bytes:
    """A zip whose member's deflate stream is broken: zipfile's read raises zlib.error."""
    data = zipped(name, b"hello world " * 100)
    start = 30 + len(name)  # the local header, then the compressed bytes
    return data[:start] + b"\xff" * 8 + data[start + 8:]


def unknown_version(name: str) -> bytes:
    """A zip whose central directory asks for version 9.9 to extract: zipfile refuses the
    whole archive (NotImplementedError)."""
    data = bytearray(zipped(name, b"hello"))
    data[data.find(b"PK\x01\x02") + 6] = 99
    return bytes(data)


def test_a_damaged_archive_is_judged_by_its_name_and_a_damaged_member_by_its_own():
    assert find(mime(damaged_member("evil.exe"), "files.zip")).part == "evil.exe"
    assert find(mime(damaged_member("notes.txt"), "files.zip")) is None
    assert find(mime(unknown_version("evil.exe"), "files.zip")) is None  # unreadable
    assert find(mime(unknown_version("a.txt"), "files.zip.exe")).part == \
        "application/octet-stream,.zip,files.zip.exe"


def test_every_member_name_counts_and_only_the_first_members_are_read():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for number in range(banned.MAX_MEMBERS):
            archive.writestr(f"padding/{number}.txt", b"")
        archive.writestr("evil.exe", PROGRAM)  # past the cap: its name, not its bytes
    found = find(mime(out.getvalue(), "files.zip", "application/zip"))
    assert found.part == "evil.exe"


def test_a_banned_check_that_breaks_is_a_check_failure_not_a_crash(monkeypatch):
    """Whatever else banned.find may raise is the banned check's failure: 451 (tempfail),
    logged on one line, as a virus check's failure is."""
    def broken(data, patterns):
        raise RuntimeError("unforeseen\r\nforged line")
    monkeypatch.setattr(banned, "find", broken)
    cfg = config.from_dict({"scanner": {"banned_filenames": AMAVISD}})
    lines = Lines()
    log = logging.Logger("banned-test")  # on its own: not through the root's handlers
    log.addHandler(lines)
    found = scan.examine_one(cfg, mime(b"x", "a.txt"), log=log)
    assert (found.verdict.kind, found.verdict.action) == ("failed", "tempfail")
    assert found.verdict.reply.code == 451
    assert found.failures == [Failure("banned", "RuntimeError: unforeseen??forged line",
                                      "tempfail")]
    (line,) = lines.lines
    assert re.fullmatch(r"\w+: banned check failed: RuntimeError: unforeseen\?\?forged line "
                        r"\(try again later\)", line), line


class Lines(logging.Handler):
    """The messages logged, each as one string."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_no_patterns_and_no_attachments():
    assert find(mime(PROGRAM, "a.exe"), []) is None
    assert find(message("plain", "hello\r\n")) is None


def test_a_bad_pattern_is_a_configuration_error():
    with pytest.raises(config.ConfigError) as error:
        patterns(["(unclosed"])
    assert "[scanner] banned_filenames: bad pattern '(unclosed'" in error.value.errors[0]


def banned_mail() -> bytes:
    return mime(b"%PDF-1.4 not really", "invoice.pdf.exe", "application/pdf")


def test_banned_is_rejected_like_a_virus_with_amavisd_reply_and_log(make_poolmgr):
    pm = make_poolmgr({"scanner": {"banned_filenames": AMAVISD}}, start=False)
    pm.configure("scanner", quarantine=str(pm.dir / "quarantine")).start()
    with pm.smtp() as client:
        client.ehlo()
        client.mail("alice@example.org")
        client.rcpt("bob@example.test")
        code, text = client.data(banned_mail())
        assert client.sendmail("alice@example.org", ["bob@example.test"],
                               mime(b"%PDF-1.4", "invoice.pdf", "application/pdf")) == {}
    assert code == 554
    assert re.fullmatch(rb"5\.7\.0 Reject, id=\w+ - BANNED: application/pdf,\.pdf,"
                        rb"invoice\.pdf\.exe", text), text
    (delivered,) = pm.delivered()
    assert b'filename="invoice.pdf"' in delivered
    assert re.search(r": Blocked BANNED \(multipart/mixed \| application/pdf,\.pdf,"
                     r"invoice\.pdf\.exe\) \{Rejected,Quarantined\}, \[127\.0\.0\.1\] "
                     r"<alice@example\.org> -> <bob@example\.test>, quarantine: banned-",
                     pm.log())
    (entry,) = json.loads(pm.run_cli("quarantine", "list", "--json", check=True).stdout)
    assert entry["verdict"] == "banned" and entry["reason"].startswith("BANNED (multipart")
    assert pm.status()["scanner"]["verdicts"]["banned"] == 1


def test_damaged_zips_through_poolmgr_are_judged_not_deferred(make_poolmgr):
    """A damaged member banned by its name is rejected; an archive zipfile cannot read at
    all passes by its outer name: neither is a 451 and a traceback."""
    pm = make_poolmgr({"scanner": {"banned_filenames": AMAVISD}})
    with pm.smtp() as client:
        client.ehlo()
        client.mail("alice@example.org")
        client.rcpt("bob@example.test")
        code, text = client.data(mime(damaged_member("evil.exe"), "files.zip"))
        assert client.sendmail("alice@example.org", ["bob@example.test"],
                               mime(unknown_version("evil.exe"), "files.zip")) == {}
    assert code == 554 and text.endswith(b"BANNED: evil.exe"), text
    assert len(pm.delivered()) == 1


def test_banned_follows_virus_action_discard(make_poolmgr):
    """After Postfix's queue (virus_action = discard) banned mail is kept, not bounced."""
    pm = make_poolmgr({"scanner": {"banned_filenames": AMAVISD, "virus_action": "discard"}},
                      start=False)
    pm.configure("scanner", quarantine=str(pm.dir / "quarantine")).start()
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], banned_mail()) == {}
    assert pm.delivered() == []
    assert "Blocked BANNED (multipart/mixed | application/pdf,.pdf,invoice.pdf.exe) " \
           "{Discarded,Quarantined}" in pm.log()


def test_poolmgr_scan_exits_2_for_banned(make_poolmgr, tmp_path):
    pm = make_poolmgr({"scanner": {"banned_filenames": AMAVISD}}, start=False)
    (tmp_path / "mail.eml").write_bytes(banned_mail())
    result = pm.run_cli("scan", str(tmp_path / "mail.eml"))
    assert result.returncode == 2, result.stderr
    assert "Verdict: banned (BANNED (multipart/mixed | application/pdf,.pdf," \
           "invoice.pdf.exe))" in result.stdout
    assert "Check banned: banned=multipart/mixed | application/pdf" in result.stdout


def nested(depth: int) -> bytes:
    """A message whose multiparts nest `depth` deep around one base64 text part."""
    opening = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
                       for i in range(depth))
    closing = b"".join(b"\r\n--b%d--" % i for i in reversed(range(depth)))
    return (b"From: a@x\r\nTo: b@y\r\nSubject: deep\r\nMIME-Version: 1.0\r\n" + opening +
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8="
            + closing + b"\r\n")


def test_multiparts_nested_past_the_safety_limit_are_banned_not_a_crash():
    """Postfix's mime_nesting_limit (100): deeper is banned contents for both checks that take
    the message apart, also where the standard library's parser would recurse too deep."""
    limit = MIME_NESTING_LIMIT
    message, parts = leaf_parts(nested(limit))
    assert [part.get_payload(decode=True) for part in parts] == [b"hello"]
    for depth in (limit + 1, 1000):
        with pytest.raises(TooDeep):
            leaf_parts(nested(depth))
        assert find(nested(depth)) == banned.Banned(TOO_DEEP, TOO_DEEP)
        assert builtin.scan(nested(depth), [], True) == Result("builtin", banned=TOO_DEEP)
    assert find(nested(limit)) is None
    assert builtin.scan(nested(limit), [], True) == Result("builtin")


def test_a_message_nested_too_deep_gets_554_and_the_worker_serves_on(make_poolmgr, tmp_path):
    """Through the pool with the default checks (builtin): 554 naming the reason, amavisd's
    Blocked line, the next message delivered; `poolmgr scan` exits 2 without a traceback."""
    pm = make_poolmgr()
    with pm.smtp() as client:
        client.ehlo()
        client.mail("alice@example.org")
        client.rcpt("bob@example.test")
        code, text = client.data(nested(1000))
        assert client.sendmail("alice@example.org", ["bob@example.test"], nested(3)) == {}
    assert code == 554
    assert re.fullmatch(rb"5\.7\.0 Reject, id=\w+ - BANNED: MIME nesting exceeds safety limit",
                        text), text
    assert len(pm.delivered()) == 1
    assert "Blocked BANNED (MIME nesting exceeds safety limit) {Rejected," in pm.log()
    (tmp_path / "deep.eml").write_bytes(nested(1000))
    result = pm.run_cli("scan", str(tmp_path / "deep.eml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "Verdict: banned (BANNED (MIME nesting exceeds safety limit))" in result.stdout
