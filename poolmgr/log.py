"""Postfix-style logging for every poolmgr process.

Lines look like Postfix's: `Nov 25 07:00:00 host poolmgr/smtpd[1234]: connect from ...`, with
`warning: `, `error: ` and `fatal: ` prefixes. Each record is one write(2) of one line, so lines
from many processes sharing stderr or an O_APPEND file do not interleave. `reopen()` (SIGUSR1)
reopens the log file for logrotate.

Exports: setup, reopen, get.
"""

import logging
import os
import re
import socket
import time

# As Postfix's printable(): control characters, invalid bytes (surrogate escapes) and
# undecodable input never reach the log as they came.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")
_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}
_state = {"path": "", "fd": 2, "name": "poolmgr/master", "host": socket.gethostname()}


class _LineHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            stamp = time.strftime("%b %d %H:%M:%S", time.localtime(record.created))
            text = _UNPRINTABLE.sub("?", record.getMessage().replace("\n", " "))
            if record.exc_info and record.levelno >= logging.ERROR:
                text += " (" + repr(record.exc_info[1]) + ")"
            line = (f"{stamp} {_state['host']} {_state['name']}[{os.getpid()}]: "
                    f"{_PREFIX.get(record.levelno, '')}{text}\n")
            os.write(_state["fd"], line.encode("utf-8", "replace"))
        except Exception:  # logging must never take a worker down
            pass


def setup(name: str, path: str = "", level: int = logging.INFO) -> None:
    """Route the 'poolmgr' logger to stderr or `path`, tagging lines with `name`."""
    _state["name"] = name
    if path != _state["path"]:
        _state["path"] = path
        reopen()
    root = logging.getLogger("poolmgr")
    if not any(isinstance(h, _LineHandler) for h in root.handlers):
        root.addHandler(_LineHandler())
    root.setLevel(level)
    root.propagate = False


def reopen() -> None:
    """Reopen the log file (after logrotate moved it); stderr needs nothing."""
    old = _state["fd"]
    if _state["path"]:
        _state["fd"] = os.open(_state["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    else:
        _state["fd"] = 2
    if old != 2 and old != _state["fd"]:
        os.close(old)


def set_name(name: str) -> None:
    _state["name"] = name


def get(name: str = "") -> logging.Logger:
    return logging.getLogger("poolmgr" + ("." + name if name else ""))
