"""Running the check back-ends on one message: each in `scanner.checks` order, timed, a failure
caught and counted, and the results merged into one `verdict.Verdict`.

Per back-end counters on the worker's scoreboard slot (`check_NAME_count`, `_failed`, `_us`
(total microseconds) and the latency histogram's buckets `_le_I`, see board.LATENCY_BUCKETS)
feed `poolmgr status` and /metrics; each verdict is counted as `verdict_KIND`.

Policy banks (`scanner.policy`, amavisd's): mail arriving on a bank's own listener is judged
by that bank's settings, the rest by the scanner section's; `bypass_spam_checks` (of the
section or the bank) lets mail from those clients skip the spam checks.
"""

__all__ = ["Scanner", "Bank", "SPAM_CHECKS"]

import time
from dataclasses import dataclass, replace

from ..defence.networks import in_networks
from . import backends
from .backends.base import CheckFailed, Message
from .verdict import Failure, Policy, Verdict, decide


SPAM_CHECKS = ("spamd", "rspamd")


@dataclass(frozen=True)
class Bank:
    name: str
    policy: Policy
    bypass_spam_checks: tuple = ()


class Scanner:
    """The checks one scanner worker runs and its policy banks, built once from the
    configuration."""

    def __init__(self, cfg, slot, log):
        scanner = cfg.scanner
        self.checks = backends.load(cfg)
        self.default = Bank("", Policy.of(scanner), scanner.bypass_spam_checks)
        self.banks = {}  # by the port of the bank's own listener
        for bank in scanner.policy:
            overrides = {k: v for k, v in bank.items() if k in Policy.__dataclass_fields__}
            self.banks[bank["listen"][1]] = Bank(
                bank["name"], replace(self.default.policy, **overrides),
                bank.get("bypass_spam_checks", self.default.bypass_spam_checks))
        self.eicar = scanner.eicar
        self.slot = slot
        self.log = log

    def bank(self, port: int) -> Bank:
        """The bank of the listener on `port` (the scanner section's for scanner.listen)."""
        return self.banks.get(port, self.default)

    def scan(self, message: Message, bank: Bank) -> Verdict:
        results, failures, virus_checked = [], [], False
        bypass = bool(bank.bypass_spam_checks) and \
            in_networks(message.client_addr, bank.bypass_spam_checks)
        for check in self.checks:
            if bypass and check.name in SPAM_CHECKS:
                continue
            started = time.monotonic()
            try:
                result = check.check(message)
            except CheckFailed as exc:
                failures.append(Failure(check.name, exc.detail, check.on_failure))
                self.slot.add(f"check_{check.name}_failed")
                self.log.warning("%s: %s check failed: %s (%s)", message.queue_id, check.name,
                                 exc.detail, "try again later" if check.on_failure == "tempfail"
                                 else "passed unchecked")
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
            virus_checked |= check.name == "clamd" or (check.name == "builtin" and self.eicar)
        verdict = decide(results, failures, bank.policy, virus_checked)
        self.slot.add(f"verdict_{verdict.kind}")
        return verdict

    def _time(self, name: str, seconds: float) -> None:
        slot = self.slot
        slot.add(f"check_{name}_count")
        slot.add(f"check_{name}_us", int(seconds * 1e6))  # fast checks take well under 1 ms
        slot.observe(f"check_{name}", seconds)
