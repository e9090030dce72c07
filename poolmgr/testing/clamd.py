"""A private ClamAV clamd (Debian's clamav-daemon): its own clamd.conf, socket, log and a
signature database holding only a local signature for the EICAR test string, so nothing is
downloaded and it starts in a few seconds. Its TemporaryDirectory (a directory made and
removed for every scan) is in memory (`wait.ram_directory`).

The signature is an `.ndb` body signature (any file type, any offset), so clamd finds EICAR in
base64 MIME attachments and in zip archives too, after decoding them itself. clamd reports
signatures from unsigned databases with an `.UNOFFICIAL` suffix: `EICAR_NAME.UNOFFICIAL`.
"""

__all__ = ["Clamd", "CLAMD", "EICAR_NAME", "ping"]

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from ..scanner.backends.builtin import EICAR
from .wait import WaitTimeout, free_port, ram_directory, terminate, wait_until

EICAR_NAME = "Poolmgr.Test.Eicar"
CLAMD = "/usr/sbin/clamd"


def ping(address: str, timeout: float = 2.0) -> bool:
    """Whether clamd at `unix:PATH` or `host:port` answers zPING with PONG."""
    try:
        if address.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = address[5:]
        else:
            host, _, port = address.rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (host, int(port))
        with sock:
            sock.settimeout(timeout)
            sock.connect(target)
            sock.sendall(b"zPING\0")
            return sock.recv(64).rstrip(b"\0") == b"PONG"
    except OSError:
        return False


class Clamd:
    """clamd in the foreground on a Unix socket (`address`) and, with `tcp`, also on a
    loopback port (`tcp_address`). `stream_max_length` is clamd.conf's StreamMaxLength
    ("1K", "25M"); None keeps clamd's default (25M)."""

    def __init__(self, workdir: Path | None = None, tcp: bool = False,
                 stream_max_length: str | None = None):
        # A directory of our own: the socket path must stay under the 107-byte limit.
        self.dir = Path(tempfile.mkdtemp(prefix="poolmgr-clamd-", dir=workdir))
        self.socket = self.dir / "clamd.ctl"
        self.address = f"unix:{self.socket}"
        self.port = free_port() if tcp else None
        self.tcp_address = f"127.0.0.1:{self.port}" if tcp else None
        self.stream_max_length = stream_max_length
        self.log = self.dir / "clamd.log"
        self.proc: subprocess.Popen | None = None
        self.scratch: Path | None = None

    def write_config(self) -> Path:
        db = self.dir / "db"
        db.mkdir(exist_ok=True)
        self.scratch = self.scratch or ram_directory("poolmgr-clamd-tmp-", CLAMD)
        # NAME:TARGET:OFFSET:HEXSIG; target 0 is any file type, offset * anywhere.
        (db / "poolmgr-test.ndb").write_text(f"{EICAR_NAME}:0:*:{EICAR.hex()}\n")
        lines = ["Foreground yes",
                 f"LocalSocket {self.socket}",
                 f"DatabaseDirectory {db}",
                 f"LogFile {self.log}",
                 f"PidFile {self.dir / 'clamd.pid'}",
                 f"TemporaryDirectory {self.scratch}",
                 # No User line: clamd keeps the identity it was started with (no drop to
                 # clamav, who could not read this directory).
                 "SelfCheck 0"]
        if self.port:
            lines += [f"TCPSocket {self.port}", "TCPAddr 127.0.0.1"]
        if self.stream_max_length:
            lines.append(f"StreamMaxLength {self.stream_max_length}")
        conf = self.dir / "clamd.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 60.0) -> "Clamd":
        if not os.access(CLAMD, os.X_OK):
            raise FileNotFoundError(f"{CLAMD} not found: install Debian's clamav-daemon")
        conf = self.write_config()
        self.proc = subprocess.Popen([CLAMD, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: self.proc.poll() is not None or ping(self.address),
                       timeout=timeout, interval=0.2, what="clamd")
        except WaitTimeout:
            self.stop()
            raise
        if self.proc.poll() is not None:
            log = self.log.read_text() if self.log.exists() else ""
            self.stop()
            raise RuntimeError(f"clamd exited with status {self.proc.returncode}:\n{log}")
        return self

    def stop(self) -> None:
        terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> "Clamd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
