"""The defences as policy, without a socket: each hook's Decision for a given client.

The end-to-end tests (test_defence, test_limits, test_transcripts) show the session engine
applying these; here each defence is called with its state (`Screening`) and what it reads,
and the decision it returns and the lines it logs are checked. A static check at the end
holds the line: no module under poolmgr/defence/ writes to a session or a connection.
"""

import ast
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from poolmgr import config
from poolmgr.defence import early, limits
from poolmgr.defence.decision import Decision, combine
from poolmgr.defence.dnsbl import Score
from poolmgr.defence.peername import LOOKUP_FAILED, UNKNOWN, Peername
from poolmgr.defence.policy import Defence
from poolmgr.defence.recipients import RecipientTable
from poolmgr.defence.screening import Screening
from poolmgr.smtp import replies as R
from poolmgr.smtp.protocol import BASE_COMMANDS, ServerSession

HOST = "mx.example.test"
PEER = ("192.0.2.7", 40312)
CLIENT = f"unknown[{PEER[0]}]"


class Said(list):
    """The defences' log: the lines they would write, as text."""

    def info(self, msg, *args):
        self.append(msg % args)

    warning = info


def service(**defence):
    cfg = config.from_dict({"smtp": {"hostname": HOST, "mydestination": ["example.test"]},
                            "defence": {"suspicious_timeout": "7s", "reverse_lookup": False,
                                        **defence}})
    return SimpleNamespace(cfg=cfg, defence=Defence(cfg, spawn=None), log=Said(), anvil=None,
                           rate_limited=False, hostname=HOST,
                           recipients=cfg.defence.recipient_table,
                           mydestination=frozenset(cfg.smtp.mydestination))


def screening_of(svc, stress=False):
    return Screening(svc.cfg.defence, PEER, svc.log, stress)


class FinishedJob:
    """A DNSBL lookup that has finished (the greenlet `Defence.spawn` makes)."""

    def __init__(self, score):
        self.value = score

    def join(self):
        pass

    def successful(self):
        return True


# -- before the banner
def test_pregreet_is_refused_with_521_and_logged_as_postscreen_does():
    svc = service(greet_wait="2s", greet_action="drop")
    screening = screening_of(svc)
    assert early.before_banner(screening, svc.defence, PEER[0]) == Decision.pause(2.0)
    decision = early.after_pause(screening, svc, PEER, 11, 0.12, b"EHLO bot\r\n")
    assert decision == Decision(reply=R.R521_BLOCKED.format(ip=PEER[0],
                                                            reason="pregreet test"),
                                close=True, timeout=7.0)
    assert svc.log == [f"PREGREET 11 after 0.12 from [{PEER[0]}]:{PEER[1]}: "
                            "EHLO bot\\r\\n",
                            f"PREGREET action=drop for [{PEER[0]}]:{PEER[1]}"]
    assert screening.verdict == "pregreet" and screening.suspicious


def test_a_silent_client_passes_the_greet_test_and_gets_the_banner():
    svc = service(greet_wait="2s", greet_action="drop")
    screening = screening_of(svc)
    assert early.after_pause(screening, svc, PEER, 0, 2.0, b"") is None  # the banner follows
    assert svc.log == [f"PASS NEW [{PEER[0]}]:{PEER[1]}"]
    assert not screening.verdict


def test_pregreet_enforce_sends_the_banner_and_refuses_every_rcpt_later():
    svc = service(greet_wait="2s", greet_action="enforce")
    screening = screening_of(svc)
    assert early.after_pause(screening, svc, PEER, 4, 0.5, b"HELO") == Decision.suspect(7.0)
    assert limits.check_rcpt(screening, svc, PEER, CLIENT, "a@example.test") == \
        Decision.answer(R.R550_BLOCKED.format(ip=PEER[0], reason="pregreet test"))


def test_no_greet_test_for_allowlisted_clients():
    svc = service(greet_wait="2s", allowlist=["192.0.2.0/24"])
    screening = screening_of(svc)
    assert early.on_connect(screening, svc, PEER, CLIENT) is None
    assert screening.trusted and screening.exempt
    assert early.before_banner(screening, svc.defence, PEER[0]) is None


def test_denylisted_client_is_dropped_at_connect_or_enforced_later():
    svc = service(denylist=["192.0.2.0/24"], denylist_action="drop")
    decision = early.on_connect(screening_of(svc), svc, PEER, CLIENT)
    assert decision.reply == R.R521_BLOCKED.format(ip=PEER[0], reason="denylist")
    assert decision.close and decision.timeout == 7.0
    assert svc.log == [f"DENYLISTED [{PEER[0]}]:{PEER[1]}; action=drop"]
    svc = service(denylist=["192.0.2.0/24"], denylist_action="enforce")
    screening = screening_of(svc)
    assert early.on_connect(screening, svc, PEER, CLIENT) == Decision.suspect(7.0)
    assert limits.check_rcpt(screening, svc, PEER, CLIENT, "a@example.test").reply == \
        R.R550_BLOCKED.format(ip=PEER[0], reason="denylist")


def test_stress_mode_shortens_the_timeout_at_connect():
    svc = service(stress_timeout="9s")
    assert early.on_connect(screening_of(svc, stress=True), svc, PEER, CLIENT) == \
        Decision.suspect(9.0)
    assert early.on_connect(screening_of(svc), svc, PEER, CLIENT) is None


def test_dnsbl_threshold_decides_before_the_banner():
    svc = service(dnsbl_threshold=3, dnsbl_action="drop")
    listed = screening_of(svc)
    listed.dnsbl_job = FinishedJob(Score(3, ("zen.test(+2)", "bl.test(+1)"), ()))
    decision = early.unpaused(listed, svc, PEER, 0)
    assert decision.reply == R.R521_BLOCKED.format(ip=PEER[0], reason="zen.test,bl.test")
    assert decision.close
    assert svc.log == [f"DNSBL rank 3 for [{PEER[0]}]:{PEER[1]}; "
                            "sites=zen.test(+2),bl.test(+1); action=drop"]
    below = screening_of(svc)
    below.dnsbl_job = FinishedJob(Score(2, ("zen.test(+2)",), ()))
    # Below the threshold: the banner, and the client is a suspect (tarpit, short timeout).
    assert early.unpaused(below, svc, PEER, 0) == Decision.suspect(7.0)
    assert below.suspicious and not below.verdict
    clean = screening_of(svc)
    clean.dnsbl_job = FinishedJob(Score(0, (), ()))
    assert early.unpaused(clean, svc, PEER, 0) is None


def test_dnsbl_allowlist_outweighs_pregreet():
    svc = service(greet_wait="1s", greet_action="enforce", dnsbl_allowlist_threshold=-1)
    screening = screening_of(svc)
    screening.dnsbl_job = FinishedJob(Score(-2, ("dnswl.test(-2)",), ()))
    assert early.after_pause(screening, svc, PEER, 5, 0.3, b"EHLO ") == Decision.suspect(7.0)
    assert screening.trusted and not screening.verdict and not screening.blocked


def test_input_before_the_banner_is_improper_pipelining_at_the_first_command():
    svc = service(greet_wait="0s", reject_unauth_pipelining=True)
    screening = screening_of(svc)
    assert early.unpaused(screening, svc, PEER, 6) is None
    assert screening.early
    decision = limits.screen(screening, svc.log, CLIENT, "EHLO", BASE_COMMANDS["EHLO"], None,
                             "SMTP", b"")
    assert decision == Decision(reply=R.R503_PIPELINING, timeout=7.0)
    assert svc.log[-1] == f"improper command pipelining after CONNECT from {CLIENT}: EHLO"


# -- in the dialogue
def test_improper_pipelining_is_refused_with_503_and_makes_a_suspect():
    svc = service(reject_unauth_pipelining=True)
    screening = screening_of(svc)
    decision = limits.screen(screening, svc.log, CLIENT, "DATA", BASE_COMMANDS["DATA"], "bot",
                             "ESMTP", b"From: x\r\n")
    assert decision == combine(Decision.suspect(7.0), Decision.answer(R.R503_PIPELINING))
    assert screening.suspicious and screening.verdict == "unauth_pipelining"
    assert svc.log == [f"improper command pipelining after DATA from {CLIENT}: From: x"]
    # RCPT may be pipelined after EHLO (RFC 2920); QUIT never needs an answer first.
    calm = screening_of(svc)
    assert limits.screen(calm, svc.log, CLIENT, "RCPT", BASE_COMMANDS["RCPT"], "mx", "ESMTP",
                         b"RCPT TO:<b@example.test>\r\n") is None
    assert limits.screen(calm, svc.log, CLIENT, "QUIT", BASE_COMMANDS["QUIT"], None, "SMTP",
                         b"x") is None


def test_improper_pipelining_only_logged_when_not_rejected():
    svc = service()  # reject_unauth_pipelining = false, as Postfix's default
    decision = limits.screen(screening_of(svc), svc.log, CLIENT, "HELO", BASE_COMMANDS["HELO"],
                             None, "SMTP", b"MAIL FROM:<>\r\n")
    assert decision == Decision.suspect(7.0)  # the command runs


def test_too_many_errors_close_with_421():
    svc = service(hard_error_limit=3)
    screening = screening_of(svc)
    screening.errors = 2
    assert limits.after_command(screening, svc.log, CLIENT, "RCPT", 1, False, HOST) is None
    screening.errors = 3
    assert limits.after_command(screening, svc.log, CLIENT, "RCPT", 1, False, HOST) == \
        Decision.refuse(R.R421_TOO_MANY_ERRORS.format(host=HOST), "hard_errors")
    assert svc.log == [f"too many errors after RCPT from {CLIENT}"]
    assert screening.verdict == "hard_errors"
    # Closing already (QUIT), or trusted: no 421.
    assert limits.after_command(screening, svc.log, CLIENT, "QUIT", 1, True, HOST) is None


def test_a_delivery_starts_the_error_counts_again():
    """Postfix's error limits count errors without a delivery in between."""
    svc = service(hard_error_limit=3)
    screening = screening_of(svc)
    screening.errors, screening.junk = 2, 5
    limits.delivered(screening)
    assert (screening.errors, screening.junk) == (0, 0)
    screening.errors = 2
    assert limits.after_command(screening, svc.log, CLIENT, "RCPT", 1, False, HOST) is None


def test_junk_commands_count_as_errors_past_their_limit():
    svc = service(junk_command_limit=2, hard_error_limit=1)
    screening = screening_of(svc)
    for _ in range(3):
        assert limits.screen(screening, svc.log, CLIENT, "NOOP", BASE_COMMANDS["NOOP"], "mx",
                             "ESMTP", b"") is None
    assert screening.junk == 3 and screening.errors == 1
    decision = limits.after_command(screening, svc.log, CLIENT, "NOOP", 0, False, HOST)
    assert decision.close and screening.verdict == "junk_commands"


def test_reply_delay_is_the_tarpit_then_the_error_sleep():
    svc = service(tarpit_delay="2s", soft_error_limit=1, error_sleep_time="5s")
    screening = screening_of(svc)
    assert limits.before_reply(screening, R.R250_OK, False) is None
    assert limits.before_reply(screening, R.R503_NEED_MAIL, False) is None  # first error
    assert screening.errors == 1
    # Past soft_error_limit: the error sleep, and a suspect from now on.
    assert limits.before_reply(screening, R.R503_NEED_MAIL, False) == \
        Decision(delay=5.0, timeout=7.0)
    assert limits.before_reply(screening, R.R250_OK, False) == Decision.wait(2.0)  # tarpit
    # Never before a reply that closes the session.
    assert limits.before_reply(screening, R.R421_TOO_MANY_ERRORS, False) == \
        Decision.suspect(7.0)
    assert limits.before_reply(screening, R.R221_BYE, True) is None


def test_relay_is_denied_to_an_outside_client():
    svc = service()
    screening = screening_of(svc)
    assert limits.check_rcpt(screening, svc, PEER, CLIENT, "a@example.test") is None
    for rcpt in ("a@elsewhere.test", "a%b@example.test", "someone"):
        assert limits.check_rcpt(screening, svc, PEER, CLIENT, rcpt) == \
            Decision.answer(R.R554_RELAY_DENIED.format(rcpt=rcpt))
    assert screening.verdict == "relay_denied"
    inside = ("127.0.0.1", 5000)  # mynetworks
    assert limits.check_rcpt(screening_of(svc), svc, inside, "unknown[127.0.0.1]",
                             "a@elsewhere.test") is None


def test_unknown_recipient_in_the_recipient_table():
    svc = service()
    svc.recipients = RecipientTable("table", ["known@example.test"])
    screening = screening_of(svc)
    assert limits.check_rcpt(screening, svc, PEER, CLIENT, "Known@example.test") is None
    assert limits.check_rcpt(screening, svc, PEER, CLIENT, "nobody@example.test") == \
        Decision.answer(R.R550_UNKNOWN_USER.format(rcpt="nobody@example.test"))
    assert screening.bad_rcpts == 1


def test_rate_limits_refuse_with_450():
    svc = service(client_message_rate_limit=2)
    svc.rate_limited = True
    svc.anvil = SimpleNamespace(message=lambda ip: 3, recipient=lambda ip: 1)
    screening = screening_of(svc)
    assert limits.check_mail(screening, svc, PEER, CLIENT, "s@example.test") == \
        Decision.answer(R.R450_MESSAGE_RATE.format(ip=PEER[0]))
    assert svc.log == [f"Message delivery request rate limit exceeded: 3 from {CLIENT} "
                            "for service smtp"]
    screening.exempt = True  # mynetworks, allowlisted
    assert limits.check_mail(screening, svc, PEER, CLIENT, "s@example.test") is None


def test_combine_keeps_every_effect():
    assert combine() is None and combine(None, None) is None
    assert combine(Decision.suspect(7.0), None) == Decision.suspect(7.0)
    both = combine(Decision.suspect(9.0), Decision.suspect(7.0),
                   Decision.refuse(R.R421_TOO_MANY_ERRORS, "hard_errors"), Decision.wait(1.0))
    assert both == Decision(reply=R.R421_TOO_MANY_ERRORS, close=True, ended="hard_errors",
                            delay=1.0, timeout=7.0)
    assert combine(Decision.named("mail.example.test"), Decision.suspect(7.0)) == \
        Decision(timeout=7.0, client_name="mail.example.test")


def test_only_unknown_recipients_is_a_dictionary_attack():
    svc = service()
    released = []
    svc.anvil = SimpleNamespace(disconnect=released.append)
    screening = screening_of(svc)
    screening.bad_rcpts, screening.anvil_held = 3, True
    limits.closed(screening, svc, PEER, CLIENT, 0, 0)
    assert svc.log == [f"DICTIONARY 3 unknown recipient(s), none valid, from {CLIENT}"]
    assert screening.verdict == "bad_recipients" and released == [PEER[0]]
    valid = screening_of(svc)
    valid.bad_rcpts = 3
    limits.closed(valid, svc, PEER, CLIENT, 1, 0)  # one valid recipient: not guessing
    assert not valid.verdict


# -- the engine: the one place a decision becomes I/O (a socket pair, no network)
class Engine(ServerSession):
    """The shared dialogue with a policy given by the test."""

    __slots__ = ("policy", "verdicts")

    def before_banner(self):
        return self.policy

    def after_pause(self, arrived, waited):
        self.verdicts.append((arrived, bytes(self.conn.buf)))
        return Decision.refuse(R.R521_BLOCKED.format(ip="x", reason="pregreet test")) \
            if arrived else None


def engine(policy=None):
    ours, theirs = socket.socketpair()
    limits_ = SimpleNamespace(line_length_limit=2048, message_size_limit=1000,
                              max_recipients=10, timeout=300.0, per_record_deadline=False,
                              min_data_rate=0)
    svc = SimpleNamespace(limits=limits_, hostname=HOST, log=Said(), tls_context=None)
    session = Engine(svc, ours, PEER)
    session.policy, session.verdicts = policy, []
    return session, theirs


def received(theirs, expected: bytes) -> bytes:
    """What the client got, as long as `expected` (or less, at end of stream)."""
    theirs.settimeout(10)
    data = b""
    while len(data) < len(expected):
        more = theirs.recv(4096)
        if not more:
            break
        data += more
    return data


def test_the_engine_applies_a_decision_timeout_close_delay_reply():
    session, theirs = engine()
    started = time.monotonic()
    session.apply(Decision(reply=R.R421_TOO_MANY_ERRORS.format(host=HOST), close=True,
                           ended="hard_errors", delay=0.05, timeout=5.0))
    session.conn.flush()
    assert time.monotonic() - started >= 0.05
    wanted = R.R421_TOO_MANY_ERRORS.format(host=HOST).encode()
    assert received(theirs, wanted) == wanted
    assert session.closing and session.ended == "hard_errors" and session.conn.timeout == 5.0
    session.apply(Decision.suspect(30.0))  # a timeout only ever shrinks
    assert session.conn.timeout == 5.0
    session.apply(None)


def test_the_engine_writes_the_two_part_banner_and_asks_for_the_verdict():
    session, theirs = engine(Decision.pause(5.0))
    theirs.sendall(b"EHLO bot\r\n")  # a client that talks first: no wait for the pause
    session.greet()
    session.conn.flush()
    assert session.verdicts == [(10, b"EHLO bot\r\n")]
    wanted = (f"220-{HOST} ESMTP poolmgr\r\n".encode() +
              R.R521_BLOCKED.format(ip="x", reason="pregreet test").encode())
    assert received(theirs, wanted) == wanted
    assert session.closing
    polite, theirs = engine(None)  # no pause: the banner at once
    polite.greet()
    polite.conn.flush()
    wanted = f"220 {HOST} ESMTP poolmgr\r\n".encode()
    assert received(theirs, wanted) == wanted



# -- the client's name
NAMED = Peername("mail.example.test", "mail.example.test", False)
NO_PTR = Peername(UNKNOWN, UNKNOWN, False)
NOT_BACK = Peername(UNKNOWN, "forged.example.test", False)  # a PTR that does not resolve back


class Lookup:
    """A name lookup (the greenlet `Defence.spawn` makes): finished with `value`, or still
    under way (None)."""

    def __init__(self, value=None):
        self.value, self.waited, self.killed = value, None, False

    def join(self, timeout=None):
        self.waited = timeout

    def ready(self):
        return self.value is not None

    successful = ready

    def kill(self, block=True):
        self.killed = True


def looking_up(found, **defence):
    """A service whose lookups give `found`, and a session's screening after connect."""
    svc = service(reverse_lookup=True, **defence)
    job = Lookup(found)
    svc.defence.spawn = lambda find, ip: job
    screening = screening_of(svc)
    return svc, screening, job


def test_the_banner_names_the_client_that_was_looked_up_at_connect():
    svc, screening, job = looking_up(NAMED)
    assert early.on_connect(screening, svc, PEER, CLIENT) is None
    assert screening.name_job is job
    assert early.unpaused(screening, svc, PEER, 0) == Decision.named("mail.example.test")
    assert screening.peername == NAMED and 0 < job.waited <= 2.0  # reverse_timeout
    svc, screening, job = looking_up(NO_PTR, greet_wait="2s")  # after the greet pause too
    early.on_connect(screening, svc, PEER, CLIENT)
    assert early.after_pause(screening, svc, PEER, 0, 2.0, b"") == Decision.named(UNKNOWN)


def test_an_allowlisted_client_is_named_too():
    svc, screening, job = looking_up(NAMED, allowlist=["192.0.2.0/24"])
    early.on_connect(screening, svc, PEER, CLIENT)
    assert early.unpaused(screening, svc, PEER, 0) == Decision.named("mail.example.test")


def test_the_banner_waits_for_the_name_at_most_reverse_timeout_from_connect():
    svc, screening, job = looking_up(None, reverse_timeout="2s")  # never finishes
    early.on_connect(screening, svc, PEER, CLIENT)
    screening.started -= 5.0  # the banner comes 5 s after connect (a greet pause, say)
    assert early.unpaused(screening, svc, PEER, 0) == Decision.named(UNKNOWN)
    assert job.waited == 0.0 and job.killed and screening.peername == LOOKUP_FAILED


def test_no_lookup_no_name():
    svc = service()  # reverse_lookup = false
    screening = screening_of(svc)
    early.on_connect(screening, svc, PEER, CLIENT)
    assert screening.name_job is None and early.unpaused(screening, svc, PEER, 0) is None
    svc = service(reverse_lookup=True, denylist=["192.0.2.0/24"])  # refused at connect
    svc.defence.spawn = lambda find, ip: pytest.fail("looked up a client refused at connect")
    assert early.on_connect(screening_of(svc), svc, PEER, CLIENT).close


TEMPFAIL = R.R450_UNKNOWN_REVERSE_CLIENT.format(ip=PEER[0])
REJECT = R.R550_UNKNOWN_REVERSE_CLIENT.format(ip=PEER[0])


@pytest.mark.parametrize("action, found, reply", [
    ("tempfail", NO_PTR, TEMPFAIL), ("reject", NO_PTR, REJECT), ("ignore", NO_PTR, None),
    # a lookup that got no answer is unknown only for tempfail
    ("tempfail", LOOKUP_FAILED, TEMPFAIL), ("reject", LOOKUP_FAILED, None),
    # a PTR is a reverse name even when it does not resolve back (Postfix: that is
    # reject_unknown_client_hostname's test, not reject_unknown_reverse_client_hostname's)
    ("reject", NOT_BACK, None), ("tempfail", NAMED, None),
    ("tempfail", Peername(UNKNOWN, "forged.example.test", True), None),
])
def test_unknown_reverse_client_action_at_rcpt(action, found, reply):
    svc, screening, job = looking_up(found, unknown_reverse_client_action=action)
    early.on_connect(screening, svc, PEER, CLIENT)
    early.unpaused(screening, svc, PEER, 0)
    decision = limits.check_rcpt(screening, svc, PEER, CLIENT, "a@example.test")
    assert decision == (None if reply is None else Decision.answer(reply))
    forged = [f"hostname forged.example.test does not resolve to address {PEER[0]}"]
    assert [line for line in svc.log if line.startswith("hostname")] == \
        (forged if found == NOT_BACK else [])
    assert str(TEMPFAIL) == ("450 4.7.25 Client host rejected: cannot find your reverse "
                             "hostname, [192.0.2.7]")


def test_mynetworks_and_the_allowlist_are_exempt_from_the_unknown_reverse_action():
    for defence, peer in (({}, ("127.0.0.1", 5000)),  # the default mynetworks
                          ({"allowlist": ["192.0.2.0/24"]}, PEER)):
        svc, screening, job = looking_up(NO_PTR, unknown_reverse_client_action="reject",
                                         **defence)
        early.on_connect(screening, svc, peer, CLIENT)
        early.unpaused(screening, svc, peer, 0)
        assert screening.peername == NO_PTR and screening.exempt
        assert limits.check_rcpt(screening, svc, peer, CLIENT, "a@example.test") is None


def test_the_engine_shows_the_name_from_the_banner_on():
    session, theirs = engine()
    session.banner(Decision.named("mail.example.test"))
    session.banner(None)  # the connect line is logged once
    assert session.client == f"mail.example.test[{PEER[0]}]"
    assert session.name == "mail.example.test"
    assert session.service.log == [f"connect from mail.example.test[{PEER[0]}]"]
    unnamed, theirs = engine()  # a session that ends before its banner logs it at the end
    unnamed.resume(lambda: None)
    assert unnamed.service.log == [f"connect from {CLIENT}", f"disconnect from {CLIENT} "
                                                              "commands=0"]


# -- the line between policy and I/O
DEFENCE = Path(__file__).resolve().parent.parent / "poolmgr" / "defence"
IO_CALLS = {"reply", "write", "serve", "flush", "park", "greeted", "say_last", "apply",
            "wait_input", "readline", "discard_input"}
SESSION_NAMES = {"session", "conn", "sock", "self.session", "self.conn"}


def _name(node) -> str:
    return ast.unparse(node)


def session_io(source: str) -> list[str]:
    """Where `source` writes to a session or a connection: sets an attribute of one, calls
    one of their I/O methods, or takes one as an argument."""
    wrongs = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            for part in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(part, ast.Attribute) and (
                        _name(part.value) in SESSION_NAMES or
                        _name(part.value).endswith((".conn", ".session"))):
                    wrongs.append(f"line {node.lineno}: sets {_name(part)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in IO_CALLS:
            wrongs.append(f"line {node.lineno}: calls {_name(node.func)}()")
        if isinstance(node, ast.arg) and node.arg in ("session", "conn"):
            wrongs.append(f"line {node.lineno}: takes a {node.arg}")
    return wrongs


@pytest.mark.parametrize("path", sorted(DEFENCE.glob("*.py")), ids=lambda p: p.name)
def test_no_defence_writes_to_a_session_or_a_connection(path):
    """Defences are policy: they return decisions, the session engine does the I/O."""
    assert session_io(path.read_text()) == []


def test_the_static_check_finds_a_defence_that_writes():
    offending = ("def greet(session):\n"
                 "    session.closing, session.ended = True, 'hard_errors'\n"
                 "    session.reply(R.R421)\n"
                 "    session.conn.timeout = 3\n"
                 "    screening.conn.write(b'220-')\n"
                 "    session.service.parking.park(session, 6, then, then)\n"
                 "    session.serve()\n")
    assert sorted(session_io(offending)) == [
        "line 1: takes a session", "line 2: sets session.closing", "line 2: sets session.ended",
        "line 3: calls session.reply()", "line 4: sets session.conn.timeout",
        "line 5: calls screening.conn.write()", "line 6: calls session.service.parking.park()",
        "line 7: calls session.serve()"]
