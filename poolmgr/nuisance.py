"""Sliding-window rates over the scoreboard's cumulative counters (master side).

The master samples the SMTP pool's totals about once a second; `NuisanceWindow` keeps samples
for the window and answers the nuisance ratio (nuisance sessions / all closed sessions) and the
counts by reason over it.
"""

__all__ = ["NuisanceWindow"]

import collections


class NuisanceWindow:
    def __init__(self, window: float):
        self.window = window
        self.samples: collections.deque[tuple[float, dict[str, int]]] = collections.deque()

    def add(self, now: float, counters: dict[str, int]) -> None:
        self.samples.append((now, counters))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()

    def summary(self) -> dict:
        if len(self.samples) < 2:
            return {"window": self.window, "ratio": 0.0, "legit": 0, "nuisance": 0,
                    "by_reason": {}}
        (_, old), (_, new) = self.samples[0], self.samples[-1]
        delta = {key: new.get(key, 0) - old.get(key, 0) for key in new}
        by_reason = {key.removeprefix("nuisance_"): value for key, value in delta.items()
                     if key.startswith("nuisance_") and value}
        nuisance = sum(by_reason.values())
        legit = delta.get("legit", 0)
        total = legit + nuisance
        return {"window": self.window, "ratio": round(nuisance / total, 3) if total else 0.0,
                "legit": legit, "nuisance": nuisance, "by_reason": by_reason}
