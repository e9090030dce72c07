"""fail2ban's own postfix filter on poolmgr's log: every offending client is matched, no legit one.

A storm from distinct 127.x.y.z addresses (pregreet bots, a DNSBL-listed client, clients
refused at RCPT for relaying and for an unknown recipient, a bot that hangs up at once) and
legit senders; then Debian's `fail2ban-regex` reads the storm's part of the harness's log
(syslog-style lines, `Nov 27 10:00:00 host poolmgr/smtpd[PID]: ...`) with
`/etc/fail2ban/filter.d/postfix.conf` as a jail would use it for poolmgr:
`postfix[mode=aggressive, _daemon=poolmgr/\\w+]`. No fail2ban server is started and nothing of
the system's configuration is changed.
"""

import re
import shutil
import subprocess
from collections import Counter

import pytest

from helpers import Raw, message, wait_until
from poolmgr.testing import DnsServer

FILTER = "/etc/fail2ban/filter.d/postfix.conf[mode=aggressive, _daemon=poolmgr/\\w+]"
PREGREET = ["127.0.30.1", "127.0.30.2", "127.0.30.3"]
LISTED = "127.0.31.1"
RELAY = "127.0.32.1"
UNKNOWN_RCPT = "127.0.33.1"
HANGUP = "127.0.34.1"
LEGIT = ["127.0.35.1", "127.0.35.2"]


@pytest.fixture
def dns():
    server = DnsServer({}, ttl=300).start()
    yield server
    server.stop()


def fail2ban_regex(log_path, *options: str) -> str:
    regex = shutil.which("fail2ban-regex")
    if not regex:
        pytest.fail("fail2ban-regex is not installed: run scripts/test.sh, which installs "
                    "fail2ban")
    done = subprocess.run([regex, *options, str(log_path), FILTER], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def bot(pm, source: str, early: bytes = b"", rcpt: str = "bob@example.test") -> str | None:
    """One session: optionally talk before the banner, then EHLO, MAIL, one RCPT; its reply."""
    raw = Raw(pm.smtp_port, source)
    try:
        if early:
            raw.send(early)
        code, _ = raw.reply()
        if code != 220:
            return None
        if not early:
            raw.send(b"EHLO bot.test\r\n")
        raw.reply()
        raw.send(f"MAIL FROM:<spam@example.org>\r\nRCPT TO:<{rcpt}>\r\n".encode())
        raw.reply()
        reply = raw.reply()[1][-1]
        raw.send(b"QUIT\r\n")
        raw.reply()
        return reply
    finally:
        raw.close()


def test_fail2ban_postfix_filter_matches_every_offender_and_no_legit_client(
        make_poolmgr, dns, tmp_path):
    dns.list(LISTED, "zen.test")
    table = tmp_path / "recipients"
    table.write_text("bob@example.test\n")
    pm = make_poolmgr({"defence": {"greet_wait": "1s", "greet_action": "enforce",
                                   "dnsbl_sites": ["zen.test"], "nameservers": [dns.address],
                                   "dnsbl_action": "enforce", "recipients": str(table)}})
    # The harness's own probe (connect, read the banner, close) is no part of the storm.
    wait_until(lambda: re.search(r"smtpd\[\d+\]: disconnect from unknown\[127\.0\.0\.1\]",
                                 pm.log()), what="the harness's probe logged")
    storm_starts = pm.log_path.stat().st_size
    for source in PREGREET:
        assert bot(pm, source, early=b"EHLO bot.test\r\n").startswith("550 5.7.1 Service "
                                                                      "unavailable")
    assert bot(pm, LISTED) == (f"550 5.7.1 Service unavailable; client [{LISTED}] blocked "
                               "using zen.test")
    assert bot(pm, RELAY, rcpt="victim@elsewhere.test") == (
        "554 5.7.1 <victim@elsewhere.test>: Relay access denied")
    assert bot(pm, UNKNOWN_RCPT, rcpt="nobody@example.test").startswith("550 5.1.1")
    raw = Raw(pm.smtp_port, HANGUP)  # connects and goes away before the banner ends
    raw.close()
    for source in LEGIT + LEGIT:  # twice: PASS NEW, then PASS OLD
        with pm.smtp(source=source) as client:
            assert client.sendmail("alice@example.org", ["bob@example.test"],
                                   message("legit")) == {}
    wait_until(lambda: f"lost connection after CONNECT from unknown[{HANGUP}]" in pm.log(),
               what="the hang-up logged")
    storm = tmp_path / "storm.log"
    with open(pm.log_path, "rb") as log:
        log.seek(storm_starts)
        storm.write_bytes(log.read())

    matched = Counter(fail2ban_regex(storm, "--out", "ip").split())
    offenders = PREGREET + [LISTED, RELAY, UNKNOWN_RCPT, HANGUP]
    assert set(matched) == set(offenders), matched
    # A pregreet bot is matched twice: its PREGREET line and its refused RCPT.
    assert all(matched[source] == 2 for source in PREGREET), matched
    print(fail2ban_regex(storm, "--print-all-matched"))
    print("matched per address:", dict(sorted(matched.items())))
