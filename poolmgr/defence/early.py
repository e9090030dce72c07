"""The tests before the dialogue (postscreen_early.c's job): access lists and per-client limits
at connect, the pregreet test with a two-part banner, the DNSBL score settled before the
banner's end. Their log lines are postscreen's (DENYLISTED, PREGREET, DNSBL rank, PASS NEW).
The client's name (`peername`, smtpd's job in Postfix) is looked up beside them, from connect,
and settled with the banner, which waits for it at most `reverse_timeout` from connect.

Each function takes the session's defence state (`screening.Screening`) and what it reads
(the worker's `service`: defence, anvil, log, config; the client's address), and returns a
`decision.Decision` or None; the session engine (`smtp.front.FrontSession`) applies it. In
order:

- `on_connect`: a refusal here (521, 421) is sent instead of the banner and the session ends;
- `before_banner`: a pause (`Decision.pause`) when the greet test runs: the engine writes the
  banner's first line (`220-`), waits (parked, in an SMTP worker) and asks `after_pause` for
  the verdict on what arrived; with no pause it asks `unpaused`;
- `after_pause`, `unpaused`: a refusal instead of the banner's last line, or None (possibly a
  shorter timeout) to send it; with the client's name when it was looked up
  (`Decision.client_name`).
"""

__all__ = ["on_connect", "before_banner", "after_pause", "unpaused"]

import time

from ..smtp import replies as R
from .decision import Decision, combine
from .networks import in_networks
from .peername import LOOKUP_FAILED, UNKNOWN
from .screening import delta_time, escape
from .verdicts import Reason


def on_connect(screening, service, peer: tuple, client: str) -> Decision | None:
    ip, defence = peer[0], service.defence
    # Stress mode is read when the session starts, its timeout with it.
    stress = Decision.suspect(screening.cfg.stress_timeout) if screening.stressed else None
    if defence.allowlisted(ip):
        screening.trust()
        service.log.info("ALLOWLISTED [%s]:%s", ip, peer[1])
        _look_up_name(screening, defence, ip)
        return stress
    denylisted = None
    if defence.denylisted(ip):
        denylisted = screening.flag(Reason.DENYLIST, defence.cfg.denylist_action,
                                    f"DENYLISTED [{ip}]:{peer[1]}", "denylist")
        if denylisted is not None and denylisted.close:
            return combine(stress, denylisted)
    screening.exempt = in_networks(ip, service.cfg.smtp.mynetworks)
    if service.rate_limited and not screening.exempt:
        refusal = _anvil_connect(screening, service, peer, client)
        if refusal is not None:
            return combine(stress, denylisted, refusal)
    if defence.dnsbl is not None:
        screening.dnsbl_job = defence.spawn(defence.dnsbl.score, ip)
    _look_up_name(screening, defence, ip)
    return combine(stress, denylisted)


def _look_up_name(screening, defence, ip: str) -> None:
    """The client's name, for every client that gets a banner (the allowlisted too: it is
    for the log and the headers), asked now, beside the greet pause and the DNSBL queries."""
    if defence.names is not None:
        screening.name_job = defence.spawn(defence.names.find, ip)


def _anvil_connect(screening, service, peer: tuple, client: str) -> Decision | None:
    ip, d = peer[0], service.defence.cfg
    usage = service.anvil.connect(ip)
    if usage is None:
        return None
    screening.anvil_held = True
    for limit, value, what in ((d.client_connection_count_limit, usage.count, "concurrency"),
                               (d.client_connection_rate_limit, usage.rate, "rate")):
        if limit and value > limit:
            service.log.warning("Connection %s limit exceeded: %d from %s for service smtp",
                                what, value, client)
            screening.verdict = Reason.RATE_LIMIT.value
            return Decision.refuse(R.R421_TOO_MANY_CONNECTIONS.format(host=service.hostname,
                                                                      ip=ip))
    return None


def before_banner(screening, defence, ip: str) -> Decision | None:
    """The greet test's pause (a two-part banner, as postscreen's: bots that talk at once
    show themselves), or None when the test is not run (trusted, or passed before)."""
    if not screening.trusted and defence.needs_greet_test(ip):
        return Decision.pause(defence.cfg.greet_wait)
    return None


def after_pause(screening, service, peer: tuple, arrived: int, waited: float,
                sample: bytes) -> Decision | None:
    """The greet test's verdict: `arrived` bytes came during the pause of `waited` seconds,
    `sample` the first of them. Then the DNSBL score (`unpaused`'s part)."""
    defence, ip = service.defence, peer[0]
    if not arrived:
        defence.greet_test_passed(ip)
        return _banner(screening, service, peer, "NEW")
    # postscreen: the byte count, the time since the banner, what the client said.
    flagged = screening.flag(Reason.PREGREET, defence.cfg.greet_action,
                             f"PREGREET {arrived} after {delta_time(waited)} from "
                             f"[{ip}]:{peer[1]}", "pregreet test",
                             client_text=escape(sample[:100]))
    if flagged is not None and flagged.close:
        return flagged
    return combine(flagged, _banner(screening, service, peer, ""))


def unpaused(screening, service, peer: tuple, pending: int) -> Decision | None:
    """Before the banner when the greet test did not run: `pending` bytes the client sent
    already (improper pipelining, judged at its first command), then the DNSBL score."""
    passed = ""
    if not screening.trusted:
        screening.early = bool(pending)
        passed = "OLD" if service.defence.cfg.greet_wait > 0 else ""
    return _banner(screening, service, peer, passed)


def _banner(screening, service, peer: tuple, passed: str) -> Decision | None:
    """After the greet test (`passed`: postscreen's PASS NEW or OLD, or ""): the DNSBL score;
    None (or a shorter timeout) lets the banner's last line go; with the client's name."""
    named = _settle_name(screening)
    settled = None
    if screening.dnsbl_job is not None and not screening.trusted:
        settled = _settle_dnsbl(screening, service.log, peer)
        if settled is not None and settled.close:
            return combine(named, settled)
    if passed and not screening.verdict and not screening.trusted:
        service.log.info("PASS %s [%s]:%s", passed, peer[0], peer[1])
    return combine(named, settled)


def _settle_name(screening) -> Decision | None:
    """The looked-up name, waited for until `reverse_timeout` after connect at most; a
    lookup still under way then is given up (a temporary failure: `unknown`)."""
    job, screening.name_job = screening.name_job, None
    if job is None:
        return None
    job.join(max(0.0, screening.started + screening.cfg.reverse_timeout - time.monotonic()))
    if job.ready() and job.successful() and job.value is not None:
        screening.peername = job.value
    else:
        if not job.ready():
            job.kill(block=False)
        screening.peername = LOOKUP_FAILED
    found = screening.peername
    if found.name == UNKNOWN != found.reverse and not found.temporary:
        # smtpd_peer.c's line for a PTR name that does not resolve back (a forged name)
        screening.log.warning("hostname %s does not resolve to address %s", found.reverse,
                              screening.peer[0])
    return Decision.named(found.name)


def _settle_dnsbl(screening, log, peer: tuple) -> Decision | None:
    job, screening.dnsbl_job = screening.dnsbl_job, None
    job.join()  # Dnsbl.score is bounded by dnsbl_timeout
    if not job.successful():
        return None
    score, cfg = job.value, screening.cfg
    if score.unanswered:
        log.info("DNSBL no answer from %s for [%s]", ",".join(score.unanswered), peer[0])
    if cfg.dnsbl_allowlist_threshold < 0 and score.total <= cfg.dnsbl_allowlist_threshold:
        log.info("DNSBL allowlisted rank %d for [%s]:%s; sites=%s", score.total, peer[0],
                 peer[1], score.describe())
        screening.trusted = True
        if screening.verdict == Reason.PREGREET:  # a good reputation outweighs pregreet
            screening.verdict, screening.blocked = "", ""
        return None
    if score.total >= cfg.dnsbl_threshold:
        # The client's reply names each site as dnsbl_reply_map shows it (a DQS key in the
        # domain queried stays secret); the log keeps the domain queried, for the admin.
        shown = ",".join(cfg.dnsbl_reply_map.get(domain, domain) for domain in score.listed)
        return screening.flag(Reason.DNSBL, cfg.dnsbl_action,
                              f"DNSBL rank {score.total} for [{peer[0]}]:{peer[1]}; "
                              f"sites={score.describe()}", shown)
    if score.total > 0:
        return screening.suspect()
    return None
