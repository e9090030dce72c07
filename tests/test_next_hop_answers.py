"""A next hop that answers 4xx -- at RCPT, at the end of DATA (over LMTP per recipient), alone
or beside recipients it accepted -- through the whole path (client, SMTP pool, scanner pool,
next hop over SMTP or LMTP) and to the scanner pool as a content filter: the client gets a 4xx
for the message, a copy the next hop accepted has arrived, and the client's retry gives every
recipient its copy (a duplicate is allowed, a loss is not). And the body arrives byte for byte
as it was sent."""

import re
import smtplib

import pytest

from helpers import HELO, Raw, message, wait_until
from poolmgr.testing import Recorder

ANN, BOB, CAROL = "ann@example.test", "bob@example.test", "carol@example.test"
BUSY = "450 4.2.0 <{}>: Recipient address rejected: mailbox busy"
UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown"
DATA_4XX = "451 4.3.0 Error: queue file write error"
# Header fields poolmgr adds on the way: its two Received: and the scanner's X- fields.
ADDED_FIELD = re.compile(rb"(?:Received|X-[A-Za-z-]+):[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


@pytest.fixture
def recorder():
    recorders = []

    def make() -> Recorder:
        recorders.append(Recorder().start())
        return recorders[-1]
    yield make
    for r in recorders:
        r.stop()


def through(make_poolmgr, hop: Recorder, kind: str = "smtp"):
    return make_poolmgr({"scanner": {"next_hop": f"{kind}:127.0.0.1:{hop.port}"}})


def as_sent(copy_data: bytes, sent: bytes) -> bool:
    """The copy is the sent message byte for byte below the fields poolmgr added on top."""
    if not copy_data.endswith(sent):
        return False
    added = copy_data[:len(copy_data) - len(sent)]
    return ADDED_FIELD.sub(b"", added) == b""


# Each case: the recipients, the next hop's RCPT replies, its end-of-DATA reply (over LMTP
# also per recipient), whom it accepted anyway, and how the SMTP pool hands off and the
# scanner re-injects (SMTP unless said).
CASES = {
    "rcpt-4xx-alone": dict(rcpts=[BOB], rcpt_replies={BOB: BUSY}),
    "rcpt-4xx-beside-250": dict(rcpts=[ANN, BOB], rcpt_replies={BOB: BUSY}, accepted=[ANN]),
    "rcpt-4xx-beside-250-and-5xx": dict(rcpts=[ANN, BOB, CAROL], accepted=[ANN],
                                        rcpt_replies={BOB: UNKNOWN, CAROL: BUSY}),
    "data-4xx": dict(rcpts=[ANN, BOB], data_reply=DATA_4XX),
    "data-4xx-beside-rcpt-5xx": dict(rcpts=[ANN, BOB], rcpt_replies={BOB: UNKNOWN},
                                     data_reply=DATA_4XX),
    "lmtp-data-4xx-beside-250": dict(rcpts=[ANN, BOB], data_replies={BOB: BUSY},
                                     accepted=[ANN], next_hop="lmtp"),
    "lmtp-data-4xx-beside-250-and-5xx": dict(rcpts=[ANN, BOB, CAROL], accepted=[ANN],
                                             data_replies={BOB: UNKNOWN, CAROL: BUSY},
                                             next_hop="lmtp"),
    # The scanner pool as the SMTP pool's LMTP proxy filter: per-recipient replies come back.
    "lmtp-hand-off-rcpt-4xx-beside-250": dict(rcpts=[ANN, BOB], rcpt_replies={BOB: BUSY},
                                              accepted=[ANN], handoff="lmtp"),
    "lmtp-hand-off-data-4xx-beside-250-and-5xx": dict(
        rcpts=[ANN, BOB, CAROL], data_replies={BOB: UNKNOWN, CAROL: BUSY}, accepted=[ANN],
        next_hop="lmtp", handoff="lmtp"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_4xx_from_the_next_hop_is_a_4xx_to_the_client_and_its_retry_delivers(
        make_poolmgr, recorder, case):
    spec = CASES[case]
    rcpts, accepted_anyway = spec["rcpts"], spec.get("accepted", [])
    hop = recorder()
    hop.rcpt_replies = {r: reply.format(r) for r, reply in spec.get("rcpt_replies", {}).items()}
    hop.data_reply = spec.get("data_reply", "")
    hop.data_replies = {r: reply.format(r) for r, reply in spec.get("data_replies", {}).items()}
    pm = make_poolmgr({"scanner": {"next_hop": f"{spec.get('next_hop', 'smtp')}:127.0.0.1:"
                                                f"{hop.port}"}}, start=False)
    if spec.get("handoff") == "lmtp":
        pm.configure("smtp", proxy_filter=f"lmtp:127.0.0.1:{pm.scanner_port}")
    pm.start()
    sent = message(case, body=f"for {case}\r\n")
    with pm.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("alice@example.org", rcpts, sent)
    assert 400 <= info.value.smtp_code < 500, info.value
    # What the next hop accepted before the 4xx has arrived, and nothing else.
    for rcpt in rcpts:
        assert len(hop.copies(rcpt)) == (rcpt in accepted_anyway), (rcpt, hop.accepted)
    assert all(as_sent(c.data, sent) for c in hop.accepted)
    hop.rcpt_replies, hop.data_reply, hop.data_replies = {}, "", {}  # well again: a retry
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", rcpts, sent) == {}
    for rcpt in rcpts:
        copies = hop.copies(rcpt)
        assert len(copies) == 1 + (rcpt in accepted_anyway), (rcpt, hop.accepted)
        assert all(as_sent(c.data, sent) for c in copies)
    assert "proxy-reject: END-OF-MESSAGE: 4" in pm.log()


def test_the_scanner_pool_as_content_filter_answers_smtp_a_4xx_and_lmtp_per_recipient(
        make_poolmgr, recorder):
    """Postfix as the client of the scanner pool (content_filter): over SMTP the message gets
    the 4xx while the accepted copy has gone on; over LMTP each recipient gets its own reply."""
    hop = recorder()
    hop.rcpt_replies = {BOB: BUSY.format(BOB)}
    pm = through(make_poolmgr, hop)
    sent = message("content filter smtp")
    with smtplib.SMTP("127.0.0.1", pm.scanner_port, local_hostname=HELO, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("alice@example.org", [ANN, BOB], sent)
    assert (info.value.smtp_code, info.value.smtp_error.decode()) == \
        (450, BUSY.format(BOB)[4:])
    assert len(hop.copies(ANN)) == 1 and hop.copies(BOB) == []

    lmtp = Raw(pm.scanner_port)
    assert lmtp.reply()[0] == 220
    lmtp.send(b"LHLO postfix.test\r\nMAIL FROM:<alice@example.org>\r\n"
              b"RCPT TO:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (ANN.encode(), BOB.encode()))
    assert [lmtp.reply()[0] for _ in range(5)] == [250, 250, 250, 250, 354]
    lmtp.send(message("content filter lmtp") + b".\r\n")
    assert lmtp.reply()[0] == 250  # ann
    assert lmtp.reply() == (450, [BUSY.format(BOB)])  # bob: the next hop's own words
    hop.rcpt_replies, hop.data_reply = {}, DATA_4XX
    lmtp.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<%s>\r\nDATA\r\n" % ANN.encode())
    assert [lmtp.reply()[0] for _ in range(3)] == [250, 250, 354]
    lmtp.send(message("content filter lmtp data") + b".\r\n")
    assert lmtp.reply() == (451, [DATA_4XX])
    lmtp.send(b"QUIT\r\n")
    assert lmtp.reply()[0] == 221
    assert len(hop.copies(ANN)) == 2 and hop.copies(BOB) == []


# A body that trips dot-stuffing, line handling and 8-bit transport: lines that are or start
# with dots (also right after a blank line, where "\r\n.\r\n" would end the message), lines of
# exactly 998 octets (RFC 5322's limit: poolmgr folds only longer ones), 8-bit bytes that are
# not UTF-8, spaces and tabs at line ends, and enough of it to cross every read buffer.
TRICKY = (b".\r\n..\r\n...\r\n.hidden\r\n\r\n.\r\n \r\n. \r\n\t.\r\n"
          b"caf\xc3\xa9 na\xefve \xff\xfe\x80 trailing  \t\r\n"
          + b"." + b"x" * 997 + b"\r\n" + b"y" * 998 + b"\r\n"
          + b"".join(b"%s line %d%s\r\n" % (b"." * (i % 3), i, b" " * (i % 4))
                     for i in range(6000))
          + b"\r\n\r\n.\r\nlast line\r\n")


def test_the_body_arrives_byte_for_byte(make_poolmgr, recorder):
    hop = recorder()
    pm = through(make_poolmgr, hop)
    head = (b"From: <alice@example.org>\r\nTo: <bob@example.test>\r\nSubject: bytes\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=latin1\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n")
    sent = head + b"\r\n" + TRICKY
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", [BOB], sent,
                               mail_options=["BODY=8BITMIME"]) == {}
    (copy,) = hop.copies(BOB)
    assert copy.data.split(b"\r\n\r\n", 1)[1] == TRICKY
    assert as_sent(copy.data, sent)
    assert "BODY=8BITMIME" in copy.mail_params


def test_the_body_arrives_as_sent_at_postfix_smtp_sink(make_poolmgr, make_sink):
    """The same through Postfix's smtp-sink, whose -d dump has LF line ends, its own
    X-*-Args/Received: fields on top and one more LF at the end."""
    sink = make_sink()
    pm = make_poolmgr({"scanner": {"next_hop": f"smtp:127.0.0.1:{sink.port}"}})
    sent = (b"From: <alice@example.org>\r\nTo: <bob@example.test>\r\nSubject: sink bytes\r\n"
            b"\r\n" + TRICKY)
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", [BOB], sent,
                               mail_options=["BODY=8BITMIME"]) == {}
    wait_until(lambda: any(m.endswith(b"last line\n\n") for m in sink.messages()),
               what="the whole message at smtp-sink")
    (dump,) = sink.messages()
    assert dump.split(b"\n\n", 1)[1] == TRICKY.replace(b"\r\n", b"\n") + b"\n"
    assert b"\nX-Mail-Args: <alice@example.org> BODY=8BITMIME\n" in dump  # no SIZE offered
