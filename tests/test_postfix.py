"""poolmgr beside a real Postfix (Debian's package, a private instance on loopback).

Behind Postfix: Postfix's smtpd takes the mail and hands it to the scanner pool as its
content_filter; the scanner re-injects into Postfix's 10025-style listener, and Postfix
delivers it. In front of Postfix: poolmgr's SMTP pool takes the mail and the scanner's next hop
is that same 10025 listener.
"""

import smtplib

import pytest

from helpers import HELO, message, wait_until
from postfix import Postfix


@pytest.fixture
def postfix_and_poolmgr(make_poolmgr):
    pm = make_poolmgr(start=False)
    postfix = Postfix(pm.scanner_port)
    pm.configure("scanner", next_hop=f"smtp:127.0.0.1:{postfix.reinject_port}")
    try:
        postfix.start()
        pm.start()
        yield postfix, pm
    finally:
        postfix.stop()


def test_scanner_pool_as_postfix_content_filter(postfix_and_poolmgr):
    postfix, pm = postfix_and_poolmgr
    with smtplib.SMTP("127.0.0.1", postfix.inbound_port, local_hostname=HELO,
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


def test_poolmgr_in_front_of_postfix(postfix_and_poolmgr):
    postfix, pm = postfix_and_poolmgr
    with pm.smtp(source="127.0.0.8") as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"],
                               message("in front")) == {}
    # poolmgr said 250 only after Postfix had queued it, so it is already in Postfix's hands.
    wait_until(lambda: postfix.delivered(), timeout=60, what="delivery by Postfix")
    (delivered,) = postfix.delivered()
    assert b"Subject: in front" in delivered
    assert b"Received: from client.test (unknown [127.0.0.8])" in delivered
    assert "client=unknown[127.0.0.8]" in postfix.maillog()  # XFORWARD from the scanner
