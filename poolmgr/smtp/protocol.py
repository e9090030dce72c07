"""The RFC 5321 server dialogue shared by SMTP workers and scanner workers.

`ServerSession` owns one connection: banner, an explicit command table with per-command
flags, the envelope (replaced whole on RSET and after DATA), strict DATA reading, STARTTLS,
and Postfix-style logging (`connect from`, `NOQUEUE: reject: ...`, `disconnect from ...
ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5`). The client is `unknown[ADDR]` until a policy
names it (`Decision.client_name`, the SMTP pool's reverse lookup); as Postfix's smtpd logs
`connect from NAME[ADDR]` after its lookup, the line is logged when the name is settled,
with the banner (or, for a session that ends before its banner, when it ends).

Subclasses decide policy through hooks that return a `defence.decision.Decision` (or None:
go on): `on_connect`, `before_banner` (a pause asks for the two-part banner; then
`after_pause`, or `unpaused` when there was none), `screen` before each command,
`check_mail`, `check_rcpt`, `after_command`, and `before_reply` before every reply. The
session is the one place that acts on them (`apply`): it caps the timeout, closes, parks
for the greet pause (`smtp.park`), sleeps (the tarpit), and writes. Other hooks:
`extensions`, `deliver`, `on_banner` (the banner's first line is on its way) and `on_close`.

The `service` passed in is the worker-wide object every session shares: `hostname`, `log`,
`limits` (line_length_limit, message_size_limit, max_recipients, timeout, per_record_deadline,
min_data_rate), `tls_context`, `draining`, optional `tick`.
"""

__all__ = ["ServerSession", "Envelope", "Command", "Drain", "Refused", "STAT_ORDER",
           "BASE_COMMANDS"]

import time
from typing import Callable, NamedTuple

from ..defence.decision import Decision, combine
from ..defence.networks import plain_ip
from . import replies as R
from .conn import Conn, Disconnected, LineTooLong, Timeout, malformed
from .park import Parked
from .parse import PathError, new_queue_id, parse_path

PARK_AFTER = 1.0  # seconds a session that has sent a command waits before it is parked
# ... and one that has sent none yet: a client's first command comes a round trip after the
# banner, and a bot's never does (so its wait stays short).
PARK_BEFORE_FIRST = 0.2


class Drain(Exception):
    """The session must end now: it says 421 (`reply`, by default "shutting down") and
    closes."""

    def __init__(self, reply: R.Reply | None = None):
        super().__init__()
        self.reply = reply


class Refused(Exception):
    """A command handler refuses its command with this reply (or decision: a reply that
    closes); the session applies it and goes on."""

    def __init__(self, reply: "R.Reply | Decision"):
        decision = reply if isinstance(reply, Decision) else Decision.answer(reply)
        super().__init__(decision.reply)
        self.decision = decision
        self.reply = decision.reply


class Envelope:
    """One mail transaction (RFC 5321 section 3.3)."""

    __slots__ = ("mail_from", "rcpts", "queue_id", "smtputf8", "body_8bit", "chunks")

    def __init__(self, mail_from: str, smtputf8: bool, body_8bit: bool):
        self.mail_from = mail_from
        self.rcpts: list[str] = []
        self.queue_id = ""
        self.smtputf8 = smtputf8
        self.body_8bit = body_8bit
        self.chunks: list[bytes] | None = None  # BDAT chunks so far (RFC 3030)


class Command(NamedTuple):
    """One row of a listener's command table, with its policy flags (Postfix's
    smtpd_cmd_table: LIMIT is `junk`, LAST is `last`)."""
    handler: Callable[["ServerSession", str], bool]
    stat: str                 # name in the disconnect line
    needs_helo: bool = False  # RFC 5321 section 4.1.4: HELO/EHLO before a transaction
    needs_tls_offer: bool = False  # exists only where STARTTLS is offered
    junk: bool = False        # counts against junk_command_limit (Postfix: LIMIT)
    last: bool = False        # must end a pipelined group (RFC 2920 section 3.1; Postfix: LAST)
    implemented: bool = True  # False: known, answered 502, and not listed by HELP


# Order of the counters in the disconnect line, as Postfix's smtpd prints them.
STAT_ORDER = ("helo", "ehlo", "lhlo", "xforward", "starttls", "mail", "rcpt", "data", "bdat",
              "rset", "noop", "vrfy", "help", "quit", "unknown")


class ServerSession:
    __slots__ = ("service", "conn", "peer", "client", "name", "connect_logged", "helo", "proto",
                 "env", "tls", "closing", "idle_since", "last_cmd", "stats", "xforward",
                 "greenlet", "running", "parked", "ended", "transactions")
    commands: dict[str, Command] = {}
    lmtp_only = False

    def __init__(self, service, sock, peer):
        self.service = service
        limits = service.limits
        self.conn = Conn(sock, limits.timeout, getattr(service, "tick", None),
                         limits.per_record_deadline, limits.min_data_rate)
        self.set_peer(peer)
        self.name = ""  # the client's name once looked up ("unknown" when none); "": not asked
        self.connect_logged = False
        self.helo: str | None = None
        self.proto = "SMTP"
        self.env: Envelope | None = None
        self.tls = False
        self.closing = False
        self.idle_since = 0.0  # when it began waiting for a command with no transaction open
        self.last_cmd = "CONNECT"
        self.stats: dict[str, list[int]] | None = None
        self.xforward: dict[str, str] | None = None
        self.greenlet = None
        self.running = False  # in `resume` now (a greenlet spawned for it may not have begun)
        self.parked = None  # the watchers of a parked session (smtp.park)
        self.ended = ""  # quit, timeout, slow, lost, drain, error, refused, tls_failure
        self.transactions = 0  # MAIL + accepted RCPT seen

    def set_peer(self, peer: tuple[str, int]) -> None:
        """The client's (address, port): the connection's peer, or (before anything reads it)
        the client a load balancer's PROXY header names (`smtp.haproxy`)."""
        # An IPv4-mapped address as plain IPv4: the one place it is done.
        self.peer = (plain_ip(peer[0]), peer[1])
        self.client = f"unknown[{self.peer[0]}]"

    # -- hooks for subclasses: policy, as decisions the session applies
    def on_connect(self) -> Decision | None:
        """A refusal here (554, 421) is sent instead of the banner and the session ends."""
        return None

    def before_banner(self) -> Decision | None:
        """A pause (`Decision.pause`) asks for the two-part banner, then `after_pause`."""
        return None

    def after_pause(self, arrived: int, waited: float) -> Decision | None:
        """The verdict on the `arrived` bytes the client sent in the greet pause; a refusal
        is sent instead of the banner's last line."""
        return None

    def unpaused(self) -> Decision | None:
        """Before the banner when there was no pause; a refusal is sent instead of it."""
        return None

    def screen(self, verb: str, command: "Command | None") -> Decision | None:
        """Before a command runs: a reply here refuses it (the command is not run)."""
        return None

    def check_mail(self, address: str) -> Decision | None:
        return None

    def check_rcpt(self, address: str) -> Decision | None:
        return None

    def after_command(self) -> Decision | None:
        """After a command ran (not after one that `screen` refused)."""
        return None

    def before_reply(self, reply: R.Reply) -> Decision | None:
        """Before each reply: a delay (the tarpit) or a shorter timeout; never a reply."""
        return None

    def extensions(self) -> list[str]:
        return []

    def deliver(self, env: Envelope, data: bytes) -> list[R.Reply]:
        raise NotImplementedError

    def on_banner(self) -> None:
        """The banner's first line is written (once with a pause; again with its rest)."""

    def on_close(self) -> None:
        pass

    def looks_up_name(self) -> bool:
        """Whether the policy looks the client's name up at connect (then `connect from` waits
        for it); without a lookup the line comes first, before anything the policy logs."""
        return False

    # -- the session
    def run(self) -> None:
        if not self.looks_up_name():
            self.log_connect()
        self.resume(self.open)

    def log_connect(self) -> None:
        """`connect from NAME[ADDR]`, once, when the name is known (or the session ends)."""
        if not self.connect_logged:
            self.connect_logged = True
            self.service.log.info("connect from %s", self.client)

    def open(self) -> None:
        decision = self.on_connect()
        if decision is not None and (decision.close or decision.reply is not None):
            # A reply at connect is said instead of the banner: the session ends with it.
            self.closing, self.ended = True, "refused"
            self.log_connect()
            self.apply(decision)
            self.conn.flush()
            return
        self.apply(decision)
        self.greet()
        self.serve()

    def greet(self) -> None:
        """The banner, after the policy's tests: with a pause, its first line goes first and
        the rest follows `after_pause` (parked meanwhile, in an SMTP worker)."""
        decision = self.before_banner()
        if decision is not None and decision.park:
            self.apply(decision)
        else:
            self.banner(combine(decision, self.unpaused()))

    def banner(self, decision: Decision | None) -> None:
        """The policy's verdict before the banner (with the client's name), then (unless it
        closed) the banner."""
        self.apply(decision)
        self.log_connect()
        if not self.closing:
            self.reply(R.R220_BANNER.format(host=self.service.hostname))
            self.on_banner()

    def pause(self, seconds: float) -> None:
        """The greet pause: the banner's first line, then up to `seconds` for the client to
        talk (postscreen's two-part banner); then the verdict (`after_pause`) and the rest of
        the banner. With a `parking` service the session is parked meanwhile and goes on with
        its command loop."""
        banner = R.R220_BANNER.format(host=self.service.hostname)
        self.conn.write(f"220-{banner.text}\r\n".encode())
        self.on_banner()
        started = time.monotonic()
        parking = getattr(self.service, "parking", None)
        if parking is not None:
            self.conn.flush()

            def then():
                self.banner(self.after_pause(self.conn.wait_input(0),
                                             time.monotonic() - started))
                self.serve()

            parking.park(self, seconds, then, then)
        arrived = self.conn.wait_input(seconds)
        self.banner(self.after_pause(arrived, time.monotonic() - started))

    def apply(self, decision: Decision | None) -> None:
        """Carry out a policy's decision: the one place a decision becomes I/O."""
        if decision is None:
            return
        if decision.client_name:
            self.name = decision.client_name
            self.client = f"{self.name}[{self.peer[0]}]"
        if decision.timeout:
            self.conn.timeout = min(self.conn.timeout, decision.timeout)
        if decision.close:
            self.closing = True
            if decision.ended:
                self.ended = decision.ended
        if decision.park:
            self.pause(decision.park)
        if decision.delay:
            self.conn.flush()
            time.sleep(decision.delay)  # gevent-patched in SMTP workers: only this session waits
        if decision.reply is not None:
            self.reply(decision.reply)

    def serve(self) -> None:
        """The command loop; with a `parking` service, an idle wait is a park (`smtp.park`)."""
        conn, limit = self.conn, self.service.limits.line_length_limit
        parking = getattr(self.service, "parking", None)
        while not self.closing:
            self.idle_since = time.monotonic() if self.env is None else 0.0
            if parking is not None and not conn.buf and not self.tls:
                conn.flush()
                # A client that talks is answered at once; parking between its commands
                # would cost more than it saves (a new greenlet on waking). It is parked once
                # it falls quiet.
                wait = min(PARK_AFTER if self.stats is not None else PARK_BEFORE_FIRST,
                           conn.timeout)
                if not conn.wait_input(wait):
                    parking.park(self, conn.timeout - wait, self.unparked, self.expired)
            try:
                line = conn.readline(limit)
            except LineTooLong:
                self.count("unknown", False)
                self.reply(R.R500_LINE_TOO_LONG)
                continue
            finally:
                self.idle_since = 0.0
            self.dispatch(line)
        conn.flush()

    def unparked(self) -> None:
        """The client sent something (or hung up) while the session was parked."""
        self.conn.wait_input(0)
        self.serve()

    def expired(self) -> None:
        raise Timeout()

    def resume(self, step: Callable[[], None]) -> None:
        """Run `step` (the opening, or what follows a park) until the session ends or parks."""
        log, parked = self.service.log, False
        self.running = True
        try:
            step()
        except Parked:
            parked = True
        except Timeout as exc:  # slow: a deadline (per record, DATA rate) ran out
            self.log_connect()
            self.ended = "slow" if exc.slow else "timeout"
            log.info("timeout after %s from %s", self.last_cmd, self.client)
            self.say_last(R.R421_TIMEOUT.format(host=self.service.hostname))
        except Disconnected:
            self.log_connect()
            if not self.closing:
                self.ended = "lost"
                log.info("lost connection after %s from %s", self.last_cmd, self.client)
        except Drain as drain:
            self.ended = "drain"
            self.say_last(drain.reply or R.R421_SHUTDOWN.format(host=self.service.hostname))
        except Exception:
            self.log_connect()
            self.ended = "error"
            log.exception("session with %s failed after %s", self.client, self.last_cmd)
            self.say_last(R.R451_LOCAL_ERROR)
        finally:
            self.running = False
            if not parked:
                self.log_connect()
                self.conn.close()
                self.on_close()
                log.info("disconnect from %s%s", self.client, self.stats_text())

    def drainable(self, now: float, grace: float) -> bool:
        """Idle, with no transaction, for `grace` seconds: a stopping worker may close it.

        The grace keeps a stop or reload from closing a session that was just accepted or
        whose QUIT is on its way.
        """
        return bool(self.idle_since) and now - self.idle_since >= grace

    def say_last(self, reply: R.Reply) -> None:
        """A final reply before closing, after any reply still queued; the peer may be gone."""
        try:
            self.conn.timeout = min(self.conn.timeout, 10.0)
            self.reply(reply)
            self.conn.flush()
        except (Timeout, Disconnected, OSError):
            pass

    def dispatch(self, line: bytes) -> None:
        text = line.decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        command = self.commands.get(verb)
        decision = self.screen(verb, command)
        if decision is not None and decision.reply is not None:
            self.last_cmd = verb if command else "UNKNOWN"
            self.count(command.stat if command else "unknown", False)
            self.log_reject(self.last_cmd, decision.reply)
            self.apply(decision)
            return
        self.apply(decision)
        self.run_command(verb, command, arg)
        self.apply(self.after_command())

    def run_command(self, verb: str, command: Command | None, arg: str) -> None:
        if command is None or (command.needs_tls_offer and self.service.tls_context is None):
            self.last_cmd = "UNKNOWN"
            self.count("unknown", False)
            self.reply(R.R502_UNRECOGNIZED)
            return
        self.last_cmd = verb
        if command.needs_helo and self.helo is None:
            self.count(command.stat, False)
            self.reply(R.R503_NEED_LHLO if self.lmtp_only else R.R503_NEED_HELO)
            return
        try:
            ok = command.handler(self, arg.strip())
        except Refused as refusal:
            self.apply(refusal.decision)
            ok = False
        self.count(command.stat, ok)

    def reply(self, reply: R.Reply) -> None:
        self.apply(self.before_reply(reply))
        self.conn.write(reply.encode())

    def count(self, stat: str, ok: bool) -> None:
        if self.stats is None:
            self.stats = {}
        entry = self.stats.setdefault(stat, [0, 0])
        entry[0] += bool(ok)
        entry[1] += 1

    def stats_text(self) -> str:
        if not self.stats:
            return " commands=0"
        parts, good, total = [], 0, 0
        for name in STAT_ORDER:
            if name in self.stats:
                ok, n = self.stats[name]
                parts.append(f"{name}={ok}" if ok == n else f"{name}={ok}/{n}")
                good, total = good + ok, total + n
        parts.append(f"commands={good}" if good == total else f"commands={good}/{total}")
        return " " + " ".join(parts)

    def log_reject(self, stage: str, reply: R.Reply, rcpt: str | None = None,
                   sender: str | None = None) -> None:
        env = self.env
        queue_id = env.queue_id if env and env.queue_id else "NOQUEUE"
        where = []
        if env or sender is not None:
            where.append(f"from=<{env.mail_from if env else sender}>")
        if rcpt is not None:
            where.append(f"to=<{rcpt}>")
        elif env and env.rcpts:
            where.append(f"to=<{env.rcpts[0]}>")
        where.append(f"proto={self.proto} helo=<{self.helo or ''}>")
        self.service.log.info("%s: reject: %s from %s: %s; %s", queue_id, stage, self.client,
                              reply, " ".join(where))

    # -- commands
    def _greet(self, arg: str, proto: str, syntax: R.Reply) -> bool:
        if not arg:
            self.reply(syntax)
            return False
        self.helo, self.proto, self.env = arg.split()[0], proto, None
        if proto == "SMTP":
            self.reply(R.Reply(250, "", self.service.hostname))
        else:
            self.reply(R.Reply(250, "", "\n".join([self.service.hostname] + self.extensions())))
        return True

    def do_helo(self, arg: str) -> bool:
        return self._greet(arg, "SMTP", R.R501_HELO_SYNTAX)

    def do_ehlo(self, arg: str) -> bool:
        return self._greet(arg, "ESMTP", R.R501_EHLO_SYNTAX)

    def _path(self, arg: str, keyword: str, syntax: R.Reply) -> tuple[str, dict[str, str]]:
        try:
            return parse_path(arg, keyword)
        except PathError as exc:
            raise Refused(syntax if exc.kind == "syntax" else R.R501_BAD_ADDRESS) from None

    def _checked(self, stage: str, decision: Decision | None, **where) -> None:
        """A policy hook's refusal is logged (NOQUEUE: reject) and answered."""
        if decision is not None and decision.reply is not None:
            self.log_reject(stage, decision.reply, **where)
            raise Refused(decision)
        self.apply(decision)

    def do_mail(self, arg: str) -> bool:
        if self.env is not None:
            raise Refused(R.R503_NESTED_MAIL)
        address, params = self._path(arg, "FROM", R.R501_MAIL_SYNTAX)
        size, body_8bit, smtputf8 = 0, False, "SMTPUTF8" in params
        for key, value in params.items():
            if key == "SIZE" and value.isdigit():
                size = int(value)
            elif key == "SIZE":
                raise Refused(R.R501_BAD_SIZE)
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                body_8bit = value.upper() == "8BITMIME"
            elif not (key == "SMTPUTF8" and not value):
                raise Refused(R.R555_UNSUPPORTED_PARAMETER.format(param=key))
        if not smtputf8 and not address.isascii():
            raise Refused(R.R553_SMTPUTF8_REQUIRED)
        self._checked("MAIL", Decision.answer(R.R552_SIZE_EXCEEDED)
                      if size > self.service.limits.message_size_limit
                      else self.check_mail(address), sender=address)
        self.env = Envelope(address, smtputf8, body_8bit)
        self.reply(R.R250_SENDER_OK)
        return True

    def do_rcpt(self, arg: str) -> bool:
        env = self.env
        if env is None:
            raise Refused(R.R503_NEED_MAIL)
        address, params = self._path(arg, "TO", R.R501_RCPT_SYNTAX)
        if params:
            raise Refused(R.R555_UNSUPPORTED_PARAMETER.format(param=next(iter(params))))
        if not address:
            raise Refused(R.R501_BAD_ADDRESS)
        if not env.smtputf8 and not address.isascii():
            raise Refused(R.R553_SMTPUTF8_REQUIRED)
        if len(env.rcpts) >= self.service.limits.max_recipients:
            raise Refused(R.R452_TOO_MANY_RECIPIENTS)
        self._checked("RCPT", self.check_rcpt(address), rcpt=address)
        if not env.rcpts:
            self.transactions += 1
        if not env.queue_id:
            forwarded = self.xforward or {}
            env.queue_id = forwarded.get("IDENT") or new_queue_id()
            name = forwarded.get("NAME", "[UNAVAILABLE]")
            client = (f"{'unknown' if name.startswith('[') else name}"
                      f"[{forwarded['ADDR'] or 'unknown'}]"
                      if "ADDR" in forwarded else self.client)
            self.service.log.info("%s: client=%s", env.queue_id, client)
        env.rcpts.append(address)
        self.reply(R.R250_RCPT_OK)
        return True

    def do_data(self, arg: str) -> bool:
        env = self.env
        if arg:
            raise Refused(R.R501_DATA_SYNTAX)
        if env is None:
            raise Refused(R.R503_NEED_MAIL)
        if not env.rcpts:
            raise Refused(R.R503_NEED_RCPT)
        if env.chunks is not None:
            raise Refused(R.R503_DATA_AND_BDAT)
        self.reply(R.R354_DATA)
        result = self.conn.read_data(self.service.limits.message_size_limit)
        return self._end_of_message(env, result.data, result.problem)

    def do_bdat(self, arg: str) -> bool:
        """BDAT SIZE [LAST] (RFC 3030 CHUNKING), where CHUNKING is offered. The chunk is read
        whether the command is accepted or not, so its octets are never taken for commands;
        a size that cannot be read leaves no way to find the next command: 501 and close."""
        words = arg.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > 15 or \
                (len(words) == 2 and words[1].upper() != "LAST"):
            raise Refused(Decision.refuse(R.R501_BDAT_SYNTAX, "error"))
        size, last, env = int(words[0]), len(words) == 2, self.env
        refusal = R.R503_NEED_MAIL if env is None else R.R503_NEED_RCPT if not env.rcpts \
            else None
        limit = self.service.limits.message_size_limit
        if refusal is None and env.chunks is None:
            env.chunks = []
        held = sum(map(len, env.chunks)) if refusal is None else 0
        chunk = self.conn.read_chunk(size, keep=refusal is None and held + size <= limit)
        if refusal is not None:
            raise Refused(refusal)
        if chunk is None:
            return self._end_of_message(env, None, "too_big")
        env.chunks.append(chunk)
        if not last:
            self.reply(R.R250_CHUNK.format(size=size))
            return True
        data = b"".join(env.chunks)
        return self._end_of_message(env, data, malformed(data))

    def _end_of_message(self, env: Envelope, data: bytes | None, problem: str) -> bool:
        """The message is in (or refused for `problem`): deliver it and answer."""
        if problem:
            refusal = {"too_big": R.R552_MESSAGE_TOO_BIG, "bare_lf": R.R550_BARE_LF,
                       "bare_cr": R.R550_BARE_CR, "nul": R.R550_NUL}[problem]
            self.log_reject("END-OF-MESSAGE", refusal)
            self.env = None
            self.reply(refusal)
            return False
        outcome = self.deliver(env, data)
        self.env = None
        if self.proto == "LMTP":
            for reply in outcome:
                self.reply(reply)
            return all(r.ok for r in outcome)
        final = R.combine(outcome)
        self.reply(final)
        return final.ok

    def do_rset(self, arg: str) -> bool:
        self.env = None
        self.reply(R.R250_OK)
        return True

    def do_noop(self, arg: str) -> bool:
        self.reply(R.R250_OK)
        return True

    def do_quit(self, arg: str) -> bool:
        self.reply(R.R221_BYE)
        self.closing, self.ended = True, "quit"
        return True

    def do_vrfy(self, arg: str) -> bool:
        self.reply(R.R252_VRFY if arg else R.R501_VRFY_SYNTAX)
        return bool(arg)

    def do_help(self, arg: str) -> bool:
        """HELP lists this listener's own command table, so it names what exists."""
        offered = [verb for verb, command in self.commands.items() if command.implemented and
                   (not command.needs_tls_offer or self.service.tls_context is not None)]
        self.reply(R.R214_HELP.format(commands=" ".join(offered)))
        return True

    def do_not_implemented(self, arg: str) -> bool:
        self.reply(R.R502_NOT_IMPLEMENTED)
        return False

    def do_starttls(self, arg: str) -> bool:
        if arg:
            self.reply(R.R501_NO_ARGUMENTS.format(verb="STARTTLS"))
            return False
        if self.tls:
            self.reply(R.R554_TLS_ACTIVE)
            return False
        dropped = self.conn.discard_input()  # CVE-2011-0411: never act on pre-TLS plaintext
        if dropped:
            self.service.log.warning("%s: discarding %d bytes of plaintext sent after STARTTLS",
                                     self.client, dropped)
        self.reply(R.R220_TLS_READY)
        self.conn.flush()
        try:
            self.conn.sock.settimeout(self.conn.timeout)
            self.conn.use(self.service.tls_context.wrap_socket(self.conn.sock,
                                                               server_side=True))
        except OSError as exc:
            self.service.log.info("SSL_accept error from %s: %s", self.client,
                                  getattr(exc, "reason", None) or type(exc).__name__)
            self.closing, self.ended = True, "tls_failure"
            raise Disconnected() from None
        # RFC 3207 section 4.2: forget everything learned before TLS.
        self.tls, self.helo, self.env = True, None, None
        return True


BASE_COMMANDS = {
    "HELO": Command(ServerSession.do_helo, "helo", last=True),
    "EHLO": Command(ServerSession.do_ehlo, "ehlo", last=True),
    "MAIL": Command(ServerSession.do_mail, "mail", needs_helo=True),
    "RCPT": Command(ServerSession.do_rcpt, "rcpt", needs_helo=True),
    "DATA": Command(ServerSession.do_data, "data", needs_helo=True, last=True),
    "RSET": Command(ServerSession.do_rset, "rset", junk=True),
    "NOOP": Command(ServerSession.do_noop, "noop", junk=True),
    "QUIT": Command(ServerSession.do_quit, "quit"),
    "VRFY": Command(ServerSession.do_vrfy, "vrfy", junk=True),
    "HELP": Command(ServerSession.do_help, "help"),
    "EXPN": Command(ServerSession.do_not_implemented, "unknown", implemented=False),
    "ETRN": Command(ServerSession.do_not_implemented, "unknown", junk=True, implemented=False),
    "AUTH": Command(ServerSession.do_not_implemented, "unknown", implemented=False),
    "BDAT": Command(ServerSession.do_not_implemented, "unknown", implemented=False),
    "TURN": Command(ServerSession.do_not_implemented, "unknown", implemented=False),
}
ServerSession.commands = BASE_COMMANDS
