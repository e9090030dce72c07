"""The relay client: its connection cache (reuse, a cached connection the server closed, expiry),
XFORWARD to a next hop that offers fewer attributes or refuses it, and long lines folded on the
way."""

import logging
import socket
import threading
import time

import pytest

from poolmgr import config, log
from poolmgr.smtp import relay
from poolmgr.config import NextHop

TIMEOUTS = config.load(None).timeouts


class Server:
    """A small pipelining SMTP server on loopback that records every connection's commands.

    `close_idle_after` > 0: after that many messages on a connection, say 421 and close it
    while it sits idle, as a server does on its idle timeout. `refuse_after` > 0: after that
    many messages, answer the next command with 421 and close (a server shutting down).
    """

    def __init__(self, close_idle_after: int = 0, refuse_after: int = 0, ehlo: bytes = b"250-PIPELINING\r\n"
                 b"250-XFORWARD NAME ADDR\r\n250 SIZE 1000000\r\n",
                 xforward_reply: bytes = b"250 2.0.0 Ok\r\n", closing_rcpt: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(10)
        self.hop = NextHop("smtp", "127.0.0.1", self.sock.getsockname()[1])
        self.close_idle_after = close_idle_after
        self.refuse_after = refuse_after
        self.ehlo = ehlo
        self.xforward_reply = xforward_reply
        self.closing_rcpt = closing_rcpt  # answer RCPT with 421 and close
        self.connections: list[list[bytes]] = []
        self.data: list[list[bytes]] = []  # each message's lines as received, CRLF included
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            seen: list[bytes] = []
            with self.lock:
                self.connections.append(seen)
            threading.Thread(target=self._serve, args=(conn, seen), daemon=True).start()

    def _serve(self, conn, seen):
        conn.settimeout(10)
        conn.sendall(b"220 test.example ESMTP\r\n")
        reader = conn.makefile("rb")
        in_data, messages = False, 0
        try:
            for raw in reader:
                line = raw.rstrip(b"\r\n")
                if in_data:
                    if line != b".":
                        with self.lock:
                            self.data[-1].append(raw)
                    else:
                        in_data = False
                        messages += 1
                        conn.sendall(b"250 2.0.0 Ok: queued\r\n")
                        if messages == self.close_idle_after:
                            time.sleep(0.2)
                            conn.sendall(b"421 4.4.2 test.example Error: timeout exceeded\r\n")
                            break
                    continue
                seen.append(line)
                if messages and messages == self.refuse_after:
                    conn.sendall(b"421 4.3.2 test.example Service shutting down\r\n")
                    break
                if line.startswith(b"EHLO"):
                    conn.sendall(b"250-test.example\r\n" + self.ehlo)
                elif line.startswith(b"XFORWARD"):
                    conn.sendall(self.xforward_reply)
                elif line.startswith(b"RCPT") and self.closing_rcpt:
                    conn.sendall(b"421 4.3.2 test.example Service shutting down\r\n")
                    break
                elif line.startswith(b"MAIL") and b"reject" in line:
                    conn.sendall(b"550 5.1.0 Sender rejected\r\n")
                elif line == b"DATA":
                    in_data = True
                    with self.lock:
                        self.data.append([])
                    conn.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                elif line == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    conn.sendall(b"250 2.0.0 Ok\r\n")
        except OSError:
            pass
        conn.close()

    def commands(self) -> list[list[bytes]]:
        with self.lock:
            return [list(c) for c in self.connections]

    def close(self):
        self.sock.close()


@pytest.fixture
def server():
    servers = []

    def make(**kwargs) -> Server:
        servers.append(Server(**kwargs))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def send(hop, cache, sender="a@example.org", ident="Q1"):
    msg = relay.Outgoing(sender, ["b@example.test"], b"Subject: x\r\n\r\nhi\r\n",
                         xforward={"NAME": "", "ADDR": "192.0.2.1", "IDENT": ident})
    return relay.send(hop, msg, helo="mx.test", timeouts=TIMEOUTS,
                      deadline=time.monotonic() + 10, cache=cache)


def test_cached_connection_carries_the_next_message_with_its_own_xforward(server):
    srv = server()
    cache = relay.Cache(2.0)
    assert [r.code for r in send(srv.hop, cache)] == [250]
    assert [r.code for r in send(srv.hop, cache, sender="c@example.org")] == [250]
    (commands,) = srv.commands()  # one connection, one greeting, two transactions
    assert commands == [b"EHLO mx.test",
                        b"XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.1",
                        b"MAIL FROM:<a@example.org> SIZE=18", b"RCPT TO:<b@example.test>",
                        b"DATA",
                        b"XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.1",
                        b"MAIL FROM:<c@example.org> SIZE=18", b"RCPT TO:<b@example.test>",
                        b"DATA"]
    cache.close()
    deadline = time.monotonic() + 5
    while srv.commands()[0][-1] != b"QUIT" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.commands()[0][-1] == b"QUIT"


def test_a_cached_connection_the_server_closed_is_replaced(server):
    srv = server(close_idle_after=1)
    cache = relay.Cache(5.0)
    assert [r.code for r in send(srv.hop, cache)] == [250]
    time.sleep(0.5)  # the server says 421 and closes while the connection sits in the cache
    assert [r.code for r in send(srv.hop, cache)] == [250]
    first, second = srv.commands()
    assert [c for c in first if c.startswith(b"MAIL")] == [b"MAIL FROM:<a@example.org> SIZE=18"]
    assert [c for c in second if c.startswith(b"MAIL")] == [b"MAIL FROM:<a@example.org> SIZE=18"]


def test_a_421_on_reuse_sends_the_message_over_a_new_connection(server):
    """The server closes as the next message starts: 421 is the answer to its first command."""
    srv = server(refuse_after=1)
    cache = relay.Cache(5.0)
    assert [r.code for r in send(srv.hop, cache)] == [250]
    assert [r.code for r in send(srv.hop, cache, sender="c@example.org")] == [250]
    first, second = srv.commands()
    assert first[-1].startswith(b"XFORWARD")  # refused with 421: the message was not sent
    assert b"MAIL FROM:<c@example.org> SIZE=18" in second


def test_failed_transactions_and_old_connections_are_not_cached(server):
    srv = server()
    cache = relay.Cache(2.0)
    assert [r.code for r in send(srv.hop, cache, sender="reject@example.org")] == [550]
    assert cache.idle.get(srv.hop, []) == []
    no_cache = relay.Cache(0)
    assert [r.code for r in send(srv.hop, no_cache)] == [250]
    assert no_cache.idle.get(srv.hop, []) == []
    old = relay.Cache(2.0, reuse_time_limit=0.001)
    time.sleep(0.01)
    assert [r.code for r in send(srv.hop, old)] == [250]
    assert old.idle.get(srv.hop, []) == []
    assert len(srv.commands()) == 3


def test_idle_connections_expire_with_quit(server):
    srv = server()
    cache = relay.Cache(0.2)
    send(srv.hop, cache)
    cache.expire()
    assert len(cache.idle[srv.hop]) == 1
    time.sleep(0.3)
    cache.expire()
    assert cache.idle[srv.hop] == []
    deadline = time.monotonic() + 5
    while srv.commands()[0][-1] != b"QUIT" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.commands()[0][-1] == b"QUIT"
    send(srv.hop, cache)
    assert len(srv.commands()) == 2


def test_without_pipelining_each_command_waits_for_its_reply(server):
    srv = server(ehlo=b"250 XFORWARD ADDR\r\n")
    cache = relay.Cache(2.0)
    assert [r.code for r in send(srv.hop, cache)] == [250]
    assert [r.code for r in send(srv.hop, cache, sender="reject@example.org")] == [550]
    (commands,) = srv.commands()
    assert commands[:5] == [b"EHLO mx.test", b"XFORWARD ADDR=192.0.2.1",
                            b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.test>", b"DATA"]
    # after the rejected MAIL nothing more of that transaction is sent
    assert commands[5:] == [b"XFORWARD ADDR=192.0.2.1", b"MAIL FROM:<reject@example.org>"]


def test_relay_sends_only_the_xforward_attributes_the_server_offers(server):
    """An older next hop that offers fewer attributes must not get a 501 (and 451 forever)."""
    srv = server(ehlo=b"250 XFORWARD NAME ADDR\r\n")
    msg = relay.Outgoing("a@example.org", ["b@example.test"], b"Subject: x\r\n\r\nhi\r\n",
                         xforward={"NAME": "[UNAVAILABLE]", "ADDR": "192.0.2.1", "PORT": "2525",
                                   "HELO": ""})
    replies = relay.send(srv.hop, msg, helo="mx.test", timeouts=TIMEOUTS,
                         deadline=time.monotonic() + 10)
    assert [r.code for r in replies] == [250]
    (commands,) = srv.commands()
    assert commands[1] == b"XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.1"


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_refused_xforward_is_logged_and_the_message_goes_on(server, pipelining, caplog):
    """As Postfix's smtp client: XFORWARD only names the client in the next hop's log, so a
    501 to it (an IPv6 ADDR to an IPv4-only Postfix) is no reason to defer the message."""
    ehlo = b"250-XFORWARD NAME ADDR\r\n250 SIZE 1000000\r\n"
    srv = server(ehlo=(b"250-PIPELINING\r\n" if pipelining else b"") + ehlo,
                 xforward_reply=b"501 5.5.4 Bad ADDR syntax: IPv6:2001:db8::1\r\n")
    caplog.set_level(logging.INFO, logger=log.get("relay").name)
    assert [r.code for r in send(srv.hop, None)] == [250]
    said = [r.getMessage() for r in caplog.records if r.name == log.get("relay").name]
    (commands,) = srv.commands()
    assert commands[1:4] == [b"XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.1",
                             b"MAIL FROM:<a@example.org> SIZE=18", b"RCPT TO:<b@example.test>"]
    assert said == [f"host {srv.hop} said: 501 5.5.4 Bad ADDR syntax: IPv6:2001:db8::1 "
                    "(in reply to XFORWARD command)"]


def test_a_server_closing_at_rcpt_without_pipelining_is_a_relay_error(server):
    """421 to the first of three recipients, then the connection closed: a RelayError (the
    caller answers 4xx for all), never fewer replies than recipients."""
    srv = server(ehlo=b"250 SIZE 1000000\r\n", closing_rcpt=True)
    msg = relay.Outgoing("a@example.org", ["b@example.test", "c@example.test", "d@example.test"],
                         b"Subject: x\r\n\r\nhi\r\n")
    with pytest.raises(relay.RelayError):
        relay.send(srv.hop, msg, helo="mx.test", timeouts=TIMEOUTS,
                   deadline=time.monotonic() + 10)


@pytest.mark.parametrize("line, long", [(b"x" * 998, False), (b"x" * 999, True),
                                        (b"x" * 998 + b"\r", False),
                                        (b"x" * 600 + b"\r" + b"y" * 600, False)],
                         ids=["998", "999", "998-and-CR", "1201-with-CR"])
def test_a_line_is_long_from_999_octets_between_line_breaks(line, long):
    data = b"Subject: s\r\n\r\n" + line + b"\r\nshort\r\n"
    assert relay._has_long_line(data) is long
    assert (relay.fold(data) != data) is long


def test_a_message_over_the_precheck_bound_is_measured_window_by_window():
    lines = b"x" * 78 + b"\r\n"
    big = b"Subject: s\r\n\r\n" + lines * (relay.PRECHECK_MAX // len(lines) + 1)
    assert len(big) > relay.PRECHECK_MAX and not relay._has_long_line(big)
    assert relay._has_long_line(big + b"y" * 999 + b"\r\n")
    # A long line across a window's end is seen whole in the window where it starts; a short
    # one there, its CRLF in the next window's overlap, is not taken for a long one.
    for offset in (-1002, -1001, -1000, -999, -998, -500, -2, -1, 0, 1, 2):
        size = relay.PRECHECK_MAX + offset  # short lines up to there, then the one measured
        rest = size % len(lines)
        head = lines * (size // len(lines)) + (b"z" * (rest - 1) + b"\n" if rest else b"")
        assert len(head) == size and head.endswith(b"\n")
        assert relay._has_long_line(head + b"y" * 999 + b"\r\nshort\r\n"), offset
        assert not relay._has_long_line(head + b"y" * 998 + b"\r\nshort\r\n"), offset


def test_lines_over_998_octets_are_folded_not_refused_downstream(server):
    """Postfix's smtp_line_length_limit: a strict next hop would answer 500 to a 3000-octet
    line; the relay breaks it with CRLF SPACE, each piece within 998 octets."""
    srv = server()
    long_line = b"".join(bytes([65 + i % 26]) for i in range(3000))
    body = b"Subject: long\r\n\r\n" + long_line + b"\r\nshort\r\n"
    msg = relay.Outgoing("a@example.org", ["b@example.test"], body)
    assert [r.code for r in relay.send(srv.hop, msg, helo="mx.test", timeouts=TIMEOUTS,
                                       deadline=time.monotonic() + 10)] == [250]
    (lines,) = srv.data
    assert max(len(line) for line in lines) == 998 + 2
    assert all(line.endswith(b"\r\n") for line in lines)
    assert b"".join(lines).replace(b"\r\n ", b"") == body  # nothing lost, only folded
    size = len(b"".join(lines))  # SIZE counts the folded message
    assert srv.commands()[0][1] == f"MAIL FROM:<a@example.org> SIZE={size}".encode()
