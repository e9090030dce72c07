"""poolmgr beside a real Postfix (Debian's package, a private instance on loopback).

Behind Postfix: Postfix's smtpd takes the mail and hands it to the scanner pool as its
content_filter; the scanner re-injects into Postfix's 10025-style listener, and Postfix
delivers it. In front of Postfix: poolmgr's SMTP pool takes the mail and the scanner's next hop
is that same 10025 listener.
"""

import email
import email.policy
import json
import re
import smtplib
import time

import pytest

from helpers import HELO, free_port, message, wait_until
from postfix import REFUSED, Postfix


@pytest.fixture(scope="module")
def shared_postfix():
    """One Postfix for the module (its start is 3 s); each test resets it."""
    postfix = Postfix(free_port()).start()
    yield postfix
    postfix.stop()


def started(make_poolmgr, postfix: Postfix, listener: str, hand_off: str = "smtp"):
    """A fresh poolmgr whose scanner pool listens where the shared Postfix hands off."""
    postfix.reset()
    pm = make_poolmgr(start=False)
    pm.scanner_port = postfix.scanner_port
    pm.configure("scanner", listen=f"127.0.0.1:{pm.scanner_port}",
                 next_hop=f"smtp:127.0.0.1:{getattr(postfix, listener)}")
    if hand_off != "smtp":
        pm.configure("smtp", proxy_filter=f"{hand_off}:127.0.0.1:{pm.scanner_port}")
    pm.start()
    return postfix, pm


@pytest.fixture
def postfix_and_poolmgr(make_poolmgr, shared_postfix):
    """The scanner pool behind Postfix (content_filter), re-injecting into 10025."""
    return started(make_poolmgr, shared_postfix, "reinject_port")


@pytest.fixture
def poolmgr_in_front(make_poolmgr, shared_postfix):
    """poolmgr on the public port, its scanner re-injecting into the in-front 10025."""
    return started(make_poolmgr, shared_postfix, "front_port")


@pytest.mark.parametrize("feed", ["inbound_port", "lmtp_inbound_port"])
def test_scanner_pool_as_postfix_content_filter(postfix_and_poolmgr, feed):
    """Both README recipes: content_filter over SMTP and over LMTP (the preferred one)."""
    postfix, pm = postfix_and_poolmgr
    with smtplib.SMTP("127.0.0.1", getattr(postfix, feed), local_hostname=HELO,
                      source_address=("127.0.0.7", 0), timeout=30) as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"],
                               message("behind postfix")) == {}
    wait_until(lambda: postfix.delivered(), timeout=60,
               what=f"delivery by Postfix; maillog:\n{postfix.maillog()}")
    (delivered,) = postfix.delivered()
    assert b"Subject: behind postfix" in delivered
    assert b"X-Poolmgr-Scan: clean" in delivered
    log = postfix.maillog()
    assert f"relay=127.0.0.1[127.0.0.1]:{pm.scanner_port}" in log  # through the scanner pool
    assert "status=sent (delivered to maildir)" in log
    # XFORWARD carried the real client into the scanner and on to Postfix's 10025 listener.
    assert "client=unknown[127.0.0.7]" in pm.log()
    assert log.count("client=unknown[127.0.0.7]") == 2  # Postfix's inbound and re-injection


def test_postfix_content_filter_eicar_is_bounced_not_delivered(postfix_and_poolmgr):
    postfix, pm = postfix_and_poolmgr
    with smtplib.SMTP("127.0.0.1", postfix.inbound_port, local_hostname=HELO,
                      timeout=30) as client:
        client.sendmail("alice@example.org", ["bob@example.test"], message(
            "virus", "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*\r\n"))
    wait_until(lambda: "Eicar-Test-Signature" in postfix.maillog(), timeout=60,
               what="Postfix to log the scanner's rejection")
    assert "status=bounced" in postfix.maillog()
    assert not any(b"Subject: virus" in m for m in postfix.delivered())


def test_poolmgr_in_front_of_postfix(poolmgr_in_front):
    postfix, pm = poolmgr_in_front
    with pm.smtp(source="127.0.0.8") as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"],
                               message("in front")) == {}
    # poolmgr said 250 only after Postfix had queued it, so it is already in Postfix's hands.
    wait_until(lambda: postfix.delivered(), timeout=60, what="delivery by Postfix")
    (delivered,) = postfix.delivered()
    assert b"Subject: in front" in delivered
    assert b"Received: from client.test (unknown [127.0.0.8])" in delivered
    assert "client=unknown[127.0.0.8]" in postfix.maillog()  # XFORWARD from the scanner


def test_an_ipv6_client_reaches_an_ipv4_only_postfix_through_the_scanner(poolmgr_in_front):
    """XFORWARD ADDR for an IPv6 client goes as Postfix's smtpd wants it, `IPv6:` before it,
    told bare (as poolmgr's SMTP pool sent it) or prefixed (as Postfix sends it). This Postfix
    (inet_protocols = ipv4, as many are) refuses any IPv6 ADDR: as Postfix's smtp client does,
    the scanner logs the refusal and delivers (it was a 451 for every such message)."""
    postfix, pm = poolmgr_in_front
    for told in ("2001:db8::7", "IPv6:2001:db8::8"):
        with smtplib.SMTP("127.0.0.1", pm.scanner_port, local_hostname=HELO,
                          timeout=30) as client:
            client.ehlo()
            assert client.docmd("XFORWARD", f"NAME=v6.example ADDR={told}")[0] == 250
            assert client.sendmail("alice@example.org", ["bob@example.test"],
                                   message(f"from {told}")) == {}
    wait_until(lambda: len(postfix.delivered()) == 2, timeout=60, what="delivery by Postfix")
    for address in ("2001:db8::7", "2001:db8::8"):
        assert f"said: 501 5.5.4 Bad ADDR syntax: IPv6:{address} (in reply to XFORWARD " \
               "command)" in pm.log()
    # Postfix's log lines reach its maillog through postlogd, a little after the mail.
    wait_until(lambda: postfix.maillog().count("client=unknown[127.0.0.1]") == 2,
               what="both clients in Postfix's log")


def test_in_front_no_relay_battery_address_reaches_postfix(poolmgr_in_front):
    """The README's in-front recipe: a client outside mynetworks tries every routing trick;
    poolmgr refuses each at RCPT, only the local recipient's message reaches Postfix, and
    Postfix's own 10025 listener refuses relaying as well."""
    from test_limits import RELAY_BATTERY

    postfix, pm = poolmgr_in_front
    with pm.smtp(source="127.0.5.60") as client:
        client.ehlo()
        client.mail("alice@example.org")
        for rcpt in RELAY_BATTERY:
            assert client.rcpt(rcpt) == (554, f"5.7.1 <{rcpt}>: Relay access denied".encode())
        assert client.rcpt("bob@example.test")[0] == 250
        assert client.data(message("only bob"))[0] == 250
    wait_until(lambda: postfix.delivered(), timeout=60, what="delivery by Postfix")
    (delivered,) = postfix.delivered()
    assert b"Subject: only bob" in delivered
    assert "evil" not in postfix.maillog().lower()
    assert pm.status()["pools"]["scanner"]["counters"]["connections"] == 1
    # The second layer: straight into Postfix's in-front listener, a foreign domain is refused.
    with smtplib.SMTP("127.0.0.1", postfix.front_port, local_hostname=HELO, timeout=30) as direct:
        direct.ehlo()
        direct.mail("alice@example.org")
        code, text = direct.rcpt("victim@evil.test")
        assert code == 554 and b"Relay access denied" in text


def reports(postfix) -> list[bytes]:
    return [m for m in postfix.delivered() if b"report-type=delivery-status" in m]


def originals(postfix, subject: str) -> list[bytes]:
    return [m for m in postfix.delivered()
            if f"Subject: {subject}".encode() in m and b"report-type=delivery-status" not in m]


@pytest.fixture(params=["smtp", "lmtp"])
def in_front_either_hand_off(make_poolmgr, shared_postfix, request):
    """poolmgr in front, its SMTP pool handing off to the scanner over SMTP (the scanner
    sends the notification) or LMTP (the scanner answers per recipient, the SMTP worker
    sends it)."""
    return started(make_poolmgr, shared_postfix, "front_port", request.param)


def test_recipient_refused_beside_an_accepted_one_gets_a_dsn(in_front_either_hand_off):
    """Postfix accepts the message for bob and refuses it for a mailbox that does not exist:
    bob gets it once, and the sender gets an RFC 3464 report naming the refused recipient."""
    postfix, pm = in_front_either_hand_off
    with pm.smtp(source="127.0.5.61") as client:
        assert client.sendmail("alice@example.test", ["bob@example.test", REFUSED],
                               message("mixed")) == {}
    wait_until(lambda: len(postfix.delivered()) == 2, timeout=60,
               what=f"the message and the notification; maillog:\n{postfix.maillog()}")
    assert len(originals(postfix, "mixed")) == 1
    (raw,) = reports(postfix)
    assert raw.startswith(b"Return-Path: <>")  # MAIL FROM:<>
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert report["To"] == "alice@example.test"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    human, status, headers = report.iter_parts()
    assert f"<{REFUSED}>: host 127.0.0.1 said: 550 5.1.1" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = status.get_payload()  # RFC 3464 section 2.1
    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert per_recipient["Final-Recipient"] == f"rfc822; {REFUSED}"
    assert (per_recipient["Action"], per_recipient["Status"]) == ("failed", "5.1.1")
    assert per_recipient["Diagnostic-Code"].startswith(f"smtp; 550 5.1.1 <{REFUSED}>")
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: mixed" in headers.get_payload(decode=True)
    log = pm.log()
    assert re.search(f"to=<{REFUSED}>, relay=127.0.0.1\\[127.0.0.1\\]:{postfix.front_port}, .* "
                     r"status=bounced \(550 5\.1\.1 ", log)
    assert "sender non-delivery notification: " in log


def test_no_dsn_to_the_null_sender(poolmgr_in_front):
    postfix, pm = poolmgr_in_front
    with pm.smtp(source="127.0.5.62") as client:
        assert client.sendmail("", ["bob@example.test", REFUSED], message("bounce")) == {}
    wait_until(lambda: postfix.delivered(), timeout=60, what="delivery by Postfix")
    assert "no sender non-delivery notification for <gone@example.test>: the sender is null" \
        in pm.log()
    time.sleep(1)  # nothing else is on its way
    assert len(postfix.delivered()) == 1 and not reports(postfix)


@pytest.mark.log_allows(r"sender non-delivery notification to <.*> failed")
def test_a_dsn_that_cannot_be_handed_over_defers_the_whole_message(poolmgr_in_front):
    """The sender's own address is refused, so the notification cannot go: 451 for the whole
    message (bob may see it twice when the client retries; nothing is lost)."""
    postfix, pm = poolmgr_in_front
    with pm.smtp(source="127.0.5.63") as client:
        client.ehlo()
        client.mail(REFUSED)
        assert client.rcpt("bob@example.test")[0] == 250
        assert client.rcpt(REFUSED)[0] == 250
        code, text = client.data(message("undeliverable report"))
    assert (code, text) == (451, b"4.3.0 Error: cannot notify the sender of refused "
                                 b"recipients, try again later")
    assert f"sender non-delivery notification to <{REFUSED}> failed: 550 5.1.1" in pm.log()


def test_lmtp_client_gets_a_reply_per_recipient_and_no_dsn(poolmgr_in_front):
    """Postfix's preferred content_filter recipe, lmtp:[127.0.0.1]:10024: the scanner tells its
    LMTP client which recipient the next hop refused, and the client bounces it itself."""
    postfix, pm = poolmgr_in_front
    with smtplib.LMTP("127.0.0.1", pm.scanner_port, local_hostname=HELO, timeout=30) as client:
        client.ehlo_or_helo_if_needed = lambda: None
        assert client.docmd("LHLO", HELO)[0] == 250
        assert client.docmd("MAIL FROM:<alice@example.test>")[0] == 250
        assert client.docmd("RCPT TO:<bob@example.test>")[0] == 250
        assert client.docmd(f"RCPT TO:<{REFUSED}>")[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(message("per recipient") + b"\r\n.\r\n")
        first, second = client.getreply(), client.getreply()
    assert first[0] == 250
    assert second[0] == 550 and second[1].startswith(b"5.1.1 <gone@example.test>")
    wait_until(lambda: postfix.delivered(), timeout=60, what="delivery by Postfix")
    time.sleep(1)
    assert len(originals(postfix, "per recipient")) == 1 and not reports(postfix)


def test_policy_banks_discard_after_the_queue_and_reject_before_it(make_poolmgr):
    """The README's amavisd-replacement recipe: Postfix's content_filter feeds the scanner's
    "after-queue" bank over LMTP, which discards GTUBE into the quarantine (a reject there
    would bounce to a forged sender); `poolmgr quarantine release` delivers it through
    Postfix. The SMTP pool, before the queue, hands off to scanner.listen: EICAR gets 554."""
    from poolmgr.testing import Spamd
    from test_spamd import spam

    pm = make_poolmgr(start=False)
    bank_port = free_port()
    postfix = Postfix(bank_port)
    spamd = Spamd().start()
    pm.configure("scanner", next_hop=f"smtp:127.0.0.1:{postfix.reinject_port}",
                 checks=["builtin", "spamd"], spamd={"address": spamd.address},
                 quarantine=str(pm.dir / "quarantine"),
                 policy=[{"name": "after-queue", "listen": f"127.0.0.1:{bank_port}",
                          "spam_action": "discard", "virus_action": "discard"}])
    try:
        postfix.start()
        pm.start()
        with smtplib.SMTP("127.0.0.1", postfix.lmtp_inbound_port, local_hostname=HELO,
                          timeout=30) as client:
            assert client.sendmail("alice@example.org", ["bob@example.test"], spam()) == {}
        wait_until(lambda: "discarded" in postfix.maillog(), timeout=60,
                   what=f"the scanner's discard in Postfix's log:\n{postfix.maillog()}")
        assert "Blocked SPAM {Discarded,Quarantined,after-queue}" in pm.log()
        (entry,) = json.loads(pm.run_cli("quarantine", "list", "--json", check=True).stdout)
        assert entry["verdict"] == "spam_killed" and entry["sender"] == "alice@example.org"
        time.sleep(1)
        assert postfix.delivered() == [] and "bounced" not in postfix.maillog()
        released = pm.run_cli("quarantine", "release", entry["id"])
        assert released.returncode == 0, released.stderr
        wait_until(lambda: postfix.delivered(), timeout=60, what="the released message")
        (delivered,) = postfix.delivered()
        assert b"GTUBE" in delivered and b"X-Poolmgr-Scan: released from quarantine" in delivered
        # Before the queue, the SMTP pool's hand-off goes to scanner.listen: reject.
        with pm.smtp() as client:
            client.ehlo()
            client.mail("alice@example.org")
            client.rcpt("bob@example.test")
            code, text = client.data(message("virus", "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-"
                                                      "STANDARD-ANTIVIRUS-TEST-FILE!$H+H*\r\n"))
        assert code == 554 and b"virus found" in text
    finally:
        postfix.stop()
        spamd.stop()
