"""Start real poolmgr and smtp-sink processes on free loopback ports (tests and bench).

Every process started here is stopped by its PID. Clients pass an explicit local hostname
(smtplib would otherwise ask the system resolver, which is off on these machines).

Exports: Poolmgr, Sink, Postfix, DnsServer, SilentDns, free_port, wait_until, write_config,
HELO.
"""

import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELO = "client.test"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


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
            # The greet test delays a new client's banner; tests of other things skip it.
            "defence": {"greet_wait": "0s"},
        }
        for section, values in (overrides or {}).items():
            self.sections.setdefault(section, {}).update(values)
        self.config = write_config(self.dir / "poolmgr.toml", self.sections)
        self.log_path = self.dir / "poolmgr.log"
        self.proc: subprocess.Popen | None = None

    def configure(self, section: str, **values) -> "Poolmgr":
        """Change settings before start (for values that need this instance's own ports)."""
        self.sections.setdefault(section, {}).update(values)
        write_config(self.config, self.sections)
        return self

    def start(self, wait: bool = True) -> "Poolmgr":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "poolmgr", "run", "-c",
                                      str(self.config)], stdout=self._log, stderr=self._log,
                                     cwd=self.dir)
        if wait:
            smtp = self.sections["smtp"]["min_workers"]
            scanner = self.sections["scanner"]["min_workers"]
            self.wait_workers(smtp, scanner)
            wait_until(lambda: self.accepting(), what="SMTP banner")
        return self

    def accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=5) as sock:
                sock.settimeout(5)
                return sock.recv(100).startswith(b"220")
        except OSError:
            return False

    def run_cli(self, *args, check=False) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "poolmgr", *args, "-c", str(self.config)],
                              capture_output=True, text=True, timeout=30, check=check)

    def status(self) -> dict:
        result = self.run_cli("status", "--json", check=True)
        return json.loads(result.stdout)

    def try_status(self) -> dict | None:
        try:
            return self.status()
        except subprocess.CalledProcessError:
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
        return wait_until(ready, timeout, 0.2, f"{smtp} smtp and {scanner} scanner workers")

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


class Sink:
    """Postfix's smtp-sink on a loopback port, dumping each message to a file."""

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None):
        self.port = port or free_port()
        # smtp-sink drops privileges to nobody when run as root: pytest's tmp dirs are 0700,
        # so the dumps go to a directory of their own that nobody can reach.
        self.dir = Path(tempfile.mkdtemp(prefix=f"poolmgr-sink-{self.port}-"))
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
        wait_until(self._up, what="smtp-sink")
        return self

    def _up(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
            return True
        except OSError:
            return False

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dir.iterdir()) if p.is_file()]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


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


class DnsServer:
    """A real DNS server on a loopback UDP port (dnslib), serving DNSBL-style A records.

    `records` maps a name ("2.0.0.127.zen.test") to its addresses; other names are NXDOMAIN.
    `queries` lists every name asked, for cache tests.
    """

    def __init__(self, records: dict[str, list[str]], ttl: int = 300,
                 host: str = "127.0.0.1", port: int | None = None):
        from dnslib import QTYPE, RCODE, RR, A
        from dnslib.server import BaseResolver, DNSLogger
        from dnslib.server import DNSServer as LibServer

        server = self
        self.records = {name.lower().rstrip("."): list(addrs) for name, addrs in records.items()}
        self.queries: list[str] = []
        self.networks: dict[str, list[str]] = {}  # reversed-prefix suffix -> addresses
        self.host, self.port = host, port or free_udp_port(host)

        class Resolver(BaseResolver):
            def resolve(self, request, handler):
                reply = request.reply()
                name = str(request.q.qname).rstrip(".").lower()
                server.queries.append(name)
                addresses = server.records.get(name)
                if addresses is None and server.networks:
                    addresses = next((a for suffix, a in server.networks.items()
                                      if name.endswith(suffix)), None)
                if addresses is None:
                    reply.header.rcode = RCODE.NXDOMAIN
                elif request.q.qtype == QTYPE.A:
                    for address in addresses:
                        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=ttl))
                return reply

        self._server = LibServer(Resolver(), address=host, port=self.port,
                                 logger=DNSLogger(logf=lambda *args: None))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def list(self, ip: str, zone: str, *addresses: str) -> None:
        reverse = ".".join(reversed(ip.split(".")))
        self.records[f"{reverse}.{zone}"] = list(addresses or ["127.0.0.2"])

    def list_network(self, prefix: str, zone: str, *addresses: str) -> None:
        """List every address that starts with `prefix` ("127.61."): a whole network."""
        octets = [o for o in prefix.split(".") if o]
        suffix = "." + ".".join(reversed(octets)) + f".{zone}"
        self.networks[suffix] = list(addresses or ["127.0.0.2"])

    def start(self) -> "DnsServer":
        self._server.start_thread()
        return self

    def stop(self) -> None:
        self._server.stop()
        self._server.server.server_close()


class SilentDns:
    """A bound UDP port that never answers: a DNS server that is down."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.address = f"{host}:{self.sock.getsockname()[1]}"

    def stop(self) -> None:
        self.sock.close()


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
