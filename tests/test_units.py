"""Unit tests for the scoreboard, the maildir next hop and the built-in content check."""

import os
import re

import pytest

from poolmgr import delivery
from poolmgr.board import COUNTERS, Board
from poolmgr.scanner.checks import EICAR, scan


def test_board_slots_are_shared_across_fork():
    board = Board(slots=4)
    index = board.alloc("smtp", generation=1, number=1)
    before = board.read(index)["heartbeat"]
    pid = os.fork()
    if pid == 0:  # the worker's side writes, the master's side reads
        slot = board.slot(index)
        slot.beat()
        slot.set_sessions(412)
        slot.add("connections", 3)
        os._exit(0)
    os.waitpid(pid, 0)
    info = board.read(index)
    assert info["sessions"] == 412 and info["heartbeat"] > before
    assert info["counters"]["connections"] == 3
    assert board.free(index)["connections"] == 3
    again = board.alloc("scanner", generation=2, number=1)
    assert again == index and board.read(again)["counters"] == dict.fromkeys(COUNTERS, 0)


def test_maildir_delivery_is_atomic_and_unique(tmp_path):
    delivery.prepare(str(tmp_path))
    names = {delivery.deliver(str(tmp_path), b"Subject: %d\r\n\r\nx\r\n" % n) for n in range(3)}
    assert len(names) == 3
    assert sorted(os.listdir(tmp_path / "new")) == sorted(names)
    assert os.listdir(tmp_path / "tmp") == []
    assert all(re.fullmatch(r"\d+\.M\d+P\d+Q\d+\..+", name) for name in names)


def test_maildir_delivery_failure_raises(tmp_path):
    with pytest.raises(OSError):
        delivery.deliver(str(tmp_path / "missing"), b"x")


def rule(name, pattern, header="", body=False, action="reject"):
    return {"name": name, "header": header.lower(), "body": body,
            "pattern": re.compile(pattern), "action": action}


def test_checks_eicar_rules_and_tags():
    clean = b"Subject: hello\r\n\r\nnothing here\r\n"
    assert scan(clean, [], eicar=True).result == "clean"
    assert scan(b"Subject: x\r\n\r\n" + EICAR + b"\r\n", [], eicar=True).reply.code == 554
    assert scan(b"Subject: x\r\n\r\n" + EICAR + b"\r\n", [], eicar=False).result == "clean"
    rules = [rule("lottery", "(?i)lottery", header="Subject"),
             rule("cheap", "cheap", body=True, action="tag")]
    verdict = scan(b"Subject: LOTTERY win\r\n\r\nx\r\n", rules, eicar=True)
    assert verdict.result == "rejected" and verdict.reason == "lottery"
    assert str(verdict.reply) == "554 5.7.1 Rejected by content rule lottery"
    verdict = scan(b"Subject: offer\r\n\r\ncheap pills\r\n", rules, eicar=True)
    assert verdict.result == "tagged" and verdict.reason == "cheap" and verdict.reply is None


def test_checks_decode_quoted_printable_bodies():
    body = (b"Subject: qp\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nch=\r\neap\r\n")
    assert scan(body, [rule("cheap", "cheap", body=True)], eicar=False).result == "rejected"
