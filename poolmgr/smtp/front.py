"""The SMTP worker's session: the public side of poolmgr.

The shared dialogue plus the SMTP pool's policy, through the dialogue's hooks: the storm
defences (`defence.early` at connect and around the banner, `defence.limits` in the dialogue,
both working on the session's `defence.screening.Screening`). Each hook hands a defence what
it reads (the client, the command, the input waiting) and returns the defence's
`defence.decision.Decision`, which the dialogue (`protocol.ServerSession.apply`) carries
out: no defence writes to the session. Also STARTTLS when a certificate is
configured, a `Received:` header, and at end of DATA the hand-off to the proxy filter (the
scanner pool) with XFORWARD, whose reply is passed to the client: 250 only when the next hop
accepted the message, 451 on any failure on the way. The hand-off's rules (the gate whose
turns it takes, the kept connections, the XFORWARD attributes) are `handoff`'s. When it
closes, each session is counted once as legit or with one nuisance reason
(`defence.verdicts.classify`).
"""

__all__ = ["FrontSession", "FrontService"]

import time
from typing import Callable

from .. import handoff, log
from . import dsn, haproxy, relay
from ..defence import early, limits
from ..defence.clientstate import ClientState
from ..defence.decision import Decision
from ..defence.policy import Defence
from ..defence.screening import Screening
from ..defence.verdicts import LEGIT, classify
from ..worker import WorkerContext, limits_for
from . import replies as R
from .headers import received
from .park import Parking
from .protocol import BASE_COMMANDS, Command, Envelope, ServerSession


class FrontService:
    """Everything the sessions of one SMTP worker share."""

    def __init__(self, ctx: WorkerContext, tls_context, defence: Defence,
                 anvil: ClientState | None = None):
        cfg = ctx.cfg
        self.cfg = cfg
        self.slot = ctx.slot
        self.hostname = cfg.smtp.hostname
        self.limits = limits_for(cfg)
        self.tls_context = tls_context
        self.log = log.get("smtpd")
        self.draining = False
        self.sessions: set[ServerSession] = set()  # running and parked
        self.greeting = 0  # sessions accepted whose banner has not gone out yet
        self.parking: Parking | None = None  # set by the SMTP worker (gevent)
        self.handoff_gate: handoff.HandoffGate | None = None  # likewise
        self.on_room: Callable[[], None] | None = None  # one closed or greeted (the worker's)
        self.mydestination = frozenset(cfg.smtp.mydestination)
        self.defence = defence
        self.anvil = anvil
        d = cfg.defence
        self.rate_limited = anvil is not None and any(
            (d.client_connection_count_limit, d.client_connection_rate_limit,
             d.client_message_rate_limit, d.client_recipient_rate_limit))
        self.recipients = d.recipient_table
        # The hand-off's next hop, and the connections to it kept between messages.
        self.proxy_filter = handoff.proxy_filter(cfg)
        self.relay_cache = handoff.kept_connections(cfg)

    def greeted(self) -> None:
        """A session's banner went out, or it ended before: the worker may accept more."""
        self.greeting -= 1
        if self.on_room is not None:
            self.on_room()

    def closed(self, session: ServerSession) -> None:
        self.sessions.discard(session)
        self.slot.set_sessions(len(self.sessions))
        if self.on_room is not None:
            self.on_room()


class FrontSession(ServerSession):
    """An SMTP session of the SMTP pool; its defence state is `screening`, and the defence
    tests live in `defence.early` and `defence.limits`: the hooks below give them what they
    read and return their decisions to the dialogue, which applies them."""

    __slots__ = ("screening", "accepted", "rejected", "greeting", "balancer")

    def __init__(self, service, sock, peer):
        super().__init__(service, sock, peer)
        self.screening = Screening(service.defence.cfg, self.peer, service.log,
                                   service.slot.stress())
        self.accepted = 0
        self.rejected = 0
        self.greeting = True  # counted in service.greeting until its banner goes out
        service.greeting += 1
        self.balancer = False  # the load balancer's own connection (its health check)

    def run(self) -> None:
        """Behind a load balancer (`smtp.proxy_protocol`), the client's address comes first,
        in the PROXY header: it replaces the balancer's before anything reads it."""
        if self.service.cfg.smtp.proxy_protocol:
            self.resume(self.behind_proxy)
        else:
            super().run()

    def behind_proxy(self) -> None:
        service = self.service
        header = haproxy.take_header(self.conn, self.peer, service.cfg.smtp, service.log)
        if header is None:
            self.closing, self.ended = True, "refused"
            self.say_last(R.R421_NO_RESOURCES)
            return
        # A LOCAL header (HAProxy's health checks with send-proxy-v2) is the balancer's own
        # connection: trusted as an allowlisted client is, and counted as a health check,
        # neither as a client nor as nuisance.
        self.balancer = header.local
        self.set_peer(header.client or self.peer)
        # Its defence state starts now, with the client's address (and its clock: the
        # reverse lookup's time runs from here).
        self.screening = Screening(service.defence.cfg, self.peer, service.log,
                                   service.slot.stress())
        if not self.looks_up_name():
            self.log_connect()
        self.open()

    def looks_like_nuisance(self, silent_since: float) -> bool:
        return not self.balancer and \
            self.screening.looks_like_nuisance(silent_since, self.stats is None)

    def looks_up_name(self) -> bool:
        return self.service.defence.names is not None

    # -- hooks of the dialogue: what each defence reads, and its decision
    def on_connect(self) -> Decision | None:
        if self.balancer:
            self.screening.trust()
            return None
        self.service.slot.add("connections")
        return early.on_connect(self.screening, self.service, self.peer, self.client)

    def before_banner(self) -> Decision | None:
        return early.before_banner(self.screening, self.service.defence, self.peer[0])

    def after_pause(self, arrived: int, waited: float) -> Decision | None:
        return early.after_pause(self.screening, self.service, self.peer, arrived, waited,
                                 self.conn.buf)

    def unpaused(self) -> Decision | None:
        return early.unpaused(self.screening, self.service, self.peer, self.conn.wait_input(0))

    def screen(self, verb: str, command: Command | None) -> Decision | None:
        return limits.screen(self.screening, self.service.log, self.client, verb, command,
                             self.helo, self.proto, self.conn.buf)

    def check_mail(self, address: str) -> Decision | None:
        return limits.check_mail(self.screening, self.service, self.peer, self.client, address)

    def check_rcpt(self, address: str) -> Decision | None:
        return limits.check_rcpt(self.screening, self.service, self.peer, self.client, address)

    def after_command(self) -> Decision | None:
        return limits.after_command(self.screening, self.service.log, self.client,
                                    self.last_cmd, self.transactions, self.closing,
                                    self.service.hostname)

    def before_reply(self, reply: R.Reply) -> Decision | None:
        return limits.before_reply(self.screening, reply, self.closing)

    def log_reject(self, stage: str, reply: R.Reply, rcpt: str | None = None,
                   sender: str | None = None) -> None:
        """RCPT refused after an enforce action: postscreen's line (its SMTP engine refuses
        there, fail2ban's postfix filter knows the shape); every other refusal is smtpd's."""
        if stage != "RCPT" or rcpt is None or reply != self.screening.enforced():
            super().log_reject(stage, reply, rcpt, sender)
            return
        self.service.log.info("NOQUEUE: reject: RCPT from [%s]:%s: %s; from=<%s>, to=<%s>, "
                              "proto=%s, helo=<%s>", self.peer[0], self.peer[1], reply,
                              self.env.mail_from if self.env else "", rcpt, self.proto,
                              self.helo or "")

    def on_banner(self) -> None:
        if self.greeting:
            self.greeting = False
            self.service.greeted()

    def on_close(self) -> None:
        if self.greeting:  # it ended before its banner
            self.greeting = False
            self.service.greeting -= 1
        self.service.closed(self)
        screening = self.screening
        limits.closed(screening, self.service, self.peer, self.client, self.transactions,
                      self.accepted)
        commands = sum(total for _, total in (self.stats or {}).values())
        label = classify(screening.verdict, self.accepted, self.rejected, self.transactions,
                         self.ended, commands)
        if self.balancer and label != LEGIT:
            self.service.slot.add("health_checks")
        else:
            self.service.slot.add(label if label == LEGIT else "nuisance_" + label)

    def extensions(self):
        service = self.service
        ext = ["PIPELINING", f"SIZE {service.limits.message_size_limit}", "VRFY"]
        if service.tls_context is not None and not self.tls:
            ext.append("STARTTLS")
        return ext + ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]

    def deliver(self, env: Envelope, data: bytes) -> list[R.Reply]:
        service = self.service
        started = time.monotonic()
        proto = self.proto + ("S" if self.tls else "")
        header = received(helo=self.helo, addr=self.peer[0], by=service.hostname,
                          software="poolmgr", proto=proto, queue_id=env.queue_id, rcpts=env.rcpts,
                          name=self.name or "unknown")
        xforward = handoff.xforward(ident=env.queue_id, addr=self.peer[0], port=self.peer[1],
                                    proto=self.proto, helo=self.helo, name=self.name)
        outgoing = relay.Outgoing(env.mail_from, env.rcpts, header + data, env.smtputf8,
                                  env.body_8bit, xforward)
        service.slot.add("handoffs")
        hop, timeouts = service.proxy_filter, service.cfg.timeouts
        limit = service.cfg.smtp.proxy_timeout
        gate = service.handoff_gate
        try:
            if gate is not None:
                entered = gate.enter(limit)
                service.slot.add("handoff_queue_us", int((time.monotonic() - started) * 1e6))
                if not entered:
                    raise relay.RelayError("waiting for a scanner", f"none free in {limit:g}s")
            try:
                replies = relay.send(hop, outgoing, helo=service.hostname, timeouts=timeouts,
                                     deadline=started + limit, cache=service.relay_cache,
                                     chunking=True)
            finally:
                if gate is not None:
                    gate.leave()
            # An LMTP proxy filter answers per recipient; the client gets one reply.
            final = R.combine(dsn.settle(
                replies, hop=hop, mail_from=env.mail_from, rcpts=env.rcpts,
                queue_id=env.queue_id, data=outgoing.data, smtputf8=env.smtputf8,
                hostname=service.hostname, timeouts=timeouts,
                deadline=time.monotonic() + limit, log=service.log, cache=service.relay_cache))
        except relay.RelayError as exc:
            service.log.warning("%s: proxy filter %s failed at %s: %s", env.queue_id,
                                service.proxy_filter, exc.stage, exc.detail)
            final = R.R451_FILTER_UNAVAILABLE
        waited = time.monotonic() - started
        service.slot.add("handoff_wait_ms", int(waited * 1000))
        service.slot.observe("handoff", waited)
        verb = "proxy-accept" if final.ok else "proxy-reject"
        counter = ("messages_accepted" if final.ok else
                   "messages_tempfailed" if final.temporary else "messages_rejected")
        service.slot.add(counter)
        if final.ok:
            self.accepted += 1
            limits.delivered(self.screening)
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
