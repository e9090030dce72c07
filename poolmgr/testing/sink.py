"""Postfix's smtp-sink on a loopback port: the next hop that accepts everything.
"""

__all__ = ["Sink"]

import os
import shutil
import subprocess
from pathlib import Path

from .wait import free_port, listening, ram_directory, wait_until


class Sink:
    """Postfix's smtp-sink on a loopback port, dumping each message to a file."""

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None):
        self.port = port or free_port()
        # smtp-sink drops privileges to nobody when run as root: pytest's tmp dirs are 0700,
        # so the dumps go to a directory of their own that nobody can reach, in memory (a
        # file made per message: the bench's peers share the sink, not the disk's costs).
        self.dir = ram_directory(f"poolmgr-sink-{self.port}-")
        os.chmod(self.dir, 0o777)
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Sink":
        command = [shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]
        command += ["-d", str(self.dir / "%Y%m%d%H%M%S."), *self.extra,
                    f"127.0.0.1:{self.port}", "256"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(lambda: listening(self.port), what="smtp-sink")
        return self

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dir.iterdir()) if p.is_file()]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
