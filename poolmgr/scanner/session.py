"""The scanner's side of one SMTP/LMTP connection (amavisd-style content filter).

Accepts SMTP (EHLO) and LMTP (LHLO) on the same port, XFORWARD from the clients in
`scanner.inet_acl` (the SMTP pool, or Postfix as content_filter), checks each message, removes
any `X-Poolmgr-Scan:` header it arrived with, adds `Received:` and its own `X-Poolmgr-Scan:`
and re-injects it to `scanner.next_hop`. It answers 250 only after the next hop did; a reject
verdict is 554; any failure is 451. Recipients the next hop refused beside accepted ones are
reported to an LMTP client one by one, and to an SMTP client's sender by a delivery status
notification (`smtp.dsn`).

Exports: ScannerSession.
"""

import time

from .. import maildir
from ..smtp import dsn, relay
from ..defence.networks import in_networks
from ..smtp import replies as R
from ..smtp.headers import received, remove_field
from ..smtp.parse import parse_xforward
from ..smtp.protocol import BASE_COMMANDS, Command, Envelope, Refused, ServerSession
from . import checks


SCAN_HEADER = "X-Poolmgr-Scan"


class ScannerSession(ServerSession):
    __slots__ = ()

    def on_connect(self):
        if not in_networks(self.peer[0], self.service.cfg.scanner.inet_acl):
            self.service.log.warning("reject: connect from %s: not in scanner.inet_acl",
                                     self.client)
            return R.R554_ACCESS_DENIED.format(client=self.peer[0])
        return None

    def extensions(self):
        return ["PIPELINING", f"SIZE {self.service.limits.message_size_limit}",
                "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8",
                "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE"]

    def do_lhlo(self, arg: str) -> bool:
        return self._greet(arg, "LMTP", R.R501_LHLO_SYNTAX)

    def do_xforward(self, arg: str) -> bool:
        if self.env is not None:
            raise Refused(R.R503_XFORWARD_IN_TRANSACTION)
        try:
            attrs = parse_xforward(arg)
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
        try:
            verdict = checks.scan(data, service.cfg.scanner.rules, service.cfg.scanner.eicar)
            if verdict.reply is not None:
                service.log.info("%s: Blocked %s (%s) [%s] <%s> -> %s, %d ms", env.queue_id,
                                 "INFECTED" if verdict.reason.startswith("Eicar") else "RULE",
                                 verdict.reason, forwarded.get("ADDR", self.peer[0]),
                                 env.mail_from, ",".join(f"<{r}>" for r in env.rcpts),
                                 (time.monotonic() - started) * 1000)
                return [verdict.reply] * len(env.rcpts)
            note = f" ({verdict.reason})" if verdict.reason else ""
            # This hop's trace header names the direct peer; the real client is in the
            # SMTP worker's Received: header already.
            headers = received(helo=self.helo, addr=self.peer[0], by=service.hostname,
                               software="poolmgr scanner", proto=self.proto,
                               queue_id=env.queue_id, rcpts=env.rcpts)
            headers += (f"{SCAN_HEADER}: {verdict.result}{note} by poolmgr at "
                        f"{service.hostname}\r\n").encode()
            # Only this hop's verdict counts: a copy the client sent is a forgery.
            data = headers + remove_field(data, SCAN_HEADER)
            replies = self._forward(env, data, forwarded, started, verdict.result)
            if self.proto == "LMTP":
                return replies  # the client gets one reply per recipient
            hop = service.cfg.scanner.next_hop
            return dsn.settle(replies, hop=hop, mail_from=env.mail_from, rcpts=env.rcpts,
                              queue_id=env.queue_id, data=data, smtputf8=env.smtputf8,
                              hostname=service.hostname, timeouts=service.cfg.timeouts,
                              deadline=time.monotonic() + service.cfg.scanner.timeout,
                              log=service.log, cache=service.relay_cache)
        finally:
            service.slot.set_busy(0)
            service.messages += 1
            service.slot.add("scanned")
            service.slot.add("scan_ms", int((time.monotonic() - started) * 1000))

    def _forward(self, env: Envelope, data: bytes, forwarded: dict, started: float,
                 result: str) -> list[R.Reply]:
        service = self.service
        hop = service.cfg.scanner.next_hop
        if hop.kind == "maildir":
            relay_name = "maildir"
            try:
                name = maildir.deliver(hop.path, f"Return-Path: <{env.mail_from}>\r\n".encode()
                                        + data)
                replies = [R.R250_QUEUED.format(queue_id=name)] * len(env.rcpts)
            except OSError as exc:
                service.log.warning("%s: maildir delivery to %s failed: %s", env.queue_id,
                                    hop.path, exc.strerror)
                replies = [R.R451_NEXT_HOP_UNAVAILABLE] * len(env.rcpts)
        else:
            relay_name = str(hop)
            xforward = {"NAME": forwarded.get("NAME", "[UNAVAILABLE]"),
                        "ADDR": forwarded.get("ADDR", self.peer[0]),
                        "PROTO": forwarded.get("PROTO", self.proto),
                        "HELO": forwarded.get("HELO", self.helo or ""),
                        "IDENT": env.queue_id, "SOURCE": forwarded.get("SOURCE", "REMOTE")}
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
        delay = time.monotonic() - started
        for rcpt, reply in zip(env.rcpts, replies):
            status = "sent" if reply.ok else "deferred" if reply.temporary else "bounced"
            service.log.info("%s: to=<%s>, relay=%s, delay=%.2f, dsn=%s, result=%s, status=%s (%s)",
                             env.queue_id, rcpt, relay_name, delay, reply.status or "-", result,
                             status, reply)
        return replies


ScannerSession.commands = {
    **BASE_COMMANDS,
    "LHLO": Command(ScannerSession.do_lhlo, "lhlo"),
    "XFORWARD": Command(ScannerSession.do_xforward, "xforward", needs_helo=True),
}
