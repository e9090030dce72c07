"""The master's sizing at run time: the one place pool targets and stress mode change.

Pool targets move by a sysadmin's resize (`poolmgr ctl smtp +2`, TTIN/TTOU; `pools.resize`
applies the one sizing rule) and by the autoscaler every `autoscale.interval` (`tick`: the
master's view -> `status.snapshot` -> `autoscale.Autoscaler.run` -> targets). Stress mode is a
flag on the scoreboard every SMTP worker reads, switched by `ctl stress` or the autoscaler.
Every change is logged with its source; the autoscaler's record and the stress record are
what status shows.
"""

__all__ = ["Sizing"]

import time

from . import autoscale, status
from .board import Board
from .pools import Pool, resize


class Sizing:
    def __init__(self, pools: dict[str, Pool], board: Board, autoscale_on: bool, log):
        self.pools, self.board, self.log = pools, board, log
        self.scaler = autoscale.Autoscaler(autoscale_on, phase_since=time.time())
        self.stress = status.StressStatus()

    def resize(self, kind: str, spec: str, source: str, stopping: bool) -> tuple[bool, str]:
        """`N`, `+N` or `-N` workers for a pool (ctl, TTIN/TTOU): (done, message)."""
        done, message = resize(self.pools, kind, spec)
        if stopping:
            done, message = False, "refused: poolmgr is stopping"
        (self.log.info if done else self.log.warning)("resize (%s): %s", source, message)
        return done, message

    def tick(self, view, cfg) -> None:
        """Every autoscale.interval: the autoscaler's targets from the master's view (a
        callable, so that nothing is read when it is not due)."""
        if not self.scaler.due(time.monotonic(), cfg.interval):
            return
        snap, mark = status.snapshot(view())
        wanted = self.scaler.state.stress
        smtp, scanner, decisions = self.scaler.run(snap, mark, cfg, time.time())
        for decision in decisions:
            self.log.info("autoscale: %s", decision)
        self.pools["smtp"].target, self.pools["scanner"].target = smtp, scanner
        if self.scaler.state.stress != wanted:  # only a change of the autoscaler's mind: a
            self.set_stress(self.scaler.state.stress, "autoscale")  # sysadmin's ctl stands

    def set_stress(self, on: bool, source: str) -> str:
        was = self.stress.on
        if on != was:
            self.stress = status.StressStatus(on, source, time.time() if on else None)
            self.board.set_stress(on)
            self.log.info("stress mode %s (%s)", "on" if on else "off", source)
        return f"stress mode {'on' if on else 'off'}" + ("" if on != was else " (unchanged)")

    def set_autoscale(self, on: bool, source: str) -> str:
        if self.scaler.switch(on, time.monotonic(), time.time()):
            self.log.info("autoscale %s (%s)", "on" if on else "off", source)
            if not on:  # back to the floors; a storm's workers are retired
                for pool in self.pools.values():
                    pool.target = pool.floor
                if self.stress.source == "autoscale" and self.stress.on:
                    self.set_stress(False, "autoscale")
        return f"autoscale {'on' if on else 'off'}"
