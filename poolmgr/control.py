"""The control socket: a Unix socket in the master, and its client for the CLI.

One JSON object per line each way: the client sends a request (`{"cmd": "status"}`,
`{"cmd": "ctl", "args": ["smtp", "+2"]}`), the master answers with `{"ok": ..., ...}` and
closes. The master serves it from its main loop (no thread), so a request is handled like a
signal: between two iterations, by the only code that changes state. A client's bytes are
read as they arrive, with one deadline for the whole request: a slow or silent client never
holds up the loop.

`answer(request, master)` is the protocol's one dispatcher: `status`, and `ctl` with a verb
(`ctl_smtp`, `ctl_scanner`, `ctl_stress`, `ctl_autoscale`), each request's shape checked
first. The verbs act on the master only through the few methods `Controlled` names.
"""

__all__ = ["ControlServer", "request", "ControlError", "Controlled", "answer", "CTL_USAGE"]

import json
import os
import selectors
import socket
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .sizing import Sizing

MAX_REQUEST = 65536
REQUEST_DEADLINE = 2.0  # seconds for a client to send its whole request
ANSWER_TIMEOUT = 1.0    # seconds to hand the answer over (a few KB on a local socket)
CTL_USAGE = "usage: ctl smtp|scanner N|+N|-N, ctl stress on|off, ctl autoscale on|off"


class ControlError(Exception):
    down = False  # the master is not running (no socket, or nobody listening on it)


class ControlServer:
    """The master's end. Registered in the master's selector: the listening socket as
    "control", each client as "control-conn"; a client is read as its bytes arrive, never
    waited for, and must send its whole request within REQUEST_DEADLINE."""

    def __init__(self, path: str, mode: int, selector: selectors.BaseSelector, logger):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # stale: the pidfile check already ruled out a live master
        self.path = path
        self.selector = selector
        self.log = logger
        self.clients: dict[socket.socket, tuple[bytearray, float]] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        self.inode = os.stat(path).st_ino  # a successor (USR2) may bind the path anew
        self.sock.listen(16)
        self.sock.setblocking(False)
        selector.register(self.sock, selectors.EVENT_READ, "control")

    def fileno(self) -> int:
        return self.sock.fileno()

    def fds(self) -> list[int]:
        """The listening socket and the clients in hand: a forked worker closes them."""
        return [self.sock.fileno(), *(conn.fileno() for conn in self.clients)]

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of files: the client is refused, the master goes on
                return
            conn.setblocking(False)
            self.clients[conn] = (bytearray(), time.monotonic() + REQUEST_DEADLINE)
            self.selector.register(conn, selectors.EVENT_READ, "control-conn")

    def read(self, conn: socket.socket, master: "Controlled") -> None:
        """What the client sent so far; a whole line (or the end) is answered. A request must
        never take the master down: a failure is logged and answered."""
        data, deadline = self.clients[conn]
        try:
            chunk = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        data += chunk
        if chunk and b"\n" not in data and len(data) < MAX_REQUEST:
            return
        reply = None
        try:
            request = json.loads(data.decode("utf-8"))
        except ValueError:
            request = None
        if isinstance(request, dict):
            try:
                reply = answer(request, master)
            except Exception:
                self.log.exception("control request %.80r failed", request)
                reply = {"ok": False, "message": "internal error, see the log"}
        self._answer(conn, reply or {"ok": False, "message": "bad request"})

    def expire(self) -> None:
        """Close clients that did not send a whole request in time."""
        now = time.monotonic()
        for conn, (_, deadline) in list(self.clients.items()):
            if now > deadline:
                self._answer(conn, {"ok": False, "message": "request timed out"})

    def _answer(self, conn: socket.socket, answer: dict) -> None:
        self.selector.unregister(conn)
        del self.clients[conn]
        try:
            conn.settimeout(ANSWER_TIMEOUT)  # the answer fits the socket buffer: no real wait
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        for conn in list(self.clients):
            self.selector.unregister(conn)
            conn.close()
        self.clients.clear()
        self.selector.unregister(self.sock)
        self.sock.close()
        try:
            if os.stat(self.path).st_ino == self.inode:  # still ours, not a successor's
                os.unlink(self.path)
        except OSError:
            pass


class Controlled(Protocol):
    """What the control verbs may ask of the master."""
    stopping: str
    sizing: "Sizing"

    def status(self): ...  # a status.Status


def answer(request: dict, master: Controlled) -> dict:
    """One request's answer; a wrong shape gets an error answer, never an exception."""
    cmd, args = request.get("cmd"), request.get("args", [])
    if cmd == "status":
        return {"ok": True, "status": master.status().to_json()}
    if cmd != "ctl":
        return {"ok": False, "message": f"unknown command {str(cmd)[:40]!r}"}
    verb = (VERBS.get(args[0]) if isinstance(args, list) and len(args) == 2 and
            all(isinstance(a, str) for a in args) else None)
    if verb is None:
        return {"ok": False, "message": CTL_USAGE}
    return verb(master, args[1])


def ctl_smtp(master: Controlled, size: str) -> dict:
    done, message = master.sizing.resize("smtp", size, "ctl", bool(master.stopping))
    return {"ok": done, "message": message}


def ctl_scanner(master: Controlled, size: str) -> dict:
    done, message = master.sizing.resize("scanner", size, "ctl", bool(master.stopping))
    return {"ok": done, "message": message}


def ctl_stress(master: Controlled, word: str) -> dict:
    if word not in ("on", "off"):
        return {"ok": False, "message": CTL_USAGE}
    return {"ok": True, "message": master.sizing.set_stress(word == "on", "ctl")}


def ctl_autoscale(master: Controlled, word: str) -> dict:
    if word not in ("on", "off"):
        return {"ok": False, "message": CTL_USAGE}
    return {"ok": True, "message": master.sizing.set_autoscale(word == "on", "ctl")}


VERBS = {"smtp": ctl_smtp, "scanner": ctl_scanner, "stress": ctl_stress,
         "autoscale": ctl_autoscale}


def request(path: str, payload: dict, timeout: float = 10.0) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        error = ControlError(f"cannot reach the master at {path}: "
                             f"{exc.strerror or exc} (is poolmgr running?)")
        # No socket, or nobody listening on it: the master is not running (`status` exits 3).
        error.down = isinstance(exc, (FileNotFoundError, ConnectionRefusedError))
        raise error from None
    finally:
        sock.close()
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError:
        raise ControlError(f"bad answer from the master at {path}") from None
