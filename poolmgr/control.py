"""The control socket: a Unix socket in the master, and its client for the CLI.

One JSON object per line each way: the client sends a request (`{"cmd": "status"}`,
`{"cmd": "ctl", "args": ["smtp", "+2"]}`), the master answers with `{"ok": ..., ...}` and
closes. The master serves it from its main loop (no thread), so a request is handled like a
signal: between two iterations, by the only code that changes state.

Exports: ControlServer, request, ControlError.
"""

import json
import os
import socket
from typing import Callable

MAX_REQUEST = 65536


class ControlError(Exception):
    pass


class ControlServer:
    def __init__(self, path: str, mode: int):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # stale: the pidfile check already ruled out a live master
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        self.sock.listen(16)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve(self, handler: Callable[[dict], dict]) -> None:
        """Answer every waiting client; each gets one request and one reply."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    data = b""
                    while b"\n" not in data and len(data) < MAX_REQUEST:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    try:
                        request = json.loads(data.decode("utf-8"))
                        answer = handler(request) if isinstance(request, dict) else None
                    except ValueError:
                        answer = None
                    answer = answer or {"ok": False, "message": "bad request"}
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


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
        raise ControlError(f"cannot reach the master at {path}: "
                           f"{exc.strerror or exc} (is poolmgr running?)") from None
    finally:
        sock.close()
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError:
        raise ControlError(f"bad answer from the master at {path}") from None
