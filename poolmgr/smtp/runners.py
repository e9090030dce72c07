"""Runners: greenlets an SMTP worker keeps to run one session step after another.

A new greenlet costs more than a switch: CPython gives it a fresh frame stack (a 16 KiB
mmap, unmapped again when the greenlet ends) and gevent a Greenlet object; on this machine
that is 14 us a session, where a kept greenlet takes a job for 1.6 us. A runner that ends
a step (the session closed, or parked) waits for the next one instead of ending, and at most
`keep` runners wait at once: a storm's thousands of sessions do not leave thousands of idle
greenlets behind.

`spawn(fn, *args)` returns a `Job`; `Job.kill(exc)` raises `exc` in the job from the hub,
as gevent's `Greenlet.kill(exc, block=False)` does, but only while that job runs: its runner
may have gone on to another session by then.

Exports: Runners, Job.
"""

from typing import Callable

from greenlet import getcurrent


class Job:
    __slots__ = ("fn", "args", "runner", "done", "loop")

    def __init__(self, fn: Callable, args: tuple, loop):
        self.fn, self.args, self.loop = fn, args, loop
        self.runner = None  # the greenlet running it, from its start to its end
        self.done = False

    def kill(self, exc, block: bool = False) -> None:
        self.loop.run_callback(self._throw, exc)

    def _throw(self, exc) -> None:
        if self.runner is not None and not self.done:
            self.runner.throw(exc)


class Runners:
    """`spawn` starts `fn(*args)` in the hub's next turn, in a waiting runner or a new one."""

    def __init__(self, hub, spawn: Callable, keep: int = 16):
        self.hub = hub
        self.new = spawn  # gevent.spawn: a runner's errors are reported as any greenlet's
        self.keep = keep
        self.idle: list = []  # runners waiting for a job

    def spawn(self, fn: Callable, *args) -> Job:
        job = Job(fn, args, self.hub.loop)
        while self.idle:
            runner = self.idle.pop()
            if not runner.dead:
                self.hub.loop.run_callback(runner.switch, job)
                return job
        self.new(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        me = getcurrent()
        while True:
            job.runner = me
            try:
                job.fn(*job.args)
            finally:
                job.done, job.runner = True, None
            if len(self.idle) >= self.keep:
                return
            self.idle.append(me)
            try:
                job = self.hub.switch()  # the next job, from spawn
            except BaseException:
                if me in self.idle:
                    self.idle.remove(me)
                raise
            if type(job) is not Job:  # woken by anything else: end, never run it
                if me in self.idle:
                    self.idle.remove(me)
                return
