"""One DNS query, as the defences ask it (the DNSBL queries, the client's name).

`Stub` holds the name servers asked (`[defence] nameservers`, or the system's from
/etc/resolv.conf) and does one exchange: dnspython makes and reads the messages; the exchange
itself is a datagram on a socket of our own (gevent's, in an SMTP worker), which costs half of
what dnspython's stub resolver spends per query, the largest share of a storm connection's
CPU time. Each server is tried in turn, each for at most 2 s within the caller's deadline; a
truncated answer is asked again over TCP.
"""

__all__ = ["Stub"]

import socket
import time

TRY_TIMEOUT = 2.0  # seconds per server tried, within the caller's deadline


class Stub:
    def __init__(self, nameservers: tuple, timeout: float):
        import dns.resolver

        if nameservers:
            self.servers = [(host, port) for host, port in nameservers]
        else:  # the system's, from /etc/resolv.conf
            system = dns.resolver.Resolver()
            self.servers = [(str(ns), system.port) for ns in system.nameservers]
        self.try_timeout = min(TRY_TIMEOUT, timeout)

    def query(self, name: str, rdtype, deadline: float):
        """The answer (a dnspython Message, NOERROR or NXDOMAIN) from the first name server
        that gives one before `deadline`; None if none does."""
        import dns.exception
        import dns.flags
        import dns.message
        import dns.query
        import dns.rcode

        query = dns.message.make_query(name, rdtype)
        wire = query.to_wire()
        for host, port in self.servers:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(min(left, self.try_timeout))
                    sock.connect((host, port))
                    sock.send(wire)
                    while True:  # anything but the answer to this query is ignored
                        reply = dns.message.from_wire(sock.recv(65535), ignore_trailing=True)
                        if query.is_response(reply):
                            break
                if reply.flags & dns.flags.TC:
                    reply = dns.query.tcp(query, host, port=port,
                                          timeout=max(0.05, deadline - time.monotonic()))
            except (OSError, dns.exception.DNSException):  # a timeout is an OSError
                continue
            if reply.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return reply
        return None
