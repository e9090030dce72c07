"""One verdict from the back-ends' results (scanner/verdict.py): spam levels, actions, amavisd's
headers, failures. Pure functions: no daemons needed here (the back-ends have their own tests
against the real daemons)."""

from dataclasses import replace

import pytest

from poolmgr.scanner.backends.base import Result
from poolmgr.scanner.verdict import Failure, Policy, decide
from poolmgr.smtp import replies as R

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
