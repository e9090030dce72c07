"""End to end with real processes: client -> SMTP pool -> scanner pool -> next hop."""

import smtplib
import ssl
import subprocess
import time

import pytest

from helpers import HELO, Raw, free_port, message, wait_until
from poolmgr.smtp import replies as R


def test_every_listen_address_delivers(make_poolmgr):
    """listen as a list: each SMTP worker accepts on every address, IPv4 and IPv6 (::1)."""
    pm = make_poolmgr(start=False)
    v6_port = free_port()
    pm.configure("smtp", listen=[f"127.0.0.1:{pm.smtp_port}", f"[::1]:{v6_port}"]).start()
    for host, port in (("127.0.0.1", pm.smtp_port), ("::1", v6_port)):
        with smtplib.SMTP(host, port, timeout=30, local_hostname=HELO) as client:
            assert client.sendmail("alice@example.org", ["bob@example.test"],
                                   message(f"via {host}")) == {}
    delivered = b"".join(pm.delivered())
    assert b"Subject: via 127.0.0.1" in delivered and b"Subject: via ::1" in delivered
    assert b"(unknown [IPv6:::1])" in delivered


def test_smtplib_message_arrives_once_with_trace_headers(make_poolmgr):
    pm = make_poolmgr()
    with pm.smtp() as client:
        refused = client.sendmail("alice@example.org", ["bob@example.test"],
                                  message("once", "hello\r\n.leading dot\r\n"))
    assert refused == {}
    (delivered,) = pm.delivered()
    headers, _, body = delivered.partition(b"\r\n\r\n")
    assert b"Subject: once" in headers
    assert b"X-Poolmgr-Scan: clean" in headers
    assert headers.count(b"Received: ") == 2  # SMTP worker and scanner each add one
    assert b"Received: from client.test (unknown [127.0.0.1])\r\n\tby mx.example.test (poolmgr)" \
        in headers
    assert body == b"hello\r\n.leading dot\r\n"
    # The worker writes its disconnect line after the client has its 221: wait for it.
    disconnect = "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"
    wait_until(lambda: disconnect in pm.log(), what="the disconnect line")
    log = pm.log()
    assert "connect from unknown[127.0.0.1]" in log
    assert "proxy-accept: END-OF-MESSAGE: 250 2.0.0" in log


def test_pipelined_transactions(make_poolmgr):
    pm = make_poolmgr()
    client = Raw(pm.smtp_port)
    assert client.reply()[0] == 220
    client.send(b"EHLO client.test\r\n")
    code, lines = client.reply()
    assert "250-PIPELINING" in lines
    transaction = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    client.send(transaction)
    for n in range(3):
        assert [client.reply()[0] for _ in range(3)] == [250, 250, 354]
        # The message, its final dot and the next transaction (or QUIT) in one write.
        client.send(f"Subject: pipelined {n}\r\n\r\nbody\r\n.\r\n".encode() +
                    (transaction if n < 2 else b"QUIT\r\n"))
        assert client.reply()[0] == 250
    assert client.reply()[0] == 221
    client.close()
    assert len(pm.delivered()) == 3


@pytest.fixture
def certificate(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mx.example.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_starttls(make_poolmgr, certificate):
    cert, key = certificate
    pm = make_poolmgr({"smtp": {"tls_cert": str(cert), "tls_key": str(key)}})
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    with pm.smtp() as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=context)
        client.ehlo()
        assert not client.has_extn("starttls")  # RFC 3207: not offered again
        assert client.docmd("HELP")[1].decode().endswith(" HELP STARTTLS")
        client.sendmail("alice@example.org", ["bob@example.test"], message("over tls"))
    (delivered,) = pm.delivered()
    assert b"with ESMTPS id" in delivered


def test_plaintext_injected_after_starttls_is_discarded(make_poolmgr, certificate):
    """CVE-2011-0411: commands pipelined with STARTTLS must not run inside TLS."""
    cert, key = certificate
    pm = make_poolmgr({"smtp": {"tls_cert": str(cert), "tls_key": str(key)}})
    raw = Raw(pm.smtp_port)
    raw.reply()
    raw.send(b"EHLO client.test\r\n")
    raw.reply()
    raw.send(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
    assert raw.reply()[0] == 220
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    tls = context.wrap_socket(raw.sock, server_hostname="mx.example.test")
    tls.sendall(b"NOOP\r\n")
    tls.settimeout(10)
    reply = tls.recv(1000)
    # Had the injected MAIL run inside TLS, its "503 send HELO first" would come first.
    assert reply == b"250 2.0.0 Ok\r\n", reply
    tls.close()
    assert "discarding 34 bytes of plaintext sent after STARTTLS" in pm.log()


def test_eicar_is_rejected(make_poolmgr):
    pm = make_poolmgr()
    eicar = message("virus", "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-"
                             "TEST-FILE!$H+H*\r\n")
    with pm.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("alice@example.org", ["bob@example.test"], eicar)
    assert info.value.smtp_code == 554
    assert pm.delivered() == []


def test_eicar_in_a_base64_attachment_is_rejected(make_poolmgr):
    from email.message import EmailMessage
    pm = make_poolmgr()
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"] = "attachment", "alice@example.org", "bob@example.test"
    msg.set_content("see attached")
    msg.add_attachment(b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*",
                       maintype="application", subtype="octet-stream", filename="eicar.com")
    assert b"EICAR" not in msg.as_bytes()
    with pm.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.send_message(msg)
    assert info.value.smtp_code == 554 and b"Eicar" in info.value.smtp_error


def test_content_rules_reject_and_tag(make_poolmgr, tmp_path):
    pm = make_poolmgr(start=False)
    pm.config.write_text(pm.config.read_text() +
                         '\n[[scanner.rules]]\nname = "lottery"\nheader = "Subject"\n'
                         'pattern = "(?i)lottery"\naction = "reject"\n'
                         '\n[[scanner.rules]]\nname = "cheap"\nbody = true\n'
                         'pattern = "cheap"\naction = "tag"\n')
    pm.start()
    with pm.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("a@example.org", ["bob@example.test"], message("You WON the Lottery"))
        assert info.value.smtp_code == 554 and b"lottery" in info.value.smtp_error
        client.sendmail("a@example.org", ["bob@example.test"], message("offer", "cheap stuff\r\n"))
    (delivered,) = pm.delivered()
    assert b"X-Poolmgr-Scan: tagged (cheap)" in delivered


def test_relay_is_refused_outside_mynetworks(make_poolmgr):
    pm = make_poolmgr()
    with pm.smtp(source="127.0.0.44") as client:
        client.ehlo()
        client.mail("alice@example.org")
        code, text = client.rcpt("victim@elsewhere.example")
        assert (code, text) == (554, b"5.7.1 <victim@elsewhere.example>: Relay access denied")
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.44]: 554 5.7.1 "
            "<victim@elsewhere.example>: Relay access denied; from=<alice@example.org> "
            "to=<victim@elsewhere.example> proto=ESMTP helo=<client.test>") in pm.log()


# The published SMTP-smuggling end-of-data variants (SEC Consult, 2023): a next hop that takes
# one of them for the end of the message would read the rest as a second, forged message.
SMUGGLING = [(b"\n.\n", R.R550_BARE_LF), (b"\n.\r\n", R.R550_BARE_LF),
             (b"\r\n.\n", R.R550_BARE_LF), (b"\r.\r\n", R.R550_BARE_CR),
             (b"\r\n.\r", R.R550_BARE_CR), (b"\r\n\x00.\r\n", R.R550_NUL)]


@pytest.mark.parametrize("end, refusal", SMUGGLING, ids=lambda v: repr(v)[2:-1]
                         if isinstance(v, bytes) else None)
def test_smuggling_never_reaches_the_next_hop(make_poolmgr, make_sink, end, refusal):
    sink = make_sink()
    pm = make_poolmgr({"scanner": {"next_hop": f"smtp:127.0.0.1:{sink.port}"}})
    raw = Raw(pm.smtp_port, "127.0.0.45")
    raw.reply()
    raw.send(b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\n"
             b"RCPT TO:<bob@example.test>\r\nDATA\r\n")
    assert [raw.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    raw.send(b"Subject: outer\r\n\r\nouter" + end + b"MAIL FROM:<admin@example.test>\r\n"
             b"RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
    code, lines = raw.reply()
    assert (code, lines[-1]) == (550, str(refusal))
    # The same session then sends a clean message: it, and only it, reaches the next hop.
    raw.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    assert [raw.reply()[0] for _ in range(3)] == [250, 250, 354]
    raw.send(b"Subject: clean\r\n\r\nclean\r\n.\r\nQUIT\r\n")
    assert raw.reply()[0] == 250 and raw.reply()[0] == 221
    wait_until(lambda: sink.messages(), what="the clean message at smtp-sink")
    time.sleep(0.5)
    (arrived,) = sink.messages()
    assert b"Subject: clean" in arrived and b"smuggled" not in arrived and b"outer" not in arrived
    assert f"reject: END-OF-MESSAGE from unknown[127.0.0.45]: {refusal}" in pm.log()


def test_next_hop_down_gives_451_and_nothing_is_lost(make_poolmgr, make_sink):
    port = free_port()
    pm = make_poolmgr({"scanner": {"next_hop": f"smtp:127.0.0.1:{port}"},
                       "timeouts": {"connect": "2s"}})
    msg = message("retry me")
    with pm.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("alice@example.org", ["bob@example.test"], msg)
    assert info.value.smtp_code == 451 and info.value.smtp_error.startswith(b"4.4.1")
    assert "next hop smtp:127.0.0.1:%d failed at connect" % port in pm.log()
    sink = make_sink(port)  # the next hop comes back; the sender retries
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], msg) == {}
    wait_until(lambda: len(sink.messages()) == 1, what="message at smtp-sink")
    assert b"Subject: retry me" in sink.messages()[0]


def test_scanner_pool_down_gives_451(make_poolmgr):
    port = free_port()
    pm = make_poolmgr({"smtp": {"proxy_filter": f"127.0.0.1:{port}"},
                       "timeouts": {"connect": "2s"}})
    with pm.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("alice@example.org", ["bob@example.test"], message())
    reply = R.R451_FILTER_UNAVAILABLE
    assert info.value.smtp_code == reply.code == 451  # temporary: the sender retries
    assert info.value.smtp_error.decode() == f"{reply.status} {reply.text}"
    assert pm.delivered() == []


def test_message_size_limit(make_poolmgr):
    pm = make_poolmgr({"smtp": {"message_size_limit": "20k"}})
    with pm.smtp() as client:
        client.ehlo()
        assert client.esmtp_features["size"] == str(20 * 1024)
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            client.sendmail("a@example.org", ["bob@example.test"], message("big", "x" * 30000))
        assert info.value.smtp_code == 552  # SIZE= in MAIL is checked first
    raw = Raw(pm.smtp_port)  # a client that does not declare SIZE is stopped after the dot
    raw.reply()
    raw.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    assert [raw.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    raw.send((b"y" * 998 + b"\r\n") * 40 + b".\r\nNOOP\r\n")
    assert raw.reply()[1][-1] == "552 5.3.4 Error: message file too big"
    assert raw.reply()[0] == 250
    assert pm.delivered() == []


def test_recipient_limit_and_long_lines(make_poolmgr):
    pm = make_poolmgr({"smtp": {"max_recipients": 100}})
    raw = Raw(pm.smtp_port)
    raw.reply()
    raw.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n" +
             b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(101)))
    codes = [raw.reply()[0] for _ in range(103)]
    assert codes[2:102] == [250] * 100 and codes[102] == 452
    raw.send(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
    assert raw.reply()[1][-1] == "500 5.5.2 Error: line too long"
    assert raw.reply()[0] == 250


def test_swaks(make_poolmgr):
    pm = make_poolmgr()
    result = subprocess.run(["swaks", "--server", f"127.0.0.1:{pm.smtp_port}", "--helo", HELO,
                             "--from", "alice@example.org", "--to", "bob@example.test",
                             "--pipeline"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    assert len(pm.delivered()) == 1


def test_smtp_source_through_to_smtp_sink(make_poolmgr, make_sink):
    sink = make_sink()
    pm = make_poolmgr({"scanner": {"next_hop": f"smtp:127.0.0.1:{sink.port}"}})
    result = subprocess.run(["smtp-source", "-s", "5", "-m", "100", "-c", "-M", HELO,
                             "-f", "alice@example.org", "-t", "bob@example.test",
                             f"127.0.0.1:{pm.smtp_port}"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(sink.messages()) == 100, what="100 messages at smtp-sink")
    assert pm.status()["pools"]["smtp"]["counters"]["messages_accepted"] == 100
