"""The tests before the dialogue (postscreen_early.c's job): access lists and per-client limits
at connect, the pregreet test with a two-part banner, the DNSBL score settled before the
banner's end. Their log lines are postscreen's (DENYLISTED, PREGREET, DNSBL rank, PASS NEW).

Each function takes the SMTP session (`smtp.front.FrontSession`) and works on its
`screening`; a reply returned is sent instead of the banner and the session ends.
"""

__all__ = ["on_connect", "greet"]

import time

from ..smtp import replies as R
from .networks import in_networks
from .screening import delta_time, escape
from .verdicts import Reason


def on_connect(session) -> R.Reply | None:
    service, screening, ip = session.service, session.screening, session.peer[0]
    defence = service.defence
    if defence.allowlisted(ip):
        screening.trust()
        service.log.info("ALLOWLISTED [%s]:%s", ip, session.peer[1])
        return None
    if defence.denylisted(ip):
        refusal = screening.flag(Reason.DENYLIST, defence.cfg.denylist_action,
                                 f"DENYLISTED [{ip}]:{session.peer[1]}", "denylist")
        if refusal is not None:
            return refusal
    screening.exempt = in_networks(ip, service.cfg.smtp.mynetworks)
    if service.rate_limited and not screening.exempt:
        refusal = _anvil_connect(session)
        if refusal is not None:
            return refusal
    if defence.dnsbl is not None:
        screening.dnsbl_job = defence.spawn(defence.dnsbl.score, ip)
    return None


def _anvil_connect(session) -> R.Reply | None:
    service, screening, ip = session.service, session.screening, session.peer[0]
    d = service.defence.cfg
    usage = service.anvil.connect(ip)
    if usage is None:
        return None
    screening.anvil_held = True
    for limit, value, what in ((d.client_connection_count_limit, usage.count, "concurrency"),
                               (d.client_connection_rate_limit, usage.rate, "rate")):
        if limit and value > limit:
            service.log.warning("Connection %s limit exceeded: %d from %s for service smtp",
                                what, value, session.client)
            screening.verdict = Reason.RATE_LIMIT.value
            return R.R421_TOO_MANY_CONNECTIONS.format(host=service.hostname, ip=ip)
    return None


def greet(session) -> R.Reply | None:
    """The banner, after the pregreet test and the DNSBL score; a refusal instead of it.

    In an SMTP worker the greet pause is a park (`smtp.park`): the session goes on in
    `_after_pause` and then its command loop, and this returns nothing."""
    service, screening, conn, ip = (session.service, session.screening, session.conn,
                                    session.peer[0])
    defence = service.defence
    if not screening.trusted and defence.needs_greet_test(ip):
        # Two-part banner (postscreen): bots that talk at once show themselves.
        banner = R.R220_BANNER.format(host=service.hostname)
        conn.write(f"220-{banner.text}\r\n".encode())
        started = time.monotonic()
        parking = service.parking
        if parking is not None:
            conn.flush()

            def then():
                session.greeted(_after_pause(session, started, conn.wait_input(0)))
                session.serve()

            parking.park(session, defence.cfg.greet_wait, then, then)
        return _after_pause(session, started, conn.wait_input(defence.cfg.greet_wait))
    passed = ""
    if not screening.trusted:
        screening.early = bool(conn.wait_input(0))
        passed = "OLD" if defence.cfg.greet_wait > 0 else ""
    return _banner(session, passed)


def _after_pause(session, started: float, early: int) -> R.Reply | None:
    """The greet test's verdict: `early` bytes arrived during the pause."""
    screening, defence, ip = session.screening, session.service.defence, session.peer[0]
    if not early:
        defence.greet_test_passed(ip)
        return _banner(session, "NEW")
    # postscreen: the byte count, the time since the banner, what the client said.
    refusal = screening.flag(Reason.PREGREET, defence.cfg.greet_action,
                             f"PREGREET {early} after "
                             f"{delta_time(time.monotonic() - started)} from "
                             f"[{ip}]:{session.peer[1]}", "pregreet test",
                             client_text=escape(session.conn.buf[:100]))
    return refusal if refusal is not None else _banner(session, "")


def _banner(session, passed: str) -> R.Reply | None:
    """After the greet test (`passed`: postscreen's PASS NEW or OLD, or ""): the DNSBL score,
    then the banner's last line."""
    service, screening, ip = session.service, session.screening, session.peer[0]
    if screening.dnsbl_job is not None and not screening.trusted:
        refusal = _settle_dnsbl(session)
        if refusal is not None:
            return refusal
    if passed and not screening.verdict and not screening.trusted:
        service.log.info("PASS %s [%s]:%s", passed, ip, session.peer[1])
    session.reply(R.R220_BANNER.format(host=service.hostname))
    return None


def _settle_dnsbl(session) -> R.Reply | None:
    screening, log, peer = session.screening, session.service.log, session.peer
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
        sites = ",".join(h.split("(")[0] for h in score.hits)
        return screening.flag(Reason.DNSBL, cfg.dnsbl_action,
                              f"DNSBL rank {score.total} for [{peer[0]}]:{peer[1]}; "
                              f"sites={score.describe()}", sites)
    if score.total > 0:
        screening.suspect()
    return None
