"""The SMTP worker's session: the public side of poolmgr.

Policy on top of the shared dialogue: the storm defences at connect and around the banner
(allow/deny lists, per-client limits kept by the master's anvil, the pregreet test with a
two-part banner, DNSBL score; each verdict logged in one line with client, test and action),
error and junk-command limits, improper pipelining, recipient validation, short timeouts and
a tarpit for suspicious clients, stress mode, relay control (recipients only in `smtp.mydestination`
unless the client is in `smtp.mynetworks`, else 554 5.7.1), STARTTLS when a certificate is
configured, a `Received:` header, and at end of DATA the hand-off to the proxy filter (the
scanner pool) with XFORWARD, whose reply is passed to the client: 250 only when the next hop
accepted the message, 451 on any failure on the way. When it closes, each session is counted
once as legit or with one nuisance reason.

Exports: FrontSession, FrontService.
"""

import time

from .. import log, relay
from ..anvil import AnvilClient
from ..config import NextHop, in_networks
from ..defence.policy import Defence, classify
from ..worker import WorkerContext, limits_for
from . import replies as R
from .headers import received
from .parse import domain_of
from .protocol import BASE_COMMANDS, Command, Envelope, ServerSession


class FrontService:
    """Everything the sessions of one SMTP worker share."""

    def __init__(self, ctx: WorkerContext, tls_context, defence: Defence,
                 anvil: AnvilClient | None = None):
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
        self.anvil = anvil
        d = cfg.defence
        self.rate_limited = anvil is not None and any(
            (d.client_connection_count_limit, d.client_connection_rate_limit,
             d.client_message_rate_limit, d.client_recipient_rate_limit))
        self.recipients = d.recipient_table
        host, port = cfg.scanner.listen
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if host != "::" else "::1"
        self.proxy_filter: NextHop = cfg.smtp.proxy_filter or NextHop("smtp", host, port)


ANVIL_TIMEOUT = 2.0


class FrontSession(ServerSession):
    __slots__ = ("verdict", "blocked", "trusted", "exempt", "dnsbl_job", "accepted", "rejected",
                 "suspicious", "errors", "junk", "bad_rcpts", "anvil_held", "early", "started",
                 "hard_limit", "junk_limit")

    def __init__(self, service, sock, peer):
        super().__init__(service, sock, peer)
        self.verdict = ""       # the first nuisance test that fired
        self.blocked = ""       # why every RCPT is refused (enforce action), "" when not
        self.trusted = False    # allowlisted: skips every test
        self.exempt = False     # allowlisted or in mynetworks: no anvil limits
        self.dnsbl_job = None
        self.accepted = 0
        self.rejected = 0
        self.suspicious = False
        self.errors = 0         # 4xx/5xx replies (and junk commands past the limit)
        self.junk = 0
        self.bad_rcpts = 0      # recipients unknown in the recipient table
        self.anvil_held = False
        self.early = False      # talked before the banner (greet test not run)
        self.started = time.monotonic()
        d = service.defence.cfg
        self.hard_limit, self.junk_limit = d.hard_error_limit, d.junk_command_limit
        if service.slot.stress():  # as Postfix's ${stress?...}: read when the session starts
            self.conn.timeout = min(self.conn.timeout, d.stress_timeout)
            self.hard_limit, self.junk_limit = (d.stress_hard_error_limit,
                                                d.stress_junk_command_limit)

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
        """Short timeout, and the tarpit if configured."""
        self.suspicious = True
        self.conn.timeout = min(self.conn.timeout, self.service.defence.cfg.suspicious_timeout)

    def looks_like_nuisance(self, silent_since: float) -> bool:
        """For the autoscaler's live nuisance ratio: a test fired, or silent since connect."""
        return bool(self.verdict) or self.suspicious or (
            self.stats is None and self.started < silent_since)

    def on_connect(self):
        service, ip = self.service, self.peer[0]
        service.slot.add("connections")
        defence = service.defence
        if defence.allowlisted(ip):
            self.trusted = self.exempt = True
            service.log.info("ALLOWLISTED [%s]:%s", ip, self.peer[1])
            return None
        if defence.denylisted(ip):
            refusal = self.flag("denylist", defence.cfg.denylist_action, "DENYLISTED", "denylist")
            if refusal is not None:
                return refusal
        self.exempt = in_networks(ip, service.cfg.smtp.mynetworks)
        if service.rate_limited and not self.exempt:
            refusal = self.check_anvil_connect()
            if refusal is not None:
                return refusal
        if defence.dnsbl is not None:
            self.dnsbl_job = defence.spawn(defence.dnsbl.score, ip)
        return None

    def check_anvil_connect(self):
        d, ip = self.service.defence.cfg, self.peer[0]
        usage = self.service.anvil.connect(ip)
        if usage is None:
            return None
        self.anvil_held = True
        for limit, value, what in ((d.client_connection_count_limit, usage.count, "concurrency"),
                                   (d.client_connection_rate_limit, usage.rate, "rate")):
            if limit and value > limit:
                self.service.log.warning("Connection %s limit exceeded: %d from %s for service "
                                         "smtp", what, value, self.client)
                self.verdict = "rate_limit"
                return R.R421_TOO_MANY_CONNECTIONS.format(host=self.service.hostname, ip=ip)
        return None

    def check_anvil_rate(self, limit: int, ask, what: str, refusal: R.Reply):
        if not limit or self.exempt or not self.service.rate_limited:
            return None
        rate = ask(self.peer[0])
        if rate is None or rate <= limit:
            return None
        self.service.log.warning("%s rate limit exceeded: %d from %s for service smtp", what,
                                 rate, self.client)
        self.verdict = self.verdict or "rate_limit"
        return refusal.format(ip=self.peer[0])

    def check_mail(self, address: str):
        anvil = self.service.anvil
        return self.check_anvil_rate(self.service.defence.cfg.client_message_rate_limit,
                                     anvil and anvil.message, "Message delivery",
                                     R.R450_MESSAGE_RATE)

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
        elif not self.trusted:
            self.early = bool(self.conn.wait_input(0))
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

    # -- the dialogue: pipelining, junk and error limits, tarpit
    def screen(self, verb: str, command: Command | None):
        # Input after a command flagged `last` is improper pipelining (QUIT needs no answer;
        # input sent after STARTTLS is discarded, CVE-2011-0411, rather than refused).
        if not self.trusted and (self.early or (self.conn.buf and verb != "QUIT" and (
                (command and command.last) or self.helo is None or self.proto != "ESMTP"))):
            if self.improper_pipelining(verb):
                return R.R503_PIPELINING
        if command and command.junk:
            self.junk += 1
            if self.junk > self.junk_limit:
                self.errors += 1
        return None

    def after_command(self) -> None:
        if self.errors >= self.hard_limit and not self.closing and not self.trusted:
            self.service.log.info("too many errors after %s from %s", self.last_cmd, self.client)
            if not self.verdict:
                self.verdict = ("bad_recipients" if self.bad_rcpts and not self.transactions else
                                "junk_commands" if self.junk > self.junk_limit else
                                "hard_errors")
            self.closing, self.ended = True, "hard_errors"
            self.reply(R.R421_TOO_MANY_ERRORS.format(host=self.service.hostname))

    def improper_pipelining(self, verb: str) -> bool:
        """Log improper pipelining; True when the command is to be refused (503 5.5.0)."""
        early, self.early = self.early, False
        sample = self.conn.buf[:40].decode("ascii", "replace").rstrip()
        where = "before the banner" if early else f"after {verb}"
        self.service.log.info("improper command pipelining %s from %s: %s", where, self.client,
                              sample if not early else verb)
        self.verdict = self.verdict or "unauth_pipelining"
        self.suspect()
        return self.service.defence.cfg.reject_unauth_pipelining

    def reply(self, reply: R.Reply) -> None:
        d = self.service.defence.cfg
        delay = d.tarpit_delay if self.suspicious else 0.0
        if reply.code >= 400:
            self.errors += 1
            if self.errors > d.soft_error_limit and not self.trusted:
                self.suspect()
                delay = max(delay, d.error_sleep_time)
        if delay and not self.closing and reply.code not in (421, 521):
            self.conn.flush()
            time.sleep(delay)  # gevent-patched in SMTP workers: only this session waits
        self.conn.write(reply.encode())

    def on_close(self) -> None:
        if self.anvil_held:
            self.service.anvil.disconnect(self.peer[0])
        if not self.verdict and self.bad_rcpts and not self.transactions and not self.accepted:
            self.verdict = "bad_recipients"
            self.service.log.info("DICTIONARY %d unknown recipient(s), none valid, from %s",
                                  self.bad_rcpts, self.client)
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
        service = self.service
        if self.blocked:
            return R.R550_BLOCKED.format(ip=self.peer[0], reason=self.blocked)
        refusal = self.check_anvil_rate(service.defence.cfg.client_recipient_rate_limit,
                                        service.anvil and service.anvil.recipient, "Recipient",
                                        R.R450_RECIPIENT_RATE)
        if refusal is not None:
            return refusal
        if service.recipients is not None and service.recipients.verdict(address) is False:
            self.bad_rcpts += 1
            return R.R550_UNKNOWN_USER.format(rcpt=address)
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
            self.errors = self.junk = 0  # Postfix: the limits count errors without delivery
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
