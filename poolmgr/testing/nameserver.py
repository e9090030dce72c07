"""DNS servers for DNSBL and client name tests: a real one on a loopback UDP port (dnslib),
Debian's dnsmasq for the bench's floods (thousands of queries a second, in C, beside the
load), and one that is down.
"""

__all__ = ["DnsServer", "Dnsmasq", "SilentDns"]

import ipaddress
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from .wait import WaitTimeout, free_udp_port, terminate, wait_until

SO_RCVBUFFORCE = 33  # Linux's (socket(7)): root may pass net.core.rmem_max; Python names it not


class DnsServer:
    """A real DNS server on a loopback UDP port (dnslib), serving DNSBL-style A records, and
    PTR records for client names (`host_record`, `pointer`).

    `records` maps a name ("2.0.0.127.zen.test") to its addresses (IPv4 for A queries, IPv6
    for AAAA); other names are NXDOMAIN.
    `queries` lists every name asked, for cache tests. `failing`: every answer is SERVFAIL.
    """

    def __init__(self, records: dict[str, list[str]], ttl: int = 300,
                 host: str = "127.0.0.1", port: int | None = None, failing: bool = False):
        from dnslib import AAAA, PTR, QTYPE, RCODE, RR, A
        from dnslib.server import BaseResolver, DNSLogger
        from dnslib.server import DNSServer as LibServer

        server = self
        self.records = {name.lower().rstrip("."): list(addrs) for name, addrs in records.items()}
        self.queries: list[str] = []
        self.networks: dict[str, list[str]] = {}  # reversed-prefix suffix -> addresses
        self.pointers: dict[str, str] = {}  # "7.8.0.127.in-addr.arpa" -> its PTR's name
        self.host, self.port = host, port or free_udp_port(host)

        class Resolver(BaseResolver):
            def resolve(self, request, handler):
                reply = request.reply()
                name = str(request.q.qname).rstrip(".").lower()
                server.queries.append(name)
                if failing:
                    reply.header.rcode = RCODE.SERVFAIL
                    return reply
                pointer = server.pointers.get(name)
                if pointer is not None:
                    if request.q.qtype == QTYPE.PTR:
                        reply.add_answer(RR(request.q.qname, QTYPE.PTR, rdata=PTR(pointer),
                                            ttl=ttl))
                    return reply
                addresses = server.records.get(name)
                if addresses is None and server.networks:
                    addresses = next((a for suffix, a in server.networks.items()
                                      if name.endswith(suffix)), None)
                if addresses is None:
                    reply.header.rcode = RCODE.NXDOMAIN
                elif request.q.qtype in (QTYPE.A, QTYPE.AAAA):  # each of its family
                    v6 = request.q.qtype == QTYPE.AAAA
                    for address in addresses:
                        if (":" in address) == v6:
                            reply.add_answer(RR(request.q.qname, request.q.qtype,
                                                rdata=AAAA(address) if v6 else A(address),
                                                ttl=ttl))
                return reply

        self._server = LibServer(Resolver(), address=host, port=self.port,
                                 logger=DNSLogger(logf=lambda *args: None))
        # A burst of queries waits in the socket while this Python server answers them one
        # thread each: room for thousands (a busy CI machine dropped some of 200 at once).
        sock = self._server.server.socket
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
        except OSError:  # not root: as much as net.core.rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def list(self, ip: str, zone: str, *addresses: str) -> None:
        reverse = ".".join(reversed(ip.split(".")))
        self.records[f"{reverse}.{zone}"] = list(addresses or ["127.0.0.2"])

    def pointer(self, ip: str, name: str) -> None:
        """A PTR record for `ip` naming `name` (which need not resolve back)."""
        self.pointers[ipaddress.ip_address(ip).reverse_pointer] = name.lower().rstrip(".")

    def host_record(self, name: str, *ips: str) -> None:
        """A host as dnsmasq's --host-record gives it: `name` A (or AAAA) each of `ips`, and
        the PTR of each back to `name`."""
        self.records[name.lower().rstrip(".")] = list(ips)
        for ip in ips:
            self.pointer(ip, name)

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


DNSMASQ = "/usr/sbin/dnsmasq"


class Dnsmasq:
    """Debian's dnsmasq as the bench's DNS server: what `DnsServer` serves (listed networks
    under a DNSBL zone, NXDOMAIN for the rest of it and for every reverse name, TTL `ttl`),
    configured before `start` and answered in C, so that a flood's queries (a DNSBL query and
    a PTR query per new client, thousands a second) are answered rather than timed out.
    `queries` is read from its query log, as DnsServer's is kept."""

    def __init__(self, zone: str, ttl: int = 300, host: str = "127.0.0.1",
                 port: int | None = None):
        self.zone, self.ttl = zone, ttl
        self.host, self.port = host, port or free_udp_port(host)
        self.networks: dict[str, str] = {}  # "60.127" -> the address the names under it get
        self.dir = Path(tempfile.mkdtemp(prefix="poolmgr-dnsmasq-"))
        self.log = self.dir / "queries.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def list_network(self, prefix: str, zone: str, address: str = "127.0.0.2") -> None:
        """List every address that starts with `prefix` ("127.61."): before `start`."""
        assert zone == self.zone and self.proc is None
        octets = [o for o in prefix.split(".") if o]
        self.networks[".".join(reversed(octets))] = address

    def start(self, timeout: float = 10.0) -> "Dnsmasq":
        if not shutil.which(DNSMASQ):
            self.stop()
            raise FileNotFoundError(f"{DNSMASQ} not found: install Debian's dnsmasq-base")
        command = [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                   "--no-hosts", "--no-poll", "--pid-file=", "--user=", "--bind-interfaces",
                   f"--listen-address={self.host}", f"--port={self.port}",
                   f"--local-ttl={self.ttl}", f"--neg-ttl={self.ttl}", "--cache-size=0",
                   f"--local=/{self.zone}/", "--local=/in-addr.arpa/", "--local=/ip6.arpa/",
                   "--log-queries", f"--log-facility={self.log}", "--dns-forward-max=10000"]
        command += [f"--address=/{suffix}.{self.zone}/{address}"
                    for suffix, address in self.networks.items()]
        with open(self.dir / "stderr", "wb") as err:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_until(lambda: self.proc.poll() is not None or self._answers(),
                       timeout=timeout, interval=0.05, what="dnsmasq")
        except WaitTimeout:
            self.stop()
            raise
        if self.proc.poll() is not None:
            said = (self.dir / "stderr").read_text(errors="replace")[-500:]
            self.stop()
            raise RuntimeError(f"dnsmasq exited: {said}")
        return self

    def _answers(self) -> bool:
        import dns.message
        import dns.query

        try:
            dns.query.udp(dns.message.make_query(f"probe.{self.zone}", "A"), self.host,
                          port=self.port, timeout=0.2)
            return True
        except Exception:
            return False

    @property
    def queries(self) -> list[str]:
        """Every name asked, from the query log (but the probes of `start`)."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []
        names = (line.split()[-3] for line in lines if "]: query[" in line)
        return [name for name in names if name != f"probe.{self.zone}"]

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class SilentDns:
    """A bound UDP port that never answers: a DNS server that is down."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.address = f"{host}:{self.sock.getsockname()[1]}"

    def stop(self) -> None:
        self.sock.close()
