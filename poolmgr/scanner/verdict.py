"""The scanner's verdict on one message: the check back-ends' results merged into one, the action
that fits where the scanner sits, and amavisd's headers.

Kinds, worst first (amavisd's contents categories): `virus`, `banned` (banned contents,
answered as a virus is, by virus_action; or a builtin rule whose action is reject),
`spam_killed` (score at or above kill_level), `deferred` (a back-end that judges itself asks
the sender to try later: rspamd's soft reject or greylist), `failed` (a back-end could not
answer and its on_failure is tempfail), `spam_tagged` (at or above tag2_level), `clean`. A
back-end that judges itself (`Result.decision`: rspamd's action) counts as killing, tagging
or clean whatever its score; the others' scores meet the levels.
Actions: `deliver`, `reject` (554, before the queue), `discard` (accept, quarantine, do not
deliver) and `tempfail` (451, the sender retries).

Headers as amavisd-new writes them, so sieve and procmail rules written for it keep working:
`X-Virus-Scanned: poolmgr at HOST`, and from tag_level on (or when spam) `X-Spam-Flag`,
`X-Spam-Score`, `X-Spam-Level` (one star per point) and `X-Spam-Status: Yes|No, score=...
tagged_above=... required=... tests=[...]`. Any copy of them in incoming mail is removed first
(`FORGEABLE`). A delivered message also gets the header edits the back-ends asked for
(`edits`, e.g. rspamd's milter headers and DKIM signature) and the Subject one of them wrote
(`subject`), else `subject_tag` in front of its own.
"""

__all__ = ["decide", "Verdict", "Failure", "Policy", "KINDS", "FORGEABLE"]

from dataclasses import dataclass, field

from ..smtp import replies as R
from .backends.base import Result, printable

KINDS = ("clean", "spam_tagged", "spam_killed", "virus", "banned", "failed", "deferred")
# Headers only the scanner may write; a client's copies are removed before it adds its own.
FORGEABLE = ("X-Poolmgr-Scan", "X-Virus-Scanned", "X-Spam-Flag", "X-Spam-Score",
             "X-Spam-Level", "X-Spam-Status")
MAX_STARS = 64  # amavisd's X-Spam-Level is capped too


@dataclass(frozen=True)
class Failure:
    check: str
    detail: str
    on_failure: str  # tempfail or pass


@dataclass(frozen=True)
class Policy:
    """The settings a verdict depends on (the scanner section, or a listener's policy bank)."""
    tag_level: float
    tag2_level: float
    kill_level: float
    spam_subject_tag: str
    spam_action: str
    virus_action: str
    hostname: str

    @classmethod
    def of(cls, scanner) -> "Policy":
        return cls(scanner.tag_level, scanner.tag2_level, scanner.kill_level,
                   scanner.spam_subject_tag, scanner.spam_action, scanner.virus_action,
                   scanner.hostname)


@dataclass
class Verdict:
    kind: str
    action: str
    reply: R.Reply | None = None       # for reject and tempfail
    headers: bytes = b""               # to add at the top of the message
    subject_tag: str = ""              # to put in front of the Subject
    subject: str = ""                  # a back-end's whole new Subject (then no subject_tag)
    edits: tuple = ()                  # back-ends' header edits (smtp.headers Removal,
    #                                    Insertion), in order, for a delivered message
    summary: str = "clean"             # X-Poolmgr-Scan and the log: "tagged (rule)", ...
    name: str = ""                     # virus or rule name
    score: float | None = None
    tests: tuple[str, ...] = ()
    failures: list[Failure] = field(default_factory=list)


def _spam_headers(score: float, tests: tuple[str, ...], policy: Policy, spam: bool) -> str:
    stars = "*" * min(MAX_STARS, max(0, int(score)))
    return (f"X-Spam-Flag: {'YES' if spam else 'NO'}\r\n"
            f"X-Spam-Score: {score:.3f}\r\n"
            f"X-Spam-Level: {stars}\r\n"
            f"X-Spam-Status: {'Yes' if spam else 'No'}, score={score:.3f} "
            f"tagged_above={policy.tag_level:g} required={policy.tag2_level:g}\r\n"
            f"\ttests=[{', '.join(tests)}]\r\n")


def decide(results: list[Result], failures: list[Failure], policy: Policy,
           virus_checked: bool, queue_id: str = "") -> Verdict:
    """One verdict from every back-end's result and failure, under `policy`; `queue_id` names
    the message in a banned reply, as amavisd's id does."""
    headers = f"X-Virus-Scanned: poolmgr at {policy.hostname}\r\n" if virus_checked else ""
    virus = next((r.virus for r in results if r.virus), "")
    if virus:
        action = policy.virus_action
        return Verdict("virus", action, R.R554_VIRUS.format(name=virus)
                       if action == "reject" else None, headers.encode(),
                       summary=f"INFECTED ({virus})", name=virus, failures=failures)
    found = next((r.banned for r in results if r.banned), "")
    if found:
        action = policy.virus_action
        part = found.rsplit(" | ", 1)[-1]  # amavisd's reply names the part, its log the path
        reply = R.R554_BANNED.format(queue_id=queue_id, name=printable(part)) \
            if action == "reject" else None
        return Verdict("banned", action, reply, headers.encode(), summary=f"BANNED ({found})",
                       name=found, failures=failures)
    rule = next((r.rule for r in results if r.rule), "")
    if rule:
        return Verdict("banned", "reject", R.R554_CONTENT_RULE.format(name=rule),
                       headers.encode(), summary=f"rejected ({rule})", name=rule,
                       failures=failures)
    scored = [r for r in results if r.score is not None]
    score = max((r.score for r in scored), default=None)
    spam_tests = tuple(t for r in scored for t in r.tests)
    tags = tuple(t for r in results if r.score is None for t in r.tests)  # builtin tag rules
    # Scores meet the levels unless their back-end judged the message itself.
    level = max((r.score for r in scored if not r.decision), default=None)
    decisions = [r for r in results if r.decision]
    killed = any(r.decision == "kill" for r in decisions) or \
        (level is not None and level >= policy.kill_level)
    tagged = level is not None and level >= policy.tag2_level
    spam = killed or tagged or any(r.decision == "tag" for r in decisions)
    if score is not None and (spam or score >= policy.tag_level):
        headers += _spam_headers(score, spam_tests, policy, spam)
    delivered = dict(edits=tuple(e for r in results for e in r.edits), score=score,
                     tests=spam_tests, failures=failures)
    # A back-end that tags by itself changes the Subject only when it says how (rspamd's
    # rewrite subject; its add header leaves it, and the DKIM signature it made, intact).
    subject = next((r.subject for r in results if r.subject), "") if spam else ""
    subject_tag = policy.spam_subject_tag if (killed or tagged) and not subject else ""
    if killed:
        action = {"pass": "deliver"}.get(policy.spam_action, policy.spam_action)
        return Verdict("spam_killed", action, R.R554_SPAM.format(score=f"{score:.3f}")
                       if action == "reject" else None, headers.encode(), subject_tag,
                       subject, summary=f"SPAM (score={score:.3f})", **delivered)
    deferring = next((r for r in decisions if r.decision == "defer"), None)
    if deferring is not None:
        return Verdict("deferred", "tempfail", R.R451_DEFERRED_BY_CHECK.format(
                           text=deferring.reply_text or "Try again later"),
                       summary=f"deferred ({deferring.check}: {deferring.action})",
                       name=deferring.action,
                       score=score, tests=spam_tests, failures=failures)
    if any(f.on_failure == "tempfail" for f in failures):
        failed = next(f for f in failures if f.on_failure == "tempfail")
        return Verdict("failed", "tempfail", R.R451_CHECK_FAILED.format(check=failed.check),
                       summary=f"failed ({failed.check})", failures=failures)
    if spam:
        return Verdict("spam_tagged", "deliver", None, headers.encode(), subject_tag, subject,
                       summary=f"SPAM (score={score:.3f})", **delivered)
    summary = f"tagged ({','.join(tags)})" if tags else "clean"
    if failures:
        summary += f" (unchecked by {','.join(f.check for f in failures)})"
    delivered["tests"] = spam_tests or tags
    return Verdict("clean", "deliver", None, headers.encode(), summary=summary, **delivered)
