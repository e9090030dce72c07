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


def started(make_poolmgr, listener: str):
    pm = make_poolmgr(start=False)
    postfix = Postfix(pm.scanner_port)
    pm.configure("scanner", next_hop=f"smtp:127.0.0.1:{getattr(postfix, listener)}")
    try:
        postfix.start()
        pm.start()
        yield postfix, pm
    finally:
        postfix.stop()


@pytest.fixture
def postfix_and_poolmgr(make_poolmgr):
    """The scanner pool behind Postfix (content_filter), re-injecting into 10025."""
    yield from started(make_poolmgr, "reinject_port")


@pytest.fixture
def poolmgr_in_front(make_poolmgr):
    """poolmgr on the public port, its scanner re-injecting into the in-front 10025."""
    yield from started(make_poolmgr, "front_port")


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
