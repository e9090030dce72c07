"""Parking: an idle SMTP session waits for its client with no greenlet of its own.

Most sessions a storm brings never speak: they wait out the greet pause, then sit after the
banner until the timeout. A greenlet blocked in `recv` holds its saved C stack and its own
Python frame stack (several KiB each); a parked session holds only its socket, its state and
two libev watchers, as a session of an event-driven server does. When the client sends
something (or hangs up) the session gets a new greenlet and goes on where it stopped; when
the wait runs out first, it goes on with the step given for that (a timeout, or the rest of
the greet test).

The SMTP worker parks a session at two places, both in the session engine
(`protocol.ServerSession`): the greet pause (`pause`, when the defence's `before_banner`
decision asks for one) and the wait for a command with nothing buffered (`serve`). Parking
is the engine's: no defence parks a session. A session with TLS is
never parked: decrypted bytes may wait in the TLS layer with nothing to read on the socket.
"""

__all__ = ["Parking", "Parked"]

from typing import Callable


class Parked(Exception):
    """Raised through a session's stack to end its greenlet; the session lives on."""


class Parking:
    """Parks the sessions of one SMTP worker; `spawn` starts a greenlet (a gevent pool's)."""

    __slots__ = ("loop", "spawn", "count")

    def __init__(self, loop, spawn: Callable):
        self.loop = loop
        self.spawn = spawn
        self.count = 0  # sessions parked now

    def park(self, session, timeout: float, then: Callable[[], None],
             expired: Callable[[], None]):
        """Wait for the client without a greenlet; raises Parked (let it through). On input
        or hang-up the session resumes with `then`, after `timeout` with `expired`."""
        readable = self.loop.io(session.conn.sock.fileno(), 1)
        timer = self.loop.timer(max(timeout, 0.0))
        session.parked = (readable, timer)
        readable.start(self._wake, session, then)
        timer.start(self._wake, session, expired)
        session.greenlet = None
        self.count += 1
        raise Parked()

    def _unpark(self, session) -> bool:
        watchers, session.parked = session.parked, None
        if watchers is None:
            return False
        for watcher in watchers:
            watcher.stop()
            watcher.close()
        self.count -= 1
        return True

    def _wake(self, session, step: Callable[[], None]) -> None:
        # In the hub: only start the greenlet here.
        if self._unpark(session):
            session.greenlet = self.spawn(session.resume, step)

    def interrupt(self, session, exc: BaseException) -> bool:
        """Resume a parked session by raising `exc` in it (a drain); False if not parked."""
        if not self._unpark(session):
            return False

        def fault():
            raise exc

        session.greenlet = self.spawn(session.resume, fault)
        return True
