"""A private Postfix instance for tests: its own config and queue in a temp directory.

Four smtpd listeners on loopback. The amavisd way: `inbound_port` hands every message to a
content filter (`scan` transport, SMTP with XFORWARD), `lmtp_inbound_port` likewise over LMTP
(`scanlmtp`, the README's preferred feed), and `reinject_port` takes it back (the 10025 listener) and delivers it with Postfix's virtual agent into `mail/inbox/` (a maildir).
poolmgr in front: `front_port` is the README's 10025 listener for that recipe, which refuses
relaying on its own too (reject_unauth_destination), so that both layers hold; it also refuses
`REFUSED` as a mailbox that does not exist (550 5.1.1), a next hop that accepts a message for
some recipients and not for others.

A module's tests share one instance: `reset` gives the next test an empty queue and mailbox and
a maillog of its own, as a fresh instance would have.
"""

import subprocess

from helpers import free_port
from poolmgr.testing import Postfix as PrivatePostfix

REFUSED = "gone@example.test"

MAIN_CF = """\
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = example.test
virtual_mailbox_base = {dir}/mail
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_minimum_uid = 100
smtpd_recipient_restrictions = permit_mynetworks, reject
front_recipient_restrictions = check_recipient_access
    inline:{{ {{ REFUSED = 550 5.1.1 <REFUSED>: Recipient address rejected: User unknown }} }},
    reject_unauth_destination
""".replace("REFUSED", REFUSED)

MASTER_CF = """\
127.0.0.1:{inbound} inet n - n - - smtpd
  -o content_filter=scan:[127.0.0.1]:{scanner}
127.0.0.1:{lmtp_inbound} inet n - n - - smtpd
  -o content_filter=scanlmtp:[127.0.0.1]:{scanner}
127.0.0.1:{reinject} inet n - n - - smtpd
  -o content_filter=
  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters
  -o smtpd_authorized_xforward_hosts=127.0.0.0/8
127.0.0.1:{front} inet n - n - - smtpd
  -o content_filter=
  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters
  -o smtpd_authorized_xforward_hosts=127.0.0.0/8
  -o smtpd_recipient_restrictions=$front_recipient_restrictions
scan      unix  -       -       n       -       2       smtp
  -o smtp_send_xforward_command=yes
  -o disable_mime_output_conversion=yes
scanlmtp  unix  -       -       n       -       2       lmtp
  -o lmtp_send_xforward_command=yes
  -o disable_mime_output_conversion=yes
"""


class Postfix(PrivatePostfix):
    def __init__(self, scanner_port: int):
        self.scanner_port = scanner_port  # where the content filters hand their mail
        self.maillog_start = 0
        self.inbound_port = free_port()
        self.lmtp_inbound_port = free_port()
        self.reinject_port = free_port()
        self.front_port = free_port()
        super().__init__(MAIN_CF, MASTER_CF.format(
            inbound=self.inbound_port, lmtp_inbound=self.lmtp_inbound_port, reinject=self.reinject_port, front=self.front_port,
            scanner=scanner_port))

    def delivered(self) -> list[bytes]:
        new = self.dir / "mail" / "inbox" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def maillog(self) -> str:
        """The log since the last `reset`."""
        return super().maillog()[self.maillog_start:]

    def reset(self) -> None:
        """For the next test: no queued message (a deferred bounce the last test left would be
        retried into this one), an empty mailbox, and the log from here on."""
        deleted = subprocess.run(["postsuper", "-c", str(self.dir), "-d", "ALL"],
                                 capture_output=True, text=True, timeout=30)
        if deleted.returncode != 0:
            raise RuntimeError(f"postsuper -d ALL: {deleted.stderr}")
        for folder in ("new", "cur", "tmp"):
            path = self.dir / "mail" / "inbox" / folder
            for message in path.iterdir() if path.exists() else ():
                message.unlink()
        self.maillog_start = len(PrivatePostfix.maillog(self))
