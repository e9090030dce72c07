"""The SMTP worker's session: the public side of poolmgr.

Policy on top of the shared dialogue: the storm defences at connect and around the banner
(allow/deny lists, the pregreet test with a two-part banner, DNSBL score; each verdict logged in
one line with client, test and action), relay control (recipients only in `smtp.mydestination`
unless the client is in `smtp.mynetworks`, else 554 5.7.1), STARTTLS when a certificate is
configured, a `Received:` header, and at end of DATA the hand-off to the proxy filter (the
scanner pool) with XFORWARD, whose reply is passed to the client: 250 only when the next hop
accepted the message, 451 on any failure on the way. When it closes, each session is counted
once as legit or with one nuisance reason.

Exports: FrontSession, FrontService.
"""

import time

from .. import log, relay
from ..config import NextHop, in_networks
from ..defence.policy import Defence, classify
from ..process import WorkerContext, limits_for
from . import replies as R
from .headers import received
from .parse import domain_of
from .protocol import BASE_COMMANDS, Command, Envelope, ServerSession


class FrontService:
    """Everything the sessions of one SMTP worker share."""

    def __init__(self, ctx: WorkerContext, tls_context, defence: Defence):
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
        self.defence = defence
        host, port = cfg.scanner.listen
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if host != "::" else "::1"
        self.proxy_filter: NextHop = cfg.smtp.proxy_filter or NextHop("smtp", host, port)


class FrontSession(ServerSession):
    __slots__ = ("verdict", "blocked", "trusted", "dnsbl_job", "accepted", "rejected")

    def __init__(self, service, sock, peer):
        super().__init__(service, sock, peer)
        self.verdict = ""       # the first nuisance test that fired
        self.blocked = ""       # why every RCPT is refused (enforce action), "" when not
        self.trusted = False    # allowlisted: skips every test
        self.dnsbl_job = None
        self.accepted = 0
        self.rejected = 0

    # -- defences
    def flag(self, test: str, action: str, what: str, reason: str):
        """Record a verdict and apply its action; returns the 521 reply for drop."""
        self.service.log.info("%s [%s]:%s; action=%s", what, self.peer[0], self.peer[1], action)
        self.verdict = self.verdict or test
        if action == "ignore":
            return None
        self.suspect()
        if action == "drop":
            self.ended = "dropped"
            return R.R521_BLOCKED.format(ip=self.peer[0], reason=reason)
        self.blocked = self.blocked or reason
        return None

    def suspect(self) -> None:
        self.conn.timeout = min(self.conn.timeout, self.service.defence.cfg.suspicious_timeout)

    def on_connect(self):
        service, ip = self.service, self.peer[0]
        service.slot.add("connections")
        defence = service.defence
        if defence.allowlisted(ip):
            self.trusted = True
            service.log.info("ALLOWLISTED [%s]:%s", ip, self.peer[1])
            return None
        if defence.denylisted(ip):
            refusal = self.flag("denylist", defence.cfg.denylist_action, "DENYLISTED", "denylist")
            if refusal is not None:
                return refusal
        if defence.dnsbl is not None:
            self.dnsbl_job = defence.spawn(defence.dnsbl.score, ip)
        return None

    def greet(self) -> None:
        service, ip = self.service, self.peer[0]
        defence = service.defence
        banner = R.R220_BANNER.format(host=service.hostname)
        if not self.trusted and defence.needs_greet_test(ip):
            # Two-part banner (postscreen): bots that talk at once show themselves.
            self.conn.write(f"220-{banner.text}\r\n".encode())
            started = time.monotonic()
            early = self.conn.wait_input(defence.cfg.greet_wait)
            if early:
                sample = self.conn.buf[:40].decode("ascii", "replace").rstrip()
                refusal = self.flag("pregreet", defence.cfg.greet_action,
                                    f"PREGREET {early} after {time.monotonic() - started:.2f} "
                                    f"({sample!r}) from", "pregreet test")
                if refusal is not None:
                    self.closing = True
                    self.reply(refusal)
                    return
            else:
                defence.greet_test_passed(ip)
        if self.dnsbl_job is not None and not self.trusted:
            refusal = self.settle_dnsbl()
            if refusal is not None:
                self.closing = True
                self.reply(refusal)
                return
        self.reply(banner)

    def settle_dnsbl(self):
        job, self.dnsbl_job = self.dnsbl_job, None
        job.join()  # Dnsbl.score is bounded by dnsbl_timeout
        if not job.successful():
            return None
        score, cfg = job.value, self.service.defence.cfg
        if score.unanswered:
            self.service.log.info("DNSBL no answer from %s for [%s]", ",".join(score.unanswered),
                                  self.peer[0])
        if cfg.dnsbl_allowlist_threshold < 0 and score.total <= cfg.dnsbl_allowlist_threshold:
            self.service.log.info("DNSBL allowlisted score %d for [%s]:%s: %s", score.total,
                                  self.peer[0], self.peer[1], score.describe())
            self.trusted = True
            if self.verdict == "pregreet":  # a good reputation outweighs the pregreet test
                self.verdict, self.blocked = "", ""
            return None
        if score.total >= cfg.dnsbl_threshold:
            sites = ",".join(h.split("(")[0] for h in score.hits)
            return self.flag("dnsbl", cfg.dnsbl_action,
                             f"DNSBL score {score.total} ({score.describe()}) for", sites)
        if score.total > 0:
            self.suspect()
        return None

    def on_close(self) -> None:
        commands = sum(total for _, total in (self.stats or {}).values())
        label = classify(self.verdict, self.accepted, self.rejected, self.transactions,
                         self.ended, commands)
        self.service.slot.add("legit" if label == "legit" else "nuisance_" + label)

    def extensions(self):
        service = self.service
        ext = ["PIPELINING", f"SIZE {service.limits.message_size_limit}", "VRFY"]
        if service.tls_context is not None and not self.tls:
            ext.append("STARTTLS")
        return ext + ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]

    def check_rcpt(self, address: str):
        if self.blocked:
            return R.R550_BLOCKED.format(ip=self.peer[0], reason=self.blocked)
        domain = domain_of(address)
        if not domain or domain in self.service.mydestination:
            return None
        if in_networks(self.peer[0], self.service.cfg.smtp.mynetworks):
            return None
        self.verdict = self.verdict or "relay_denied"
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
        if final.ok:
            self.accepted += 1
        elif not final.temporary:
            self.rejected += 1
        service.log.info("%s: %s: END-OF-MESSAGE: %s; from=<%s> to=<%s> proto=%s helo=<%s>",
                         env.queue_id, verb, final, env.mail_from, env.rcpts[0], self.proto,
                         self.helo or "")
        return [final]


FrontSession.commands = {
    **BASE_COMMANDS,
    "STARTTLS": Command(FrontSession.do_starttls, "starttls", needs_tls_offer=True),
}
