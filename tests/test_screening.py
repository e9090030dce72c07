"""The defence layer's state and verdicts, without sockets: Screening's verbs and classify."""

import logging

from poolmgr import config
from poolmgr.defence.decision import Decision
from poolmgr.defence.screening import Screening
from poolmgr.defence.verdicts import REASONS, Action, Reason, classify
from poolmgr.smtp import replies as R

CFG = config.from_dict({"defence": {"suspicious_timeout": "7s", "stress_timeout": "9s",
                                    "stress_hard_error_limit": 1}}).defence


def screening(stress=False):
    return Screening(CFG, ("192.0.2.1", 4000), logging.getLogger("test"), stress)


def test_flag_applies_each_action_in_one_place():
    ignore = screening()
    assert ignore.flag(Reason.PREGREET, Action.IGNORE, "PREGREET", "pregreet test") is None
    assert ignore.verdict == "pregreet" and not ignore.suspicious and not ignore.blocked
    enforce = screening()
    # enforce: no reply now, a suspect's shorter timeout (suspicious_timeout)
    assert enforce.flag(Reason.DNSBL, "enforce", "DNSBL", "zen.test") == Decision(timeout=7.0)
    assert enforce.blocked == "zen.test" and enforce.suspicious
    drop = screening()
    assert drop.flag(Reason.DENYLIST, "drop", "DENYLISTED", "denylist") == Decision(
        reply=R.R521_BLOCKED.format(ip="192.0.2.1", reason="denylist"), close=True,
        timeout=7.0)
    drop.flag(Reason.PREGREET, "enforce", "PREGREET", "pregreet test")
    assert drop.verdict == "denylist"  # the first test that fired names the session


def test_stress_mode_is_read_when_the_session_starts():
    stressed = screening(stress=True)
    assert stressed.stressed and stressed.hard_limit == 1
    assert not screening().stressed and screening().hard_limit == CFG.hard_error_limit


def test_classify_gives_one_label():
    assert classify("", 1, 0, 1, "quit", 5) == "legit"
    assert classify("dnsbl", 0, 0, 0, "lost", 3) == "dnsbl"
    assert classify("", 0, 0, 0, "lost", 0) == "lost_after_connect"
    assert classify("", 0, 0, 1, "quit", 4) == "legit"  # a sender verification probe
    assert classify("", 0, 1, 1, "quit", 5) == "content_rejected"
    assert classify("", 0, 0, 0, "timeout", 1) == "idle_timeout"
    assert classify("", 0, 0, 0, "slow", 1) == "slow_client"  # cut by a deadline while sending
    assert classify("", 1, 0, 1, "slow", 7) == "legit"  # a message accepted before
    assert REASONS[:3] == ("pregreet", "dnsbl", "denylist")  # scoreboard order: append only


def test_the_defence_actions_settings_offer_are_the_actions_applied():
    from poolmgr.settings import SETTINGS

    actions = {s.name: s.choices for s in SETTINGS if s.key in
               ("denylist_action", "greet_action", "dnsbl_action")}
    assert len(actions) == 3
    assert all(choices == tuple(a.value for a in Action) for choices in actions.values())
