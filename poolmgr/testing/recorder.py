"""A scripted SMTP next hop on a loopback port that records, byte for byte, what it accepted.

Postfix's smtp-sink accepts everything; the tests of "nothing lost" need a next hop that also
*answers* 4xx: for chosen recipients at RCPT (`rcpt_replies`), or at the end of DATA
(`data_reply`; over LMTP also per recipient, `data_replies`), and one that can hold its
end-of-DATA reply (`hold`) while a test kills the process waiting for it. It speaks ESMTP
(EHLO) and LMTP (LHLO) with PIPELINING, 8BITMIME, SMTPUTF8, SIZE and XFORWARD, one thread per
connection, and answers commands in order, so a pipelined group gets its replies in order.

A message counts as accepted (`accepted`) when its final 250 goes out to a client still
connected (it is recorded just before, so a client told 250 finds it there); a copy whose
client hung up while the reply was held is `aborted` (a real MTA that never answered would not
have queued it either). `Copy.data` is the message as received, with the dot-stuffing undone
and every CRLF kept.
"""

import select
import socket
import threading
from dataclasses import dataclass, field

from .wait import free_port, listening, wait_until

__all__ = ["Recorder", "Copy"]

EXTENSIONS = ["PIPELINING", "SIZE 52428800", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
              "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE"]


@dataclass
class Copy:
    """One message as the next hop received it."""
    mail_from: str
    mail_params: list[str]  # after the address: SIZE=, BODY=8BITMIME, SMTPUTF8
    rcpts: list[str]  # the recipients this hop accepted (at RCPT, and over LMTP at the end)
    data: bytes
    xforward: dict[str, str] = field(default_factory=dict)
    final: str = ""  # the end-of-DATA reply it was given (over LMTP: the first one)


class Recorder:
    """The scripted next hop. Change `rcpt_replies`, `data_reply` and `hold` between messages
    (the attributes are read once per command)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.rcpt_replies: dict[str, str] = {}  # recipient -> reply line, e.g. "450 4.2.0 busy"
        self.data_reply = ""  # a reply line for the end of DATA instead of 250
        self.data_replies: dict[str, str] = {}  # LMTP: recipient -> its end-of-DATA reply
        self.hold = False  # hold an accepting end-of-DATA reply until `release` (which then
        # stays set) or until the client leaves
        self.held = threading.Event()  # set while a message waits for its held reply
        self.held_peer: tuple[str, int] | None = None  # the client waiting on it
        self.release = threading.Event()
        self.accepted: list[Copy] = []
        self.aborted: list[Copy] = []
        self.refused: list[Copy] = []  # given a 4xx/5xx at the end of DATA
        self.rcpt_log: list[tuple[str, str]] = []  # (recipient, reply) for every RCPT
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.connections: list[socket.socket] = []

    def start(self) -> "Recorder":
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True, name=f"recorder-{self.port}").start()
        wait_until(lambda: listening(self.port), what="the recording next hop")
        return self

    def stop(self) -> None:
        self.release.set()
        if self.sock is not None:
            self.sock.close()
        with self.lock:
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def copies(self, rcpt: str) -> list[Copy]:
        """The accepted copies that name `rcpt` among their accepted recipients."""
        with self.lock:
            return [c for c in self.accepted if rcpt in c.rcpts]

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        try:
            with conn, conn.makefile("rb") as reader:
                Session(self, conn, reader, peer).run()
        except OSError:
            pass


class Session:
    """One connection to the recorder."""

    def __init__(self, recorder: Recorder, conn: socket.socket, reader, peer):
        self.recorder, self.conn, self.reader, self.peer = recorder, conn, reader, peer
        self.copy: Copy | None = None
        self.xforward: dict[str, str] = {}
        self.lmtp = False

    def say(self, line: str) -> None:
        self.conn.sendall(line.encode() + b"\r\n")

    def run(self) -> None:
        self.say("220 recorder.test ESMTP")
        for raw in self.reader:
            line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO", "LHLO"):
                self.copy, self.lmtp = None, verb == "LHLO"
                lines = ["recorder.test"] + (EXTENSIONS if verb != "HELO" else [])
                last = len(lines) - 1
                self.say("\r\n".join(f"250{' ' if i == last else '-'}{text}"
                                       for i, text in enumerate(lines)))
            elif verb == "XFORWARD":
                for item in arg.split():
                    key, _, value = item.partition("=")
                    self.xforward[key.upper()] = value
                self.say("250 2.0.0 Ok")
            elif verb == "MAIL":
                address, _, params = arg[5:].strip().partition(">")
                self.copy = Copy(address.lstrip("<"), params.split(), [], b"",
                                 dict(self.xforward))
                self.xforward = {}
                self.say("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpt = arg[3:].strip().strip("<>")
                reply = self.recorder.rcpt_replies.get(rcpt, "250 2.1.5 Ok")
                with self.recorder.lock:
                    self.recorder.rcpt_log.append((rcpt, reply))
                if self.copy is not None and reply.startswith("2"):
                    self.copy.rcpts.append(rcpt)
                self.say(reply if self.copy is not None else "503 5.5.1 Error: need MAIL")
            elif verb == "DATA":
                if self.copy is None or not self.copy.rcpts:
                    self.say("554 5.5.1 Error: no valid recipients")
                    continue
                self.say("354 End data with <CR><LF>.<CR><LF>")
                if not self.data():
                    return
            elif verb == "RSET":
                self.copy = None
                self.say("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.say("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.say("221 2.0.0 Bye")
                return
            else:
                self.say("502 5.5.2 Error: command not recognized")

    def data(self) -> bool:
        """Read the message up to the final dot and answer it; False when the client left."""
        lines = []
        for raw in self.reader:
            if raw == b".\r\n":
                break
            lines.append(raw[1:] if raw.startswith(b".") else raw)
        else:
            return False  # end of file before the final dot: nothing was accepted
        copy, self.copy = self.copy, None
        copy.data = b"".join(lines)
        recorder = self.recorder
        reply = recorder.data_reply or "250 2.0.0 Ok: queued as RECORDED"
        finals = [recorder.data_replies.get(rcpt, reply) for rcpt in copy.rcpts] \
            if self.lmtp else [reply]
        if self.lmtp:
            copy.rcpts = [r for r, final in zip(copy.rcpts, finals) if final.startswith("2")]
        copy.final = finals[0]
        accepted = any(final.startswith("2") for final in finals)
        if recorder.hold and accepted:
            recorder.held_peer = self.peer
            recorder.held.set()
            left = self.wait_for_release()
            recorder.held.clear()
            if left:
                with recorder.lock:
                    recorder.aborted.append(copy)
                return False
        with recorder.lock:  # before the reply: a client told 250 finds its copy here
            (recorder.accepted if accepted else recorder.refused).append(copy)
        self.conn.sendall("".join(f"{final}\r\n" for final in finals).encode())
        return True

    def wait_for_release(self) -> bool:
        """Wait for `release`; True when the client hung up meanwhile."""
        while not self.recorder.release.is_set():
            readable, _, _ = select.select([self.conn], [], [], 0.05)
            if readable:
                try:
                    if self.conn.recv(1, socket.MSG_PEEK) == b"":
                        return True
                except OSError:
                    return True
                self.recorder.release.wait(0.05)  # it spoke out of turn: not a hang-up
        return False
