"""The scanner's side of one SMTP/LMTP connection (amavisd-style content filter).

Accepts SMTP (EHLO) and LMTP (LHLO) on the same port, XFORWARD from the clients in
`scanner.inet_acl` (the SMTP pool, or Postfix as content_filter), checks each message, removes
any `X-Poolmgr-Scan:` header it arrived with, makes the header edits its checks asked for
(rspamd's milter headers and DKIM signature), adds `Received:` and its own `X-Poolmgr-Scan:`
and re-injects it to `scanner.next_hop`. It answers 250 only after the next hop did; a reject
verdict is 554; any failure is 451. Recipients the next hop refused beside accepted ones are
reported to an LMTP client one by one, and to an SMTP client's sender by a delivery status
notification (`smtp.dsn`). A message blocked as a virus or banned contents is announced to
`scanner.virus_admin` (admin_notice.py).
"""

__all__ = ["ScannerSession"]

import functools
import ipaddress
import time
from dataclasses import replace

from .. import handoff, log, maildir
from ..smtp import dsn, relay
from ..defence.decision import Decision
from ..defence.networks import in_networks
from ..smtp import replies as R
from ..config import format_address
from ..smtp.headers import (edit_fields, message_id, received, remove_fields, set_subject,
                            tag_subject)
from ..smtp.parse import BadAddress, parse_xforward
from ..smtp.protocol import BASE_COMMANDS, Command, Envelope, Refused, ServerSession
from . import admin_notice, quarantine
from .backends.base import Message
from .scan import scan_header
from .verdict import FORGEABLE


# A message the scanner passes is received, queued and delivered in one go; it logs the lines
# Postfix's cleanup, qmgr and delivery agent would, under their names, so that log readers
# (pflogsumm counts deliveries by these lines) see the usual story.
CLEANUP, QMGR = log.program("cleanup"), log.program("qmgr")
AGENTS = {"smtp": log.program("smtp"), "lmtp": log.program("lmtp"),
          "maildir": log.program("virtual")}


class ScannerSession(ServerSession):
    __slots__ = ("port",)

    def __init__(self, service, sock, peer):
        super().__init__(service, sock, peer)
        self.port = None  # the listening port the client came to: it picks the policy bank

    def on_connect(self):
        if not in_networks(self.peer[0], self.service.cfg.scanner.inet_acl):
            self.service.log.warning("reject: connect from %s: not in scanner.inet_acl",
                                     self.client)
            return Decision.refuse(R.R554_ACCESS_DENIED.format(client=self.peer[0]))
        return None

    def extensions(self):
        return ["PIPELINING", f"SIZE {self.service.limits.message_size_limit}",
                "ENHANCEDSTATUSCODES", "8BITMIME", "CHUNKING", "SMTPUTF8",
                "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE"]

    def after_command(self) -> None:
        """The worker's heartbeat (`beat`), and at the end of each message `handoff.let_go`: a
        client that keeps the connection for more (an SMTP worker's kept connection) is let go
        at once when this worker is done or another connection waits for a scanner worker."""
        self.service.beat(time.monotonic())
        if self.last_cmd not in ("DATA", "BDAT"):
            return
        reply = self.let_go()
        if reply is not None:
            self.closing, self.ended = True, "drain"
            self.say_last(reply)

    def let_go(self) -> R.Reply | None:
        """The 421 that lets this connection go now (`handoff.let_go`), or None; asked at the
        end of a message and by the worker's `tick` while the session waits for a command."""
        if self.closing:
            return None  # going already
        service = self.service
        return handoff.let_go(
            carried=self.transactions > 0, in_transaction=self.env is not None,
            worker_done=service.messages >= service.cfg.scanner.max_requests,
            someone_waiting=service.someone_waiting, host=service.hostname)

    def do_lhlo(self, arg: str) -> bool:
        return self._greet(arg, "LMTP", R.R501_LHLO_SYNTAX)

    def do_xforward(self, arg: str) -> bool:
        if self.env is not None:
            raise Refused(R.R503_XFORWARD_IN_TRANSACTION)
        try:
            attrs = parse_xforward(arg)
        except BadAddress as exc:  # said back as Postfix does, its odd characters as "?"
            value = "".join(c if " " < c < "\x7f" else "?" for c in exc.args[0])
            raise Refused(R.R501_XFORWARD_ADDR.format(value=value)) from None
        except ValueError:
            raise Refused(R.R501_XFORWARD_SYNTAX) from None
        self.xforward = {**(self.xforward or {}), **attrs}
        self.reply(R.R250_OK)
        return True

    def deliver(self, env: Envelope, data: bytes) -> list[R.Reply]:
        service = self.service
        started = time.monotonic()
        service.slot.set_busy(1)
        forwarded = self.xforward or {}
        self.xforward = None  # XFORWARD_README: attributes last for one transaction
        client = forwarded.get("ADDR", self.peer[0])
        try:
            name = forwarded.get("NAME", "")
            message = Message(data, env.queue_id, env.mail_from, tuple(env.rcpts), client,
                              "" if name.startswith("[") else name,
                              forwarded.get("HELO", self.helo or ""))
            bank = service.scanner.bank(self.local_port)
            verdict = service.scanner.scan(message, bank)
            if verdict.action == "deliver":
                return self._pass(env, data, verdict, forwarded, client, started, bank.name)
            loving = service.scanner.spam_lovers_of(env.rcpts, verdict)
            if not loving:
                return self._block(env, data, verdict, client, started, bank.name)
            if len(loving) == len(env.rcpts):
                return self._pass(env, data, replace(verdict, action="deliver", reply=None),
                                  forwarded, client, started, bank.name)
            return self._split(env, data, verdict, loving, forwarded, client, started,
                               bank.name)
        finally:
            service.slot.set_busy(0)
            service.messages += 1
            service.slot.add("scanned")
            took = time.monotonic() - started
            service.slot.add("scan_ms", int(took * 1000))
            service.slot.observe("scan", took)

    def _pass(self, env: Envelope, data: bytes, verdict, forwarded: dict, client: str,
              started: float, bank: str, settle: bool = True) -> list[R.Reply]:
        """Headers added, the message re-injected; the replies for `env.rcpts`, settled for
        an SMTP client (`_settled`) unless the caller settles them with others."""
        service = self.service
        # This hop's trace header names the direct peer; the real client is in the
        # SMTP worker's Received: header already.
        headers = received(helo=self.helo, addr=self.peer[0], by=service.hostname,
                           software="poolmgr scanner", proto=self.proto,
                           queue_id=env.queue_id, rcpts=env.rcpts)
        headers += verdict.headers + scan_header(verdict, service.hostname)
        # Only this hop's verdict counts: copies the client sent are forgeries.
        data = edit_fields(remove_fields(data, FORGEABLE), verdict.edits)
        data = headers + (set_subject(data, verdict.subject) if verdict.subject
                          else tag_subject(data, verdict.subject_tag))
        self._log_passed(env, verdict, client, len(data), started, bank)
        CLEANUP.info("%s: message-id=%s", env.queue_id, message_id(data))
        QMGR.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", env.queue_id,
                  env.mail_from, len(data), len(env.rcpts))
        replies = self._forward(env, data, forwarded, started)
        return self._settled(env, data, replies) if settle else replies

    def _settled(self, env: Envelope, data: bytes, replies: list[R.Reply]) -> list[R.Reply]:
        """The replies for an SMTP client, which gets one for all: recipients the next hop
        refused beside accepted ones are told to the sender by a notification (dsn.settle;
        the whole message 451 when it cannot go). An LMTP client gets them one by one."""
        if self.proto == "LMTP":
            return replies
        service = self.service
        return dsn.settle(replies, hop=service.cfg.scanner.next_hop, mail_from=env.mail_from,
                          rcpts=env.rcpts, queue_id=env.queue_id, data=data,
                          smtputf8=env.smtputf8, hostname=service.hostname,
                          timeouts=service.cfg.timeouts,
                          deadline=time.monotonic() + service.cfg.scanner.timeout,
                          log=service.log, cache=service.relay_cache)

    def _split(self, env: Envelope, data: bytes, verdict, loving: list[str], forwarded: dict,
               client: str, started: float, bank: str) -> list[R.Reply]:
        """Spam blocked for some recipients and loved by others (scanner.spam_lovers): the
        others' copy is blocked first, then the lovers' delivered, tagged. An SMTP client
        gets one reply for all, so there a reject becomes a discard into the quarantine; a
        copy that cannot be kept defers the whole message (nothing is lost), and lovers the
        next hop refuses are told to the sender as any refused recipient is (`_settled`:
        beside the others' discard even when it refused them all)."""
        others = _part_of(env, [r for r in env.rcpts if r not in loving])
        if self.proto != "LMTP" and verdict.action == "reject":
            verdict = replace(verdict, action="discard", reply=None)
        blocked = self._block(others, data, verdict, client, started, bank)
        if self.proto != "LMTP" and any(reply.temporary for reply in blocked):
            return [blocked[0]] * len(env.rcpts)
        passed = self._pass(_part_of(env, loving), data,
                            replace(verdict, action="deliver", reply=None), forwarded, client,
                            started, bank, settle=False)
        replies = {**dict(zip(others.rcpts, blocked)), **dict(zip(loving, passed))}
        return self._settled(env, data, [replies[rcpt] for rcpt in env.rcpts])

    @property
    def local_port(self) -> int:
        if self.port is None:
            try:
                self.port = self.conn.sock.getsockname()[1]
            except OSError:
                self.port = 0
        return self.port

    def _log_passed(self, env: Envelope, verdict, client: str, size: int,
                    started: float, bank: str) -> None:
        """amavisd's `Passed CLEAN {bank}` line (SPAMMY, SPAM, UNCHECKED as it says them)."""
        label = {"spam_tagged": "SPAMMY", "spam_killed": "SPAM"}.get(
            verdict.kind, "UNCHECKED" if verdict.failures else "CLEAN")
        if bank:
            label += f" {{{bank}}}"
        self.service.log.info("%s: Passed %s,%s <%s> -> %s, Hits: %s, size: %d, %d ms",
                              env.queue_id, label, _client(client), env.mail_from,
                              ",".join(f"<{r}>" for r in env.rcpts), _hits(verdict), size,
                              (time.monotonic() - started) * 1000)

    def _block(self, env: Envelope, data: bytes, verdict, client: str,
               started: float, bank: str) -> list[R.Reply]:
        """Reject, discard or defer: quarantine first (a discard that cannot be kept is
        deferred instead: nothing is lost), then amavisd's `Blocked` line."""
        service = self.service
        where = service.cfg.scanner.quarantine
        ident, kept = "", ""
        if verdict.action in ("reject", "discard") and where:
            try:
                ident = quarantine.keep(where, data, queue_id=env.queue_id, client=client,
                                        sender=env.mail_from, recipients=env.rcpts,
                                        verdict=verdict.kind, reason=verdict.summary)
                kept = ",Quarantined"
            except OSError as exc:
                service.log.warning("%s: cannot quarantine in %s: %s", env.queue_id, where,
                                    exc.strerror)
        reply = verdict.reply
        if verdict.action == "discard":
            reply = (R.R250_DISCARDED.format(ident=ident, summary=verdict.summary) if ident
                     else R.R451_QUARANTINE_FAILED)
        label = {"virus": f"INFECTED ({verdict.name})", "banned": f"BANNED ({verdict.name})",
                 "spam_killed": "SPAM", "failed": "UNCHECKED",
                 "deferred": f"DEFERRED ({verdict.name})"}[verdict.kind]
        outcome = "Deferred" if reply.temporary else \
            {"reject": "Rejected", "discard": "Discarded"}[verdict.action]
        service.log.info("%s: Blocked %s {%s%s%s},%s <%s> -> %s, quarantine: %s, "
                         "Hits: %s, %d ms", env.queue_id, label, outcome, kept,
                         f",{bank}" if bank else "", _client(client), env.mail_from,
                         ",".join(f"<{r}>" for r in env.rcpts), ident or "-", _hits(verdict),
                         (time.monotonic() - started) * 1000)
        if service.cfg.scanner.virus_admin and admin_notice.announced(verdict) and \
                not reply.temporary:  # a deferred message is not blocked yet: it comes back
            admin_notice.send(service.cfg, summary=label, outcome=outcome,
                              queue_id=env.queue_id, quarantine_id=ident, client=client,
                              sender=env.mail_from, rcpts=env.rcpts, data=data,
                              log=service.log, cache=service.relay_cache)
        return [reply] * len(env.rcpts)

    def _forward(self, env: Envelope, data: bytes, forwarded: dict,
                 started: float) -> list[R.Reply]:
        service = self.service
        hop = service.cfg.scanner.next_hop
        handed_off = time.monotonic()
        if hop.kind == "maildir":
            try:
                name = maildir.deliver(hop.path, f"Return-Path: <{env.mail_from}>\r\n".encode()
                                       + data)
                replies = [R.R250_QUEUED.format(queue_id=name)] * len(env.rcpts)
            except OSError as exc:
                service.log.warning("%s: maildir delivery to %s failed: %s", env.queue_id,
                                    hop.path, exc.strerror)
                replies = [R.R451_NEXT_HOP_UNAVAILABLE] * len(env.rcpts)
        else:
            xforward = handoff.xforward(ident=env.queue_id, addr=self.peer[0],
                                        proto=self.proto, helo=self.helo, told=forwarded)
            outgoing = relay.Outgoing(env.mail_from, env.rcpts, data, env.smtputf8,
                                      env.body_8bit, xforward)
            try:
                replies = relay.send(hop, outgoing, helo=service.hostname,
                                     timeouts=service.cfg.timeouts,
                                     deadline=started + service.cfg.scanner.timeout,
                                     cache=service.relay_cache)
            except relay.RelayError as exc:
                service.log.warning("%s: next hop %s failed at %s: %s", env.queue_id, hop,
                                    exc.stage, exc.detail)
                replies = [R.R451_SCAN_TIMEOUT if exc.stage == "timeout"
                           else R.R451_NEXT_HOP_UNAVAILABLE] * len(env.rcpts)
        done = time.monotonic()
        # Postfix's delays=a/b/c/d: before the queue manager (here the scan), in it (no queue
        # here), connection set-up, transmission; the next hop's connection and transaction
        # are timed together, as d.
        delays = f"{_seconds(handed_off - started)}/0/0/{_seconds(done - handed_off)}"
        relay_name = "virtual" if hop.kind == "maildir" else \
            f"{hop.host}[{hop.host}]:{hop.port}" if _is_address(hop.host) else \
            format_address((hop.host, hop.port))
        for rcpt, reply in zip(env.rcpts, replies):
            status = "sent" if reply.ok else "deferred" if reply.temporary else "bounced"
            text = "delivered to maildir" if hop.kind == "maildir" and reply.ok else str(reply)
            AGENTS[hop.kind].info("%s: to=<%s>, relay=%s, delay=%s, delays=%s, dsn=%s, "
                                  "status=%s (%s)", env.queue_id, rcpt, relay_name,
                                  _seconds(done - started), delays,
                                  reply.status or f"{reply.code // 100}.0.0", status, text)
        return replies


ScannerSession.commands = {
    **BASE_COMMANDS,
    "LHLO": Command(ScannerSession.do_lhlo, "lhlo"),
    "XFORWARD": Command(ScannerSession.do_xforward, "xforward", needs_helo=True),
    # BDAT answers 503 itself before HELO/MAIL: its chunk must be read either way.
    "BDAT": Command(ScannerSession.do_bdat, "bdat"),
}


def _part_of(env: Envelope, rcpts: list[str]) -> Envelope:
    """The same transaction for some of its recipients."""
    part = Envelope(env.mail_from, env.smtputf8, env.body_8bit)
    part.rcpts, part.queue_id = list(rcpts), env.queue_id
    return part


def _seconds(value: float) -> str:
    """As Postfix writes delays: two significant digits, whole seconds from 10 on, 0 below
    10 ms."""
    return "0" if value < 0.01 else f"{value:.2g}" if value < 10 else f"{value:.0f}"


@functools.lru_cache(maxsize=64)
def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _client(client: str) -> str:
    """amavisd's ` [client]`, and nothing where the client is unknown (XFORWARD ADDR
    [UNAVAILABLE])."""
    return f" [{client}]" if client else ""


def _hits(verdict) -> str:
    return "-" if verdict.score is None else f"{verdict.score:.3f}"
