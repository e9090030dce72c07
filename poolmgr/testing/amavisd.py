"""A private amavisd-new (Debian's package): its own config file, $MYHOME, pid and lock files,
sockets and log, so a bench run never touches the system's /etc/amavis or /var/lib/amavis.

It runs as a content filter re-injecting into a next hop on a loopback port, with `max_servers`
children (Net::Server's fixed pre-forked pool), each serving one message at a time until
`max_requests`. Spam checks are bypassed (SpamAssassin is not loaded); virus checks are
bypassed too unless `clamd` names a clamd socket, which the children then ask (`CONTSCAN` of
amavisd's own decoded parts, as Debian's `15-av_scanners` does).

amavisd refuses to run as root: started by root it drops to the package's `amavis` user, so
its home is a directory of its own under /tmp owned by that user (the config file beside it,
which that user may not write), and a clamd socket must be reachable by it. Its $TEMPBASE,
where each message is taken apart, is in memory (`wait.ram_directory`), as amavisd's
documentation advises and as the clamd the bench shares with poolmgr has its own.
"""

__all__ = ["Amavisd"]

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil

from .clamd import CLAMD as CLAMD_PROGRAM
from .wait import WaitTimeout, free_port, listening, ram_directory, terminate, wait_until

AMAVISD = "/usr/sbin/amavisd"
AMAVIS_USER = "amavis"  # created by Debian's amavisd-new package

# Only what the bench needs, each line a setting amavisd documents in amavisd.conf-default;
# everything else keeps amavisd's built-in defaults (no SQL, no LDAP, no BerkeleyDB cache, no
# file(1) typing: amavisd at its lightest). `{...}` are filled in by Amavisd.write_config.
CONFIG = """\
use strict;
$MYHOME = '{home}';
$TEMPBASE = '{tempbase}';
$pid_file = "$MYHOME/amavisd.pid";
$lock_file = "$MYHOME/amavisd.lock";
$unix_socketname = "$MYHOME/amavisd.sock";
{user}
$myhostname = 'amavis.bench.test';
$mydomain = 'bench.test';
$inet_socket_bind = '127.0.0.1';
$inet_socket_port = {port};
@inet_acl = qw(127.0.0.1);
$max_servers = {max_servers};
$max_requests = {max_requests};
$forward_method = 'smtp:[127.0.0.1]:{next_hop}';
$notify_method = $forward_method;
$DO_SYSLOG = 0;
$LOGFILE = "$MYHOME/amavis.log";
$log_level = 0;
$log_recip_templ = undef;
$enable_db = 0;
$enable_dkim_verification = 0;
$QUARANTINEDIR = undef;
$virus_admin = undef;
$X_HEADER_LINE = "amavisd-new at $mydomain";
@bypass_spam_checks_maps = (1);
{virus}
1;
"""
BYPASS_VIRUS = "@bypass_virus_checks_maps = (1);\n@av_scanners = ();"
CLAMD = """@av_scanners = (['ClamAV-clamd', \\&ask_daemon, ["CONTSCAN {{}}\\n", '{socket}'],
  qr/\\bOK$/m, qr/\\bFOUND$/m, qr/^.*?: (?!Infected Archive)(.*) FOUND$/m]);
@av_scanners_backup = ();"""


class Amavisd:
    """amavisd in the foreground (`amavisd -c FILE foreground`) on a loopback `port`,
    forwarding to `next_hop` (a port on 127.0.0.1); `clamd`: a clamd socket path, or None to
    bypass virus checks."""

    def __init__(self, next_hop: int, max_servers: int, clamd: str | None = None,
                 max_requests: int = 1_000_000):
        self.port = free_port()
        self.next_hop = next_hop
        self.max_servers = max_servers
        self.max_requests = max_requests
        self.clamd = clamd
        # Under /tmp, not a caller's 0700 directory: amavisd's children must reach their
        # home. The config file is outside the home: amavisd refuses a config file in a
        # directory that its user may write.
        self.dir = Path(tempfile.mkdtemp(prefix="poolmgr-amavisd-"))
        os.chmod(self.dir, 0o755)
        self.home = self.dir / "home"
        self.home.mkdir()
        # clamd reads amavisd's files there (CONTSCAN): not where clamd is confined.
        self.tempbase = ram_directory("poolmgr-amavisd-tmp-", CLAMD_PROGRAM)
        self.config = self.dir / "amavisd.conf"
        self.log = self.home / "amavis.log"
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> Path:
        user = ""
        if os.geteuid() == 0:
            user = f"$daemon_user = '{AMAVIS_USER}';\n$daemon_group = '{AMAVIS_USER}';"
            entry = pwd.getpwnam(AMAVIS_USER)
            for path in (self.home, self.tempbase):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        virus = CLAMD.format(socket=self.clamd) if self.clamd else BYPASS_VIRUS
        self.config.write_text(CONFIG.format(
            home=self.home, tempbase=self.tempbase, user=user, port=self.port,
            max_servers=self.max_servers,
            max_requests=self.max_requests, next_hop=self.next_hop, virus=virus))
        return self.config

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []

    def start(self, timeout: float = 60.0) -> "Amavisd":
        if not os.access(AMAVISD, os.X_OK):
            raise FileNotFoundError(f"{AMAVISD} not found: install Debian's amavisd-new")
        self.write_config()
        out = open(self.dir / "amavisd.out", "ab")
        self.proc = subprocess.Popen([AMAVISD, "-c", str(self.config), "foreground"],
                                     stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        out.close()
        try:
            # Ready when it listens and all its children are forked (memory at rest).
            wait_until(lambda: self.proc.poll() is not None or
                       (listening(self.port) and len(self.children()) == self.max_servers),
                       timeout=timeout, interval=0.2, what="amavisd and its children")
        except WaitTimeout:
            self.stop()
            raise
        if self.proc.poll() is not None:
            said = "".join(p.read_text(errors="replace")[-2000:] for p in
                           (self.dir / "amavisd.out", self.log) if p.exists())
            self.stop()
            raise RuntimeError(f"amavisd exited with status {self.proc.returncode}:\n{said}")
        return self

    def stop(self) -> None:
        """SIGTERM to the master (Net::Server stops its children), then any child left over
        by its PID; the home goes with it."""
        children = self.children() if self.proc else []
        terminate(self.proc)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.tempbase, ignore_errors=True)

    def __enter__(self) -> "Amavisd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
