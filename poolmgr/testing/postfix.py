"""A private Postfix instance (Debian's package): its own main.cf, master.cf, queue and log
in a temp dir, started and stopped with `postfix -c DIR`.
"""

__all__ = ["Postfix"]

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .wait import wait_until

POSTFIX_MAIN_CF = """\
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
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
alias_maps =
alias_database =
biff = no
"""
# The services every instance needs, without chroot (master.cf's defaults otherwise).
POSTFIX_SERVICES = """\
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
    """A private Postfix instance: its own main.cf, master.cf, queue and log in a temp dir.

    `main_cf` and `master_cf` are added to the common settings and services above
    (`{dir}` is the instance's directory). With `resolver` ("127.53.53.53"), Postfix runs in a
    mount namespace of its own whose /etc/resolv.conf names that nameserver: the only way to
    point Postfix's DNS lookups (postscreen's DNSBL queries) at a test's DNS server.
    """

    def __init__(self, main_cf: str = "", master_cf: str = "", resolver: str | None = None):
        import pwd

        # Postfix's daemons run as the postfix user: pytest's 0700 tmp dirs are out of reach.
        self.dir = Path(tempfile.mkdtemp(prefix="poolmgr-postfix-"))
        os.chmod(self.dir, 0o755)
        (self.dir / "queue").mkdir()  # postfix check makes its subdirectories
        (self.dir / "data").mkdir()
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.dir / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        (self.dir / "mail").mkdir(mode=0o1777)
        os.chmod(self.dir / "mail", 0o1777)
        (self.dir / "main.cf").write_text(POSTFIX_MAIN_CF.format(dir=self.dir) +
                                          main_cf.format(dir=self.dir))
        (self.dir / "master.cf").write_text(master_cf + POSTFIX_SERVICES)
        self.resolver = resolver
        if resolver:
            (self.dir / "resolv.conf").write_text(f"nameserver {resolver}\n"
                                                  f"options timeout:2 attempts:2\n")

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        # postfix prints its errors only to a terminal: script(1) gives it one.
        command = " ".join(["postfix", "-c", str(self.dir), *args])
        if self.resolver and args[0] == "start":
            command = (f"unshare --mount --propagation private sh -c 'mount --bind "
                       f"{self.dir}/resolv.conf /etc/resolv.conf && {command}'")
        return subprocess.run(["script", "-qc", command, "/dev/null"], capture_output=True,
                              text=True, timeout=60)

    def start(self) -> "Postfix":
        for step in (("check",), ("start",)):
            result = self._postfix(*step)
            if result.returncode != 0:
                raise RuntimeError(f"postfix {step[0]}: {result.stdout}{self.maillog()}")
        wait_until(lambda: "daemon started" in self.maillog(), what="postfix master")
        return self

    @property
    def master_pid(self) -> int:
        pidfile = self.dir / "queue" / "pid" / "master.pid"
        try:
            return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def maillog(self) -> str:
        path = self.dir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        import psutil

        pid = self.master_pid
        self._postfix("stop")
        if pid:
            wait_until(lambda: not psutil.pid_exists(pid) or
                       psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=20,
                       what="the Postfix master to exit")
        if not os.environ.get("POOLMGR_KEEP_POSTFIX"):
            shutil.rmtree(self.dir, ignore_errors=True)
