"""A private Postfix instance for tests: its own config and queue in a temp directory.

Two smtpd listeners on loopback, the amavisd way: `inbound_port` hands every message to a
content filter (`scan` transport, SMTP with XFORWARD) and `reinject_port` takes it back (the
10025 listener) and delivers it with Postfix's virtual agent into `mail/inbox/` (a maildir).
"""

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil

from helpers import free_port, wait_until

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.example.test
mydomain = example.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
alias_maps =
alias_database =
biff = no
virtual_mailbox_domains = example.test
virtual_mailbox_base = {dir}/mail
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_minimum_uid = 100
smtpd_recipient_restrictions = permit_mynetworks, reject
"""

MASTER_CF = """\
127.0.0.1:{inbound} inet n - n - - smtpd
  -o content_filter=scan:[127.0.0.1]:{scanner}
127.0.0.1:{reinject} inet n - n - - smtpd
  -o content_filter=
  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters
  -o smtpd_authorized_xforward_hosts=127.0.0.0/8
scan      unix  -       -       n       -       2       smtp
  -o smtp_send_xforward_command=yes
  -o disable_mime_output_conversion=yes
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    def __init__(self, scanner_port: int):
        # Postfix's daemons run as the postfix user: pytest's 0700 tmp dirs are out of reach.
        self.dir = Path(tempfile.mkdtemp(prefix="poolmgr-postfix-"))
        os.chmod(self.dir, 0o755)
        self.inbound_port = free_port()
        self.reinject_port = free_port()
        (self.dir / "queue").mkdir()  # postfix check makes its subdirectories
        (self.dir / "data").mkdir()
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.dir / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        (self.dir / "mail").mkdir(mode=0o1777)
        os.chmod(self.dir / "mail", 0o1777)
        (self.dir / "main.cf").write_text(MAIN_CF.format(dir=self.dir))
        (self.dir / "master.cf").write_text(MASTER_CF.format(
            inbound=self.inbound_port, reinject=self.reinject_port, scanner=scanner_port))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        # postfix prints its errors only to a terminal: script(1) gives it one.
        command = " ".join(["postfix", "-c", str(self.dir), *args])
        return subprocess.run(["script", "-qc", command, "/dev/null"], capture_output=True,
                              text=True, timeout=60)

    def start(self) -> "Postfix":
        for step in (("check",), ("start",)):
            result = self._postfix(*step)
            assert result.returncode == 0, f"postfix {step[0]}: {result.stdout}{self.maillog()}"
        wait_until(lambda: "daemon started" in self.maillog(), what="postfix master")
        return self

    def maillog(self) -> str:
        path = self.dir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def delivered(self) -> list[bytes]:
        new = self.dir / "mail" / "inbox" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def stop(self) -> None:
        pidfile = self.dir / "queue" / "pid" / "master.pid"
        pid = int(pidfile.read_text().split()[0]) if pidfile.exists() else 0
        self._postfix("stop")
        if pid:
            wait_until(lambda: not psutil.pid_exists(pid) or
                       psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=20,
                       what="the Postfix master to exit")
        if not os.environ.get("POOLMGR_KEEP_POSTFIX"):
            shutil.rmtree(self.dir, ignore_errors=True)
