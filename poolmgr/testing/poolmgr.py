"""A real poolmgr for tests and the bench: `poolmgr run` in a subprocess with its own config,
loopback ports and directory, stopped by its PID.

The harness asks the control socket itself for the status (`status`, `wait_workers`): a
`poolmgr status` subprocess costs 0.2 s of Python start-up per poll. `run_cli` runs the real
command line, for the tests of the CLI.

Clients pass an explicit local hostname, HELO (smtplib would otherwise ask the system resolver,
which is off on these machines).
"""

__all__ = ["Poolmgr", "write_config", "HELO", "own_code_first"]

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

from .. import control
from ..config import toml_value
from ..smtp.haproxy import V2_SIGNATURE
from .wait import free_port, wait_until

HELO = "client.test"


def write_config(path: Path, sections: dict) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def own_code_first() -> dict[str, str]:
    """The environment for `python3 -m poolmgr` (or the bench's generator) in another
    directory: the poolmgr package this harness belongs to comes first on the path, not
    whichever one is installed (an editable install points at one checkout; a test run in
    another worktree must run its own code)."""
    tree = str(Path(__file__).resolve().parents[2])
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != tree]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([tree, *path])}


class Poolmgr:
    """A `poolmgr run` subprocess with its own config, ports and directory."""

    def __init__(self, workdir: Path, overrides: dict | None = None):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.smtp_port = free_port()
        self.scanner_port = free_port()
        self.maildir = self.dir / "maildir"
        self.sections = {
            "master": {"control_socket": str(self.dir / "ctl.sock"),
                       "pidfile": str(self.dir / "poolmgr.pid"), "graceful_timeout": "10s"},
            "smtp": {"listen": f"127.0.0.1:{self.smtp_port}", "hostname": "mx.example.test",
                     "mydestination": ["example.test", "localhost"],
                     "mynetworks": ["127.0.0.1/32"], "min_workers": 2, "max_workers": 6},
            "scanner": {"listen": f"127.0.0.1:{self.scanner_port}", "min_workers": 2,
                        "max_workers": 4, "next_hop": f"maildir:{self.maildir}"},
            # The greet test delays a new client's banner; tests of other things skip it. So
            # is the client's name: this config names no resolver, so the machine's would be
            # asked, and what it says (NXDOMAIN for all, here; where none answers, every banner
            # would wait reverse_timeout) is no test's business. Tests of names turn it on with
            # their own DNS server.
            "defence": {"greet_wait": "0s", "reverse_lookup": False},
        }
        for section, values in (overrides or {}).items():
            self.sections.setdefault(section, {}).update(values)
        self.config = self.dir / "poolmgr.toml"
        self._write_config()
        self.log_path = self.dir / "poolmgr.log"
        self.proc: subprocess.Popen | None = None

    def configure(self, section: str, **values) -> "Poolmgr":
        """Change settings before start (for values that need this instance's own ports)."""
        self.sections.setdefault(section, {}).update(values)
        self._write_config()
        return self

    def _write_config(self) -> None:
        """The config file; it logs to stderr, which is this harness's log file, unless the
        test names its own log or log_file (without a terminal poolmgr would use syslog)."""
        master = self.sections["master"]
        if "log" in master or "log_file" in master:
            write_config(self.config, self.sections)
        else:
            write_config(self.config, {**self.sections, "master": {**master, "log": "stderr"}})

    def start(self, wait: bool = True) -> "Poolmgr":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "poolmgr", "run", "-c",
                                      str(self.config)], stdout=self._log, stderr=self._log,
                                     cwd=self.dir, env=own_code_first())
        if wait:
            smtp = 0 if self.scanner_only else self.sections["smtp"]["min_workers"]
            scanner = self.sections["scanner"]["min_workers"]
            feeder = self.sections["scanner"].get("feeder_maxproc", 0)
            self.wait_workers(smtp, min(scanner, feeder) if feeder else scanner)
            wait_until(lambda: self.accepting(), what="SMTP banner")
        return self

    @property
    def scanner_only(self) -> bool:
        """No SMTP pool (`[smtp] listen = []` or `max_workers = 0`): the scanner pool alone."""
        smtp = self.sections["smtp"]
        return smtp.get("listen") == [] or smtp.get("max_workers") == 0

    def accepting(self) -> bool:
        """The public port answers with a banner (the scanner port's in scanner-only mode)."""
        port = self.scanner_port if self.scanner_only else self.smtp_port
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.settimeout(5)
                if port == self.smtp_port and self.sections["smtp"].get("proxy_protocol"):
                    sock.sendall(V2_SIGNATURE + b"\x20\x00\x00\x00")  # a LOCAL health check
                return sock.recv(100).startswith(b"220")
        except OSError:
            return False

    def run_cli(self, *args, check=False) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "poolmgr", *args, "-c", str(self.config)],
                              capture_output=True, text=True, timeout=30, check=check)

    def status(self) -> dict:
        """What `poolmgr status --json` prints, asked of the control socket directly."""
        answer = control.request(self.sections["master"]["control_socket"], {"cmd": "status"})
        if not answer.get("ok"):
            raise control.ControlError(f"status refused: {answer.get('message')}")
        return answer["status"]

    def cli_status(self) -> dict:
        """The same through the real command line (`poolmgr status --json`)."""
        return json.loads(self.run_cli("status", "--json", check=True).stdout)

    def try_status(self) -> dict | None:
        """The status, or None while the master is not (yet) answering."""
        try:
            return self.status()
        except control.ControlError:
            return None

    def wait_workers(self, smtp: int, scanner: int, timeout: float = 20.0) -> dict:
        def ready():
            status = self.try_status()
            if status and status["pools"]["smtp"]["workers"] == smtp and \
                    status["pools"]["scanner"]["workers"] == scanner and \
                    status["pools"]["smtp"]["draining"] == 0 and \
                    status["pools"]["scanner"]["draining"] == 0:
                return status
            return None
        return wait_until(ready, timeout, 0.05, f"{smtp} smtp and {scanner} scanner workers")

    def worker_pids(self, kind: str) -> list[int]:
        return [w["pid"] for w in self.status()["pools"][kind]["worker_list"]
                if w["state"] == "running"]

    def send_signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def delivered(self) -> list[bytes]:
        new = self.maildir / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def smtp(self, source: str = "127.0.0.1", timeout: float = 30) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=timeout, local_hostname=HELO,
                            source_address=(source, 0))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise

    def kill_all(self) -> None:
        """Last resort in teardown: kill the master and its workers by PID."""
        if self.proc is None:
            return
        try:
            import psutil
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except Exception:
            children = []
        for proc in [self.proc, *children]:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(10)
