"""Running the check back-ends on one message: each in `scanner.checks` order, timed, a failure
caught and counted, and the results merged into one `verdict.Verdict`.

Per back-end counters on the worker's scoreboard slot (`check_NAME_count`, `_failed`, `_ms` and
the latency histogram's buckets `_le_I`, see board.CHECK_BUCKETS) feed `poolmgr status` and
/metrics; each verdict is counted as `verdict_KIND`.

Exports: Scanner.
"""

import bisect
import time

from ..board import CHECK_BUCKETS
from . import backends
from .backends.base import CheckFailed, Message
from .verdict import Failure, Policy, Verdict, decide


class Scanner:
    """The checks one scanner worker runs, built once from the configuration."""

    def __init__(self, cfg, slot, log):
        self.checks = backends.load(cfg)
        self.policy = Policy.of(cfg.scanner)
        self.eicar = cfg.scanner.eicar
        self.slot = slot
        self.log = log

    def scan(self, message: Message) -> Verdict:
        results, failures, virus_checked = [], [], False
        for check in self.checks:
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
        verdict = decide(results, failures, self.policy, virus_checked)
        self.slot.add(f"verdict_{verdict.kind}")
        return verdict

    def _time(self, name: str, seconds: float) -> None:
        slot = self.slot
        slot.add(f"check_{name}_count")
        slot.add(f"check_{name}_ms", int(seconds * 1000))
        index = bisect.bisect_left(CHECK_BUCKETS, seconds)
        if index < len(CHECK_BUCKETS):
            slot.add(f"check_{name}_le_{index}")
