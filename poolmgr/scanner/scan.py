"""Running the check back-ends on one message: each in `scanner.checks` order, timed, a failure
caught and counted, and the results merged into one `verdict.Verdict`.

Per back-end counters on the worker's scoreboard slot (`check_NAME_count`, `_failed`, `_us`
(total microseconds) and the latency histogram's buckets `_le_I`, see board.LATENCY_BUCKETS)
feed `poolmgr status` and /metrics; each verdict is counted as `verdict_KIND`.

Policy banks (`scanner.policy`, amavisd's): mail arriving on a bank's own listener is judged
by that bank's settings, the rest by the scanner section's; `bypass_spam_checks` and
`bypass_virus_checks` (of the section or the bank) let mail from those clients skip the spam
checks, or the virus checks (clamd, and builtin's EICAR while its rules still run).

Spam lovers (`scanner.spam_lovers`, amavisd's) get their spam tagged, never blocked: the
session asks `spam_lovers_of` and splits the recipients. Banned contents
(`scanner.banned_filenames`, banned.py) are looked for first; a banned message is still
virus-checked (a virus is named as such), not spam-checked (it is blocked either way).
`poolmgr scan` runs the same on one message, without a worker's slot (`examine_one`).
"""

__all__ = ["Scanner", "Bank", "Examined", "NoSlot", "UnknownBank", "examine_one", "scan_header",
           "SPAM_CHECKS", "VIRUS_CHECKS"]

import copy
import time
from dataclasses import dataclass, replace

from ..defence.networks import in_networks
from ..smtp.parse import new_queue_id
from . import backends, banned
from .backends.base import CheckFailed, Message, Result, printable
from .verdict import FORGEABLE, Failure, Policy, Verdict, decide


SPAM_CHECKS = ("spamd", "rspamd")
VIRUS_CHECKS = ("clamd",)  # and the builtin check's EICAR
# The banned check has no setting of its own: when it fails, the message cannot be said not
# to be banned, so it is tried later (451), as a virus check that fails is by default.
BANNED_ON_FAILURE = "tempfail"


@dataclass(frozen=True)
class Bank:
    name: str
    policy: Policy
    bypass_spam_checks: tuple = ()
    bypass_virus_checks: tuple = ()


@dataclass(frozen=True)
class Examined:
    verdict: Verdict
    results: list      # each check's Result (and banned's), in the order they ran
    failures: list     # each check's Failure
    lovers: tuple = ()  # recipients who get the spam the verdict blocks (spam_lovers_of)


class UnknownBank(ValueError):
    """`poolmgr scan --policy NAME`: no policy bank of that name."""


class NoSlot:
    """A scoreboard slot that counts nothing: a scan outside a worker (`poolmgr scan`)."""

    def add(self, counter: str, amount: int = 1) -> None:
        pass

    def observe(self, prefix: str, seconds: float) -> None:
        pass


class Scanner:
    """The checks one scanner worker runs and its policy banks, built once from the
    configuration."""

    def __init__(self, cfg, slot, log):
        scanner = cfg.scanner
        self.checks = backends.load(cfg)
        self.without_virus_checks = [self._without_virus_check(c) for c in self.checks
                                     if c.name not in VIRUS_CHECKS]
        self.default = Bank("", Policy.of(scanner), scanner.bypass_spam_checks,
                            scanner.bypass_virus_checks)
        self.banks = {}  # by the port of the bank's own listener
        for bank in scanner.policy:
            overrides = {k: v for k, v in bank.items() if k in Policy.__dataclass_fields__}
            self.banks[bank["listen"][1]] = Bank(
                bank["name"], replace(self.default.policy, **overrides),
                bank.get("bypass_spam_checks", self.default.bypass_spam_checks),
                bank.get("bypass_virus_checks", self.default.bypass_virus_checks))
        self.banned_filenames = scanner.banned_filenames
        self.spam_lovers = frozenset(lover.lower() for lover in scanner.spam_lovers)
        self.slot = slot
        self.log = log

    @staticmethod
    def _without_virus_check(check):
        """The check as it runs for mail that bypasses the virus checks: builtin without
        EICAR (its rules still run); the others as they are."""
        if check.name != "builtin" or not check.eicar:
            return check
        check = copy.copy(check)
        check.eicar = False
        return check

    def bank(self, port: int) -> Bank:
        """The bank of the listener on `port` (the scanner section's for scanner.listen)."""
        return self.banks.get(port, self.default)

    def bank_named(self, name: str) -> Bank | None:
        """The bank of that name ("" for the scanner section's), or None."""
        if not name:
            return self.default
        return next((b for b in self.banks.values() if b.name == name), None)

    def spam_lovers_of(self, rcpts, verdict: Verdict) -> list[str]:
        """The recipients who get spam that `verdict` blocks (amavisd's @spam_lovers_maps: an
        address, or @domain); none when it blocks something else."""
        if verdict.kind != "spam_killed" or not self.spam_lovers:
            return []
        lovers = self.spam_lovers
        return [rcpt for rcpt in rcpts if rcpt.lower() in lovers
                or "@" + rcpt.rpartition("@")[2].lower() in lovers]

    def scan(self, message: Message, bank: Bank) -> Verdict:
        verdict = self.examine(message, bank).verdict
        self.slot.add(f"verdict_{verdict.kind}")
        return verdict

    def examine(self, message: Message, bank: Bank) -> Examined:
        """The verdict on `message` under `bank`, with what each check found."""
        results, failures, virus_checked = [], [], False
        skip_virus = _bypassed(message.client_addr, bank.bypass_virus_checks)
        skip_spam = _bypassed(message.client_addr, bank.bypass_spam_checks)
        try:
            found = banned.find(message.data, self.banned_filenames)
        except Exception as exc:  # content it did not foresee: a failure, never a crash
            found = None
            failures.append(self._failed(message, "banned",
                                         printable(f"{type(exc).__name__}: {exc}"),
                                         BANNED_ON_FAILURE))
        if found:
            results.append(Result("banned", banned=found.path))
            skip_spam = True  # blocked either way: the spam checks' time would be lost
        for check in self.without_virus_checks if skip_virus else self.checks:
            if skip_spam and check.name in SPAM_CHECKS:
                continue
            started = time.monotonic()
            try:
                result = check.check(message)
            except CheckFailed as exc:
                failures.append(self._failed(message, check.name, exc.detail,
                                             check.on_failure))
                result = None
            finally:
                self._time(check.name, time.monotonic() - started)
            if result is None:
                continue
            if result.skipped:
                self.log.info("%s: %s check skipped: %s", message.queue_id, check.name,
                              result.skipped)
                continue
            results.append(result)
            virus_checked |= check.name in VIRUS_CHECKS or (
                check.name == "builtin" and check.eicar)
        verdict = decide(results, failures, bank.policy, virus_checked, message.queue_id)
        return Examined(verdict, results, failures)

    def _failed(self, message: Message, check: str, detail: str, on_failure: str) -> Failure:
        """A check's failure, counted and logged."""
        self.slot.add(f"check_{check}_failed")
        self.log.warning("%s: %s check failed: %s (%s)", message.queue_id, check, detail,
                         "try again later" if on_failure == "tempfail" else "passed unchecked")
        return Failure(check, detail, on_failure)

    def _time(self, name: str, seconds: float) -> None:
        slot = self.slot
        slot.add(f"check_{name}_count")
        slot.add(f"check_{name}_us", int(seconds * 1e6))  # fast checks take well under 1 ms
        slot.observe(f"check_{name}", seconds)


def examine_one(cfg, data: bytes, *, sender: str = "", rcpts: tuple = (), client: str = "",
                helo: str = "", bank: str = "", log) -> Examined:
    """`poolmgr scan`: one message through the configured checks, as a scanner worker would
    judge it on the listener of policy bank `bank` ("" for scanner.listen); LF line ends are
    made CRLF, as they arrive over SMTP. UnknownBank for an unknown bank."""
    scanner = Scanner(cfg, NoSlot(), log)
    chosen = scanner.bank_named(bank)
    if chosen is None:
        raise UnknownBank(f"no policy bank named {bank!r} in scanner.policy")
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    message = Message(data, new_queue_id(), sender, tuple(rcpts), client, "", helo)
    found = scanner.examine(message, chosen)
    return replace(found, lovers=tuple(scanner.spam_lovers_of(rcpts, found.verdict)))


def scan_header(verdict: Verdict, hostname: str) -> bytes:
    """This scanner's own trace of its verdict: `X-Poolmgr-Scan: clean by poolmgr at HOST`."""
    return f"{FORGEABLE[0]}: {verdict.summary} by poolmgr at {hostname}\r\n".encode()


def _bypassed(client: str, networks) -> bool:
    return bool(networks) and bool(client) and in_networks(client, networks)
