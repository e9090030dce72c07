"""The SMTP worker's session: the public side of poolmgr.

Policy on top of the shared dialogue: relay control (recipients only in `smtp.mydestination`
unless the client is in `smtp.mynetworks`, else 554 5.7.1), STARTTLS when a certificate is
configured, a `Received:` header, and at end of DATA the hand-off to the proxy filter (the
scanner pool) with XFORWARD, whose reply is passed to the client: 250 only when the next hop
accepted the message, 451 on any failure on the way.

Exports: FrontSession, FrontService.
"""

import ipaddress
import time

from .. import log, relay
from ..config import NextHop
from ..process import WorkerContext, limits_for
from . import replies as R
from .headers import received
from .parse import domain_of
from .protocol import BASE_COMMANDS, Command, Envelope, ServerSession


class FrontService:
    """Everything the sessions of one SMTP worker share."""

    def __init__(self, ctx: WorkerContext, tls_context):
        cfg = ctx.cfg
        self.cfg = cfg
        self.slot = ctx.slot
        self.hostname = cfg.smtp.hostname
        self.limits = limits_for(cfg)
        self.tls_context = tls_context
        self.log = log.get("smtpd")
        self.draining = False
        self.sessions: set[ServerSession] = set()
        self.mydestination = frozenset(cfg.smtp.mydestination)
        host, port = cfg.scanner.listen
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if host != "::" else "::1"
        self.proxy_filter: NextHop = cfg.smtp.proxy_filter or NextHop("smtp", host, port)


class FrontSession(ServerSession):
    __slots__ = ()

    def on_connect(self):
        self.service.slot.add("connections")
        return None

    def extensions(self):
        service = self.service
        ext = ["PIPELINING", f"SIZE {service.limits.message_size_limit}", "VRFY"]
        if service.tls_context is not None and not self.tls:
            ext.append("STARTTLS")
        return ext + ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]

    def check_rcpt(self, address: str):
        domain = domain_of(address)
        if not domain or domain in self.service.mydestination:
            return None
        client = ipaddress.ip_address(self.peer[0])
        if any(client in net for net in self.service.cfg.smtp.mynetworks):
            return None
        return R.R554_RELAY_DENIED.format(rcpt=address)

    def deliver(self, env: Envelope, data: bytes) -> list[R.Reply]:
        service = self.service
        started = time.monotonic()
        proto = self.proto + ("S" if self.tls else "")
        header = received(helo=self.helo, addr=self.peer[0], by=service.hostname,
                          software="poolmgr", proto=proto, queue_id=env.queue_id, rcpts=env.rcpts)
        xforward = {"NAME": "[UNAVAILABLE]", "ADDR": self.peer[0], "PORT": str(self.peer[1]),
                    "PROTO": self.proto, "HELO": self.helo or "", "IDENT": env.queue_id,
                    "SOURCE": "REMOTE"}
        outgoing = relay.Outgoing(env.mail_from, env.rcpts, header + data, env.smtputf8,
                                  env.body_8bit, xforward)
        service.slot.add("handoffs")
        try:
            final = R.combine(relay.send(service.proxy_filter, outgoing, helo=service.hostname,
                                         timeouts=service.cfg.timeouts,
                                         deadline=started + service.cfg.smtp.proxy_timeout))
        except relay.RelayError as exc:
            service.log.warning("%s: proxy filter %s failed at %s: %s", env.queue_id,
                                service.proxy_filter, exc.stage, exc.detail)
            final = R.R451_FILTER_UNAVAILABLE
        service.slot.add("handoff_wait_ms", int((time.monotonic() - started) * 1000))
        verb = "proxy-accept" if final.ok else "proxy-reject"
        counter = ("messages_accepted" if final.ok else
                   "messages_tempfailed" if final.temporary else "messages_rejected")
        service.slot.add(counter)
        service.log.info("%s: %s: END-OF-MESSAGE: %s; from=<%s> to=<%s> proto=%s helo=<%s>",
                         env.queue_id, verb, final, env.mail_from, env.rcpts[0], self.proto,
                         self.helo or "")
        return [final]


FrontSession.commands = {
    **BASE_COMMANDS,
    "STARTTLS": Command(FrontSession.do_starttls, "starttls", needs_tls_offer=True),
}
