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

`Turn` is the one-shot wake-up a greenlet waits on for its turn (the hand-off gate's): what
gevent's Event does for this, with one timer, where an Event makes its links and a Timeout
object per wait.
"""

__all__ = ["Runners", "Job", "Turn"]

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


class Turn:
    """`wait(timeout)` in one greenlet until another calls `set()`; True if it was set (even
    when the time ran out on the way), as gevent's `Event.wait`."""

    __slots__ = ("hub", "flag", "waiter", "done")

    def __init__(self, hub):
        self.hub = hub
        self.flag = False
        self.waiter = None
        self.done = False

    def set(self) -> None:
        if not self.flag:
            self.flag = True
            if self.waiter is not None:
                self.hub.loop.run_callback(self._wake)

    def wait(self, timeout: float) -> bool:
        if self.flag:
            return True
        self.waiter = getcurrent()
        timer = self.hub.loop.timer(timeout)
        # From now: the loop's own clock is the one its iteration began with (or the last
        # before it sat idle), and a timer set from it could end the wait before its time
        # (a DNS query given up at once after the loop had not run for a while).
        timer.start(self._wake, update=True)
        try:
            self.hub.switch()
        finally:
            self.done = True  # a wake-up still scheduled does nothing now
            timer.stop()
            timer.close()
        return self.flag

    def _wake(self) -> None:
        if not self.done:
            self.done = True
            self.waiter.switch()
