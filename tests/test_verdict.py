"""One verdict from the back-ends' results (scanner/verdict.py): spam levels, actions, amavisd's
headers, failures. Pure functions: no daemons needed here (the back-ends have their own tests
against the real daemons)."""

from dataclasses import replace

import pytest

from poolmgr.scanner.backends.base import Result
from poolmgr.scanner.verdict import Failure, Policy, decide
from poolmgr.smtp import replies as R
from poolmgr.smtp.headers import Insertion, Removal

POLICY = Policy(tag_level=2.0, tag2_level=6.31, kill_level=10.0, spam_subject_tag="***Spam*** ",
                spam_action="pass", virus_action="reject", hostname="mx.test")


def spamd(score: float, *tests: str) -> Result:
    return Result("spamd", score=score, required=5.0, tests=tests)


def headers(verdict) -> dict[str, str]:
    text = verdict.headers.decode().replace("\r\n\t", " ")
    return dict(line.split(": ", 1) for line in text.splitlines())


@pytest.mark.parametrize("score, kind, flag, tagged", [
    (1.0, "clean", None, False),         # below tag_level: no spam headers
    (2.0, "clean", "NO", False),         # at tag_level: headers, not spam
    (6.31, "spam_tagged", "YES", True),  # at tag2_level: flag and subject tag
    (10.0, "spam_killed", "YES", True),  # at kill_level: spam_action (pass: delivered)
])
def test_spam_levels(score, kind, flag, tagged):
    verdict = decide([spamd(score, "GTUBE")], [], POLICY, virus_checked=False)
    assert (verdict.kind, verdict.action) == (kind, "deliver")
    assert headers(verdict).get("X-Spam-Flag") == flag
    assert verdict.subject_tag == ("***Spam*** " if tagged else "")
    if flag:
        fields = headers(verdict)
        assert fields["X-Spam-Score"] == f"{score:.3f}"
        assert fields["X-Spam-Level"] == "*" * int(score)
        assert fields["X-Spam-Status"] == (
            f"{'Yes' if flag == 'YES' else 'No'}, score={score:.3f} tagged_above=2 "
            f"required=6.31 tests=[GTUBE]")


@pytest.mark.parametrize("action, reply", [("reject", R.R554_SPAM.format(score="1000.000")),
                                           ("discard", None), ("pass", None)])
def test_spam_action_at_kill_level(action, reply):
    policy = replace(POLICY, spam_action=action)
    verdict = decide([spamd(1000.0, "GTUBE")], [], policy, virus_checked=False)
    assert verdict.kind == "spam_killed"
    assert verdict.action == {"pass": "deliver"}.get(action, action)
    assert verdict.reply == reply


def test_a_virus_wins_over_spam_and_failures():
    verdict = decide([spamd(50.0), Result("clamd", virus="Win.Test.EICAR_HDB-1")],
                     [Failure("rspamd", "connect refused", "tempfail")], POLICY, True)
    assert (verdict.kind, verdict.action) == ("virus", "reject")
    assert str(verdict.reply) == "554 5.7.0 Rejected: virus found: Win.Test.EICAR_HDB-1"
    assert b"X-Virus-Scanned: poolmgr at mx.test\r\n" == verdict.headers


def test_failures_follow_on_failure():
    tempfail = decide([Result("builtin")], [Failure("clamd", "timeout", "tempfail")], POLICY,
                      True)
    assert (tempfail.kind, tempfail.action) == ("failed", "tempfail")
    assert tempfail.reply.code == 451 and "clamd" in tempfail.reply.text
    passed = decide([Result("builtin")], [Failure("spamd", "timeout", "pass")], POLICY, True)
    assert (passed.kind, passed.action) == ("clean", "deliver")
    assert passed.summary == "clean (unchecked by spamd)"


def test_the_highest_score_of_several_back_ends_counts():
    verdict = decide([spamd(3.0, "A"), Result("rspamd", score=8.0, required=15.0,
                                              tests=("B",))], [], POLICY, False)
    assert verdict.kind == "spam_tagged" and verdict.score == 8.0
    assert "tests=[A, B]" in headers(verdict)["X-Spam-Status"]


def test_builtin_tag_rules_and_reject_rules():
    tagged = decide([Result("builtin", tests=("cheap",))], [], POLICY, True)
    assert (tagged.kind, tagged.summary) == ("clean", "tagged (cheap)")
    banned = decide([Result("builtin", rule="no-lottery")], [], POLICY, True)
    assert (banned.kind, banned.action) == ("banned", "reject")
    assert banned.reply == R.R554_CONTENT_RULE.format(name="no-lottery")


# A back-end that judges the message itself (rspamd's action, Result.decision).

def rspamd(score: float, decision: str, **fields) -> Result:
    return Result("rspamd", score=score, required=15.0, tests=("R",),
                  action={"kill": "reject", "defer": "greylist", "tag": "add header",
                          "clean": "no action"}[decision], decision=decision, **fields)


@pytest.mark.parametrize("decision, kind, flag", [
    ("kill", "spam_killed", "YES"),   # whatever its score: the kill path, spam_action
    ("tag", "spam_tagged", "YES"),    # below tag2_level, still spam
    ("clean", "clean", None),         # no spam headers below tag_level
])
def test_a_decision_wins_over_the_levels(decision, kind, flag):
    verdict = decide([rspamd(1.0, decision)], [], replace(POLICY, spam_action="reject"), False)
    assert verdict.kind == kind
    assert headers(verdict).get("X-Spam-Flag") == flag
    if decision == "kill":
        assert verdict.reply == R.R554_SPAM.format(score="1.000")
    # rspamd's "add header" leaves the Subject alone; the kill path tags it as at kill_level
    assert verdict.subject_tag == ("***Spam*** " if decision == "kill" else "")


def test_a_defer_decision_is_451_with_the_back_ends_text():
    verdict = decide([rspamd(0.0, "defer", reply_text="Ratelimit exceeded")], [], POLICY, True)
    assert (verdict.kind, verdict.action) == ("deferred", "tempfail")
    assert str(verdict.reply) == "451 4.7.1 Ratelimit exceeded"
    assert (verdict.summary, verdict.name) == ("deferred (rspamd: greylist)", "greylist")
    plain = decide([rspamd(4.5, "defer")], [], POLICY, True)
    assert str(plain.reply) == "451 4.7.1 Try again later"  # rspamd's milter says so too
    # worse verdicts still win: another back-end's score at kill_level, a virus
    killed = decide([rspamd(0.0, "defer"), spamd(12.0)], [], POLICY, True)
    assert killed.kind == "spam_killed"
    virus = decide([rspamd(0.0, "defer"), Result("clamd", virus="V")], [], POLICY, True)
    assert virus.kind == "virus"


def test_other_back_ends_scores_still_meet_the_levels():
    high = decide([rspamd(12.0, "clean")], [], POLICY, False)
    assert (high.kind, headers(high)["X-Spam-Flag"]) == ("clean", "NO")  # headers from tag_level
    verdict = decide([rspamd(12.0, "clean"), spamd(7.0, "S")], [], POLICY, False)
    assert verdict.kind == "spam_tagged"  # spamd's 7 >= tag2_level; rspamd's 12 decides nothing
    assert verdict.subject_tag == "***Spam*** "
    assert verdict.score == 12.0  # the headers show the highest score


def test_a_new_subject_and_header_edits_reach_delivered_verdicts():
    edits = (Removal("X-Drop", 0), Insertion("X-Top", "first", 0))
    rewritten = decide([rspamd(8.5, "tag", subject="[SPAM] hi", edits=edits)], [], POLICY,
                       False)
    assert (rewritten.kind, rewritten.subject, rewritten.subject_tag) == (
        "spam_tagged", "[SPAM] hi", "")
    assert rewritten.edits == edits
    clean = decide([Result("builtin"), rspamd(0.5, "clean", subject="ignored", edits=edits)],
                   [], POLICY, True)
    assert (clean.kind, clean.subject, clean.edits) == ("clean", "", edits)
    deferred = decide([rspamd(0.0, "defer", edits=edits)], [], POLICY, True)
    assert deferred.edits == ()  # nothing is delivered


@pytest.mark.parametrize("virus_action", ["reject", "discard"])
def test_banned_contents_are_answered_as_a_virus_is(virus_action):
    path = "multipart/mixed | application/pdf,.pdf,invoice.pdf.exe"
    policy = replace(POLICY, virus_action=virus_action)
    verdict = decide([Result("banned", banned=path)], [], policy, True, queue_id="4A1B2C3D4E")
    assert (verdict.kind, verdict.action) == ("banned", virus_action)
    assert verdict.summary == f"BANNED ({path})" and verdict.name == path
    assert verdict.reply == (R.Reply(554, "5.7.0", "Reject, id=4A1B2C3D4E - BANNED: "
                                     "application/pdf,.pdf,invoice.pdf.exe")
                             if virus_action == "reject" else None)
    worse = decide([Result("banned", banned=path), Result("clamd", virus="Win.Test")], [],
                   POLICY, True)
    assert worse.kind == "virus"  # a virus is named as such, as amavisd's categories rank
