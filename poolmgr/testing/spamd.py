"""SpamAssassin's spamd on a loopback port, with a private site config: local tests only (no DNS,
no network tests, no Bayes, no auto-learning, no rule updates), so its scores depend on the
installed rules alone (Debian's spamassassin ships them in /usr/share/spamassassin).
"""

__all__ = ["Spamd", "ping"]

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from .wait import free_port, terminate, wait_until

# The plugins spamd loads come from the *.pre files of its site config; the private one starts
# from the system's.
SYSTEM_SITE = Path("/etc/spamassassin")

LOCAL_CF = """\
use_bayes 0
bayes_auto_learn 0
skip_rbl_checks 1
dns_available no
"""


def ping(port: int, host: str = "127.0.0.1") -> bool:
    """Whether spamd on the port answers PING with PONG."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
            return sock.recv(100).startswith(b"SPAMD/1.5 0 PONG")
    except OSError:
        return False


class Spamd:
    """spamd (/usr/sbin/spamd) on 127.0.0.1:port and on the UNIX socket `socket`, logging to
    `log()`."""

    def __init__(self, port: int | None = None, max_children: int = 2,
                 extra_cf: str = "", extra: list[str] | None = None):
        self.port = port or free_port()
        self.max_children = max_children
        # spamd runs as nobody when started as root: pytest's tmp dirs are 0700, so it gets a
        # directory of its own, readable by all.
        self.dir = Path(tempfile.mkdtemp(prefix=f"poolmgr-spamd-{self.port}-"))
        os.chmod(self.dir, 0o755)
        self.socket = self.dir / "socket"
        self.extra_cf = extra_cf
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "Spamd":
        program = shutil.which("spamd") or "/usr/sbin/spamd"
        if not os.path.exists(program):
            raise FileNotFoundError("spamd is not installed (Debian packages spamd, "
                                    "spamassassin)")
        site = self.dir / "site"
        site.mkdir()
        for pre in SYSTEM_SITE.glob("*.pre"):
            shutil.copy(pre, site)
        (site / "local.cf").write_text(LOCAL_CF + self.extra_cf)
        command = [program, f"--listen=127.0.0.1:{self.port}", f"--listen={self.socket}",
                   f"--siteconfigpath={site}",
                   f"--max-children={self.max_children}", f"--min-children={self.max_children}",
                   f"--pidfile={self.dir / 'pid'}", "--local", f"--syslog={self.dir / 'log'}",
                   "--nouser-config", f"--helper-home-dir={self.dir}", *self.extra]
        if os.geteuid() == 0:
            command += ["--username=nobody"]
        with open(self.dir / "stderr", "wb") as stderr:
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                                         cwd=self.dir)
        try:
            wait_until(lambda: self.proc.poll() is not None or ping(self.port), timeout=timeout,
                       interval=0.2, what="spamd to answer PING")
        except Exception:
            self.stop(keep=True)
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"spamd exited with status {self.proc.returncode}: "
                               f"{self.stderr()[-2000:]}")
        return self

    def log(self) -> str:
        path = self.dir / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stderr(self) -> str:
        path = self.dir / "stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, keep: bool = False) -> None:
        """Stop spamd by its pid (it stops its children), and remove its directory."""
        terminate(self.proc)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)
