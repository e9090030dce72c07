"""Verdicts and actions of the storm defences: a leaf module, imported by everyone, importing
nothing of poolmgr.

`Action` is what a defence test does when it fires (postscreen's actions); `Reason` names why
a session was nuisance, one label per closed session (`classify`). The scoreboard keeps one
counter per reason, in the order declared here: append only.
"""

__all__ = ["Action", "Reason", "REASONS", "classify", "LEGIT"]

from enum import Enum


class Action(str, Enum):
    IGNORE = "ignore"    # log only
    ENFORCE = "enforce"  # answer, but refuse every RCPT with 550 5.7.1 (broken MTAs reconnect
    #                      at once when dropped)
    DROP = "drop"        # 521 5.7.1 and close


class Reason(str, Enum):
    PREGREET = "pregreet"
    DNSBL = "dnsbl"
    DENYLIST = "denylist"
    RATE_LIMIT = "rate_limit"
    IDLE_TIMEOUT = "idle_timeout"
    LOST_AFTER_CONNECT = "lost_after_connect"
    LOST_CONNECTION = "lost_connection"
    NO_TRANSACTION = "no_transaction"
    BAD_RECIPIENTS = "bad_recipients"
    HARD_ERRORS = "hard_errors"
    JUNK_COMMANDS = "junk_commands"
    UNAUTH_PIPELINING = "unauth_pipelining"
    TLS_FAILURE = "tls_failure"
    RELAY_DENIED = "relay_denied"
    CONTENT_REJECTED = "content_rejected"
    SLOW_CLIENT = "slow_client"  # cut by smtp.per_record_deadline or smtp.min_data_rate


REASONS = tuple(reason.value for reason in Reason)
LEGIT = "legit"


def classify(verdict: str, accepted: int, rejected: int, transactions: int, ended: str,
             commands: int) -> str:
    """One label per closed session: `legit` or a reason from REASONS.

    Legit: a message was accepted, or a clean QUIT after a valid transaction (a sender
    verification probe). A test that fired names the nuisance; otherwise how it ended does.
    """
    if accepted:
        return LEGIT
    if verdict:
        return verdict
    if rejected:
        return Reason.CONTENT_REJECTED.value
    if ended == "tls_failure":
        return Reason.TLS_FAILURE.value
    if ended == "slow":
        return Reason.SLOW_CLIENT.value
    if ended == "timeout":
        return Reason.IDLE_TIMEOUT.value
    if ended in ("lost", "refused"):
        return (Reason.LOST_AFTER_CONNECT if commands == 0 else Reason.LOST_CONNECTION).value
    if transactions and ended == "quit":
        return LEGIT
    return Reason.NO_TRANSACTION.value
