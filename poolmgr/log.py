"""Postfix-style logging for every poolmgr process, through the standard library `logging`.

`master.log` picks the destination:
- "syslog": `logging.handlers.SysLogHandler` on the datagram socket `master.syslog_socket`
  (/dev/log) with facility `master.syslog_facility` (mail). Each datagram is
  `<22>poolmgr/smtpd[1234]: connect from ...`, as Postfix sends `postfix/smtpd[1234]: ...`;
  the syslog daemon adds the time and host, and the line lands in /var/log/mail.log.
- "stderr", or a PATH (`logging.handlers.WatchedFileHandler`: it reopens a file that
  logrotate moved by itself; SIGUSR1 reopens it too): lines carry their own time and host,
  `Nov 25 07:00:00 host poolmgr/smtpd[1234]: connect from ...`.
- "" (the default): syslog when systemd started us (INVOCATION_ID or JOURNAL_STREAM) or
  stderr is not a terminal; stderr otherwise.

The program name is the process's (`set_name`: poolmgr/master, poolmgr/smtpd,
poolmgr/scanner); `program(name)` gives a logger whose lines say `poolmgr/NAME` instead,
for the lines that Postfix's cleanup, qmgr and delivery agents write and log readers such as
pflogsumm count by program. Warnings, errors and fatal errors carry Postfix's `warning: `,
`error: ` and `fatal: ` in the text. A line on stderr is one write(2), so lines from many
processes do not interleave.

Logging never makes a process wait (logbuffer.py): a line the log cannot take now (a syslog
daemon that fell behind, a pipe nobody drains, a full disk) is kept, up to `master.log_buffer`
lines, and written when the log takes lines again; beyond that, lines are dropped, counted
(`dropped`, in status and metrics) and replaced by one `warning: N log lines dropped` line.
Each new line first writes what waits; each process also calls `flush` from its own loop
(the master's housekeeping, the workers' heartbeat), and `waiting` tells a loop what to wait
on before it does. The syslog socket, which every process inherits from the master, is sent
to with MSG_DONTWAIT, so it stays blocking for nobody and waits for nobody.
"""

__all__ = ["setup", "reopen", "set_name", "get", "program", "target", "file_of", "flush",
           "waiting", "pending", "dropped", "take_dropped", "drain"]

import errno
import logging
import logging.handlers
import os
import re
import socket
import stat
import time

from .logbuffer import DEFAULT_LIMIT, Backlog

# As Postfix's printable(): control characters, invalid bytes (surrogate escapes) and
# undecodable input never reach the log as they came.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")
_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}
_state = {"name": "poolmgr/master", "key": None, "host": socket.gethostname()}

# The hot path logs several lines per message: skip what no line uses (the logging HOWTO's
# "Optimization"): the caller's file and line (findCaller walks the stack), thread and
# multiprocessing names. The pid (record.process) is kept: every line carries it.
logging._srcfile = None
logging.logThreads = False
logging.logMultiprocessing = False


# The process's pid, kept since its fork, for the short way (_Logger._log) to say.
_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


class _Postfix(logging.Formatter):
    """`poolmgr/NAME[PID]: warning: text`, with `Mon DD HH:MM:SS host ` before it unless
    syslog adds its own."""

    def __init__(self, stamped: bool):
        super().__init__()
        self.stamped = stamped
        self.second, self.stamp = -1, ""  # the time stamp, made once a second

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            text += " (" + repr(record.exc_info[1]) + ")"
        return self.line(record.levelno, getattr(record, "program", _state["name"]), text,
                         record.process, record.created)

    def line(self, level: int, program: str, text: str, pid: int, created: float) -> str:
        if not (text.isascii() and text.isprintable()) and _UNPRINTABLE.search(text):
            text = _UNPRINTABLE.sub("?", text.replace("\n", " "))
        line = f"{program}[{pid}]: {_PREFIX.get(level, '')}{text}"
        if self.stamped:
            second = int(created)
            if second != self.second:
                self.second = second
                self.stamp = time.strftime("%b %d %H:%M:%S ", time.localtime(second)) + \
                    _state["host"]
            line = f"{self.stamp} {line}"
        return line


class _Logger(logging.Logger):
    """The standard logger, with a short way from a call to poolmgr's own handlers: the text
    is formatted once and written, with no LogRecord, filters or handler lock on the way (the
    hot path logs ten lines per message over the two pools; the standard way cost a tenth of
    their time). Calls with exception or stack information, and any handler not poolmgr's,
    take the standard way."""

    def _log(self, level, msg, args, exc_info=None, extra=None, stack_info=False,
             stacklevel=1):
        handlers = _root.handlers
        if exc_info or stack_info or len(handlers) != 1 or not isinstance(handlers[0], _Quiet):
            return super()._log(level, msg, args, exc_info, extra, stack_info, stacklevel)
        handler = handlers[0]
        if level < handler.level:
            return
        try:
            text = str(msg) % args if args else str(msg)
            program = extra["program"] if extra else _state["name"]
            handler.write_line(level, handler.formatter.line(level, program, text, _pid[0],
                                                             time.time()))
        except Exception:
            pass  # logging must never take a worker down


class _Program(logging.LoggerAdapter):
    """A logger whose lines say another program's name; `info`, the hot path's, goes the
    short way."""

    def info(self, msg, *args, **kwargs) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.logger._log(logging.INFO, msg, args, extra=self.extra, **kwargs)


def _ours(logger: logging.Logger) -> logging.Logger:
    if type(logger) is logging.Logger:
        logger.__class__ = _Logger  # poolmgr's loggers only: other libraries' keep theirs
    return logger


_root = _ours(logging.getLogger("poolmgr"))


class _NoLock:
    """A lock that never waits, for handlers that need none (`_Quiet.createLock`)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def acquire(self, *args, **kwargs) -> bool:
        return True

    def release(self) -> None:
        pass

    def _at_fork_reinit(self) -> None:
        pass


_NO_LOCK = _NoLock()


class _Quiet:
    """What poolmgr's handlers share: `write_line(level, line)` writes a formatted line, from
    `emit` and from `_Logger`'s short way, through `send` (which never waits); what it cannot
    write now waits in the handler's backlog; errors are dropped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backlog = Backlog()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(record.levelno, self.format(record))
        except Exception:
            pass  # logging must never take a worker down

    def write_line(self, level: int, line: str) -> None:
        self.backlog.write(self.encode(level, line), self.send, self.gap_line)

    def encode(self, level: int, line: str) -> bytes:
        return (line + "\n").encode("utf-8", "replace")

    def gap_line(self, count: int) -> bytes:
        return self.encode(logging.WARNING, self.formatter.line(
            logging.WARNING, _state["name"], f"{count} log lines dropped", _pid[0], time.time()))

    def write_kept(self) -> bool:
        """Write what waits; True when nothing waits any more."""
        return self.backlog.flush(self.send, self.gap_line)

    def wait_fd(self) -> int:
        """The descriptor that turns writable when the log can take more (-1: none does, as
        a full disk's file)."""
        return -1

    def handleError(self, record: logging.LogRecord) -> None:
        pass

    def createLock(self) -> None:
        # No lock around emit: a line is one write(2) (or one datagram), which greenlets do
        # not interleave, and after gevent's monkey-patching each acquire went through it.
        # Not None: Python 3.13's Handler.handle says `with self.lock:`.
        self.lock = _NO_LOCK


def _unblocked_stderr() -> tuple[int, socket.socket | None]:
    """A descriptor for stderr on which a write never waits, and its socket when it is one.
    A pipe is opened again (/proc/self/fd/2) as a new open file with O_NONBLOCK: setting
    O_NONBLOCK on fd 2 itself would set it for every process that shares the pipe. A socket
    (systemd's journal stream) is sent to with MSG_DONTWAIT. A terminal or a file: fd 2."""
    try:
        mode = os.fstat(2).st_mode
        if stat.S_ISFIFO(mode):
            return os.open("/proc/self/fd/2", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC), None
        if stat.S_ISSOCK(mode):
            return 2, socket.socket(fileno=os.dup(2))
    except OSError:
        pass
    return 2, None


class _Stderr(_Quiet, logging.Handler):
    def __init__(self):
        super().__init__()
        self.fd, self.sock = _unblocked_stderr()

    def send(self, data: bytes) -> int:
        if self.sock is not None:
            return self.sock.send(data, socket.MSG_DONTWAIT)
        return os.write(self.fd, data)

    def wait_fd(self) -> int:
        return self.fd if self.fd != 2 or self.sock is not None else -1

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        elif self.fd != 2:
            os.close(self.fd)
        self.fd, self.sock = 2, None
        super().close()


class _File(_Quiet, logging.handlers.WatchedFileHandler):
    """Reopens the file when logrotate moved it, as the standard handler does, but opens the
    new file before it lets go of the old one: a worker that may not open the new file yet
    (the master hands it over on SIGUSR1) keeps writing to the old one. A line is one
    write(2) on the file (no stream buffer to hold half a line when the disk is full)."""

    def send(self, data: bytes) -> int:
        self.reopenIfNeeded()
        return os.write(self.stream.fileno(), data)

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return open(fd, "a", encoding="utf-8", errors="replace")

    def reopenIfNeeded(self) -> None:
        try:
            st = os.stat(self.baseFilename)
            if (st.st_dev, st.st_ino) == (self.dev, self.ino) and self.stream is not None:
                return
        except FileNotFoundError:
            pass
        self.reopen()

    def reopen(self) -> None:
        self.acquire()
        try:
            try:
                stream = self._open()
            except OSError:
                return
            old, self.stream = self.stream, stream
            if old is not None:
                old.close()
            self._statstream()
        finally:
            self.release()


SYSLOG_RECONNECT = 1.0  # seconds between attempts to reach a syslog daemon that went away
_LATER = (errno.EAGAIN, errno.ENOBUFS, errno.EINTR)  # the daemon is there, just behind


class _Syslog(_Quiet, logging.handlers.SysLogHandler):
    reconnected = 0.0

    def encode(self, level: int, line: str) -> bytes:
        """As the standard emit: the priority and the line, one datagram."""
        return b"<%d>%s" % (self.encodePriority(self.facility,
                                                self.mapPriority(logging.getLevelName(level))),
                            line.encode("utf-8", "replace"))

    def send(self, data: bytes) -> int:
        """One datagram, never waiting (MSG_DONTWAIT: the socket may be shared with other
        processes, whose flags are not ours to change); reconnect when syslogd was
        restarted, at most once a SYSLOG_RECONNECT."""
        try:
            return self.socket.send(data, socket.MSG_DONTWAIT)
        except OSError as exc:
            now = time.monotonic()
            if exc.errno in _LATER or now - self.reconnected < SYSLOG_RECONNECT:
                raise
            self.reconnected = now
        self.socket.close()
        self._connect_unixsocket(self.address)
        # A socket of our own: non-blocking (gevent's socket would wait for room otherwise).
        self.socket.setblocking(False)
        return self.socket.send(data, socket.MSG_DONTWAIT)

    def wait_fd(self) -> int:
        return self.socket.fileno()


def _handlers() -> list[_Quiet]:
    return [h for h in logging.getLogger("poolmgr").handlers if isinstance(h, _Quiet)]


def flush() -> int:
    """Write the lines that wait, without waiting; how many still wait (a drop line counts
    as one)."""
    left = 0
    for handler in _handlers():
        try:
            handler.write_kept()
        except Exception:
            pass  # logging must never take a worker down
        left += len(handler.backlog)
    return left


def pending() -> int:
    """How many lines wait (a drop line counts as one)."""
    return sum(len(handler.backlog) for handler in _handlers())


def waiting() -> int | None:
    """None when no line waits; else the descriptor to wait on until it is writable before
    `flush`, or -1 when no descriptor says so (a file on a full disk: try again later)."""
    for handler in _handlers():
        if handler.backlog:
            try:
                return handler.wait_fd()
            except Exception:
                return -1
    return None


def dropped() -> int:
    """Log lines this process dropped since it started (its backlog was full)."""
    return sum(handler.backlog.dropped for handler in _handlers()) + _counted[1]


def take_dropped() -> int:
    """Log lines dropped since the last call: what a worker adds to its board counter."""
    total = dropped()
    new, _counted[0] = total - _counted[0], total
    return new


EXIT_WAIT = 2.0  # seconds an exiting process gives its log to take the lines that wait


def drain(timeout: float = EXIT_WAIT) -> None:
    """At exit: write what waits, trying for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while flush() and time.monotonic() < deadline:
        time.sleep(0.05)
    for handler in _handlers():  # what the log did not take in time is lost: counted
        handler.backlog.abandon()


# Drops counted on the board so far (take_dropped), and those of handlers since replaced.
_counted = [0, 0]


def _forget_parents_lines() -> None:
    for handler in _handlers():
        handler.backlog.clear()
    _counted[:] = [0, 0]


os.register_at_fork(after_in_child=_forget_parents_lines)


def target(where: str) -> str:
    """"syslog", "stderr" or a path: what `master.log` means in this process's environment."""
    if where:
        return where
    systemd = "INVOCATION_ID" in os.environ or "JOURNAL_STREAM" in os.environ
    return "syslog" if systemd or not os.isatty(2) else "stderr"


def file_of(master) -> str:
    """The log file that `master` (the [master] section) names, or "" for syslog and stderr."""
    where = target(master.log)
    return "" if where in ("syslog", "stderr") else where


def setup(name: str, master=None, level: int = logging.INFO) -> None:
    """Route the 'poolmgr' logger as the [master] section `master` says (None: stderr),
    tagging lines with the program `name`."""
    _state["name"] = name
    where = target(master.log) if master is not None else "stderr"
    key = (where, master.syslog_facility, master.syslog_socket) if where == "syslog" \
        else (where,)
    root = logging.getLogger("poolmgr")
    root.setLevel(level)
    root.propagate = False
    limit = master.log_buffer if master is not None else DEFAULT_LIMIT
    for handler in _handlers():
        handler.backlog.limit = limit
    if key == _state["key"]:
        return
    problem = ""
    if where == "syslog":
        handler = _Syslog(master.syslog_socket, master.syslog_facility, socket.SOCK_DGRAM)
        handler.append_nul = False  # Postfix sends none
        if handler.socket is None or handler.socket.fileno() < 0:  # no syslog daemon: say so
            handler.close()
            handler = _Stderr()
            problem = f"cannot log to syslog: nothing listens on {master.syslog_socket}; " \
                      "logging to stderr"
        handler.setFormatter(_Postfix(stamped=isinstance(handler, _Stderr)))
    elif where == "stderr":
        handler = _Stderr()
        handler.setFormatter(_Postfix(stamped=True))
    else:
        try:
            handler = _File(where)
        except OSError as exc:
            problem = f"cannot open the log file {where}: {exc.strerror}"
            if root.handlers:  # a reload: keep logging where we did
                root.warning(problem)
                return
            handler, problem = _Stderr(), problem + "; logging to stderr"
        handler.setFormatter(_Postfix(stamped=True))
    handler.backlog.limit = limit
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, _Quiet):
            old.write_kept()  # what the old destination can take now; the rest is lost,
            old.backlog.abandon()  # and counted
            _counted[1] += old.backlog.dropped
        old.close()
    root.addHandler(handler)
    _state["key"] = key
    if problem:
        root.warning(problem)


def reopen() -> None:
    """Reopen the log file now (SIGUSR1, after logrotate moved it); syslog and stderr need
    nothing."""
    for handler in logging.getLogger("poolmgr").handlers:
        if isinstance(handler, _File):
            handler.reopen()


def set_name(name: str) -> None:
    _state["name"] = name


def get(name: str = "") -> logging.Logger:
    return _ours(logging.getLogger("poolmgr" + ("." + name if name else "")))


def program(name: str) -> logging.LoggerAdapter:
    """A logger whose lines say `poolmgr/NAME[PID]` whatever this process's own name."""
    return _Program(get(name), {"program": f"poolmgr/{name}"})
