"""Unit tests: scoreboard, maildir next hop, content check, anvil store, recipient table,
IPv4-mapped peers, listening sockets."""

import os
import random
import re
import signal
import socket
import time
import tracemalloc

import pytest

from poolmgr import maildir
from poolmgr.defence.anvil import Anvil, AnvilServer
from poolmgr.defence.clientstate import PassCache, TtlCache
from poolmgr.defence.peername import valid_hostname
from poolmgr.defence.networks import in_networks, parse_cidrs, plain_ip
from poolmgr.defence.recipients import RecipientTable
from poolmgr.board import COUNTERS, Board
from poolmgr.listen import accept_queue, bind_all
from poolmgr.scanner.backends.base import Result
from poolmgr.scanner.backends.builtin import EICAR, EICAR_NAME, scan
from poolmgr.smtp.parse import canonical
from poolmgr.testing import free_port, wait


def test_a_signal_to_a_worker_just_forked_waits_for_its_handlers():
    """A worker retired right after its fork (the max_rss check, a reload) gets its SIGTERM
    once its own handlers are in place: not the master's handler (which writes the signal to
    the master's wakeup pipe), not the default action (killed by signal 15)."""
    from poolmgr import worker

    ran = []
    masters = signal.signal(signal.SIGTERM, lambda *_: ran.append("master's handler"))
    try:
        pid = worker.fork()
        if pid == 0:
            code = 1
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # before child_after_fork
                worker.child_after_fork([])
                code = 0 if worker._early == [signal.SIGTERM] and not ran else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGTERM, masters)
    assert os.waitstatus_to_exitcode(status) == 0
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # the master's, as before


SLOW_MODULE = """\
import threading

if threading.current_thread().name == "importer":  # the master's thread, held at the fork
    __import__("builtins").poolmgr_test_gate.wait(10)
DONE = 42
"""


def test_a_module_another_thread_was_importing_at_the_fork_imports_afresh_in_the_worker(
        tmp_path, monkeypatch):
    """The master's cluster monitor thread imports on its first round (encodings.idna); a
    worker forked meanwhile inherited the module half-initialized and its import lock held
    by a thread it does not have, and hung on its first import of it. After
    child_after_fork the worker imports it afresh."""
    import importlib
    import sys
    import threading
    import time

    from poolmgr import worker

    (tmp_path / "poolmgr_slow_module.py").write_text(SLOW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    gate = threading.Event()
    monkeypatch.setattr("builtins.poolmgr_test_gate", gate, raising=False)
    importer = threading.Thread(target=importlib.import_module, args=("poolmgr_slow_module",),
                                name="importer", daemon=True)
    importer.start()
    try:
        wait.wait_until(lambda: "poolmgr_slow_module" in sys.modules, timeout=2,
                        what="the import under way")
        pid = worker.fork()
        if pid == 0:
            code = 1
            try:
                signal.alarm(5)  # a hung import ends the child (killed by SIGALRM)
                worker.child_after_fork([])
                import poolmgr_slow_module
                code = 0 if poolmgr_slow_module.DONE == 42 else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 10
        while (result := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if result[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert result[0] == pid and os.waitstatus_to_exitcode(result[1]) == 0
    finally:
        gate.set()
        importer.join()
        sys.modules.pop("poolmgr_slow_module", None)


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



def test_the_master_never_reads_a_heartbeat_half_written():
    """A worker beats while the master reads: every heartbeat read is one the worker wrote
    (struct.pack_into cleared the field before writing it, and the master once read 0.0:
    "no heartbeat for" the machine's uptime, and killed a healthy worker)."""
    board = Board(slots=4)
    index = board.alloc("scanner", generation=1, number=1)
    floor = board.read(index)["heartbeat"]
    pid = os.fork()
    if pid == 0:
        slot, end = board.slot(index), time.monotonic() + 1.5
        while time.monotonic() < end:
            slot.beat()
            slot.set_busy(1)
        os._exit(0)
    reads = []
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            info = board.read(index)
            reads.append((info["heartbeat"], info["busy"]))
    finally:
        os.waitpid(pid, 0)
    assert len(reads) > 10_000
    assert min(heartbeat for heartbeat, _ in reads) >= floor
    busy = [b for _, b in reads]  # set to 1 again and again: once seen, never 0 again
    assert 0 not in busy[busy.index(1) if 1 in busy else len(busy):]

def test_maildir_delivery_is_atomic_and_unique(tmp_path):
    maildir.prepare(str(tmp_path))
    names = {maildir.deliver(str(tmp_path), b"Subject: %d\r\n\r\nx\r\n" % n) for n in range(3)}
    assert len(names) == 3
    assert sorted(os.listdir(tmp_path / "new")) == sorted(names)
    assert os.listdir(tmp_path / "tmp") == []
    assert all(re.fullmatch(r"\d+\.M\d+P\d+Q\d+\..+", name) for name in names)


def test_maildir_delivery_failure_raises(tmp_path):
    with pytest.raises(OSError):
        maildir.deliver(str(tmp_path / "missing"), b"x")


def rule(name, pattern, header="", body=False, action="reject"):
    return {"name": name, "header": header.lower(), "body": body,
            "pattern": re.compile(pattern), "action": action}


def test_builtin_check_eicar_rules_and_tags():
    clean = b"Subject: hello\r\n\r\nnothing here\r\n"
    assert scan(clean, [], eicar=True) == Result("builtin")
    assert scan(b"Subject: x\r\n\r\n" + EICAR + b"\r\n", [], eicar=True) == \
        Result("builtin", virus=EICAR_NAME)
    assert scan(b"Subject: x\r\n\r\n" + EICAR + b"\r\n", [], eicar=False) == Result("builtin")
    rules = [rule("lottery", "(?i)lottery", header="Subject"),
             rule("cheap", "cheap", body=True, action="tag")]
    assert scan(b"Subject: LOTTERY win\r\n\r\nx\r\n", rules, eicar=True) == \
        Result("builtin", rule="lottery")
    assert scan(b"Subject: offer\r\n\r\ncheap pills\r\n", rules, eicar=True) == \
        Result("builtin", tests=("cheap",))


def test_builtin_check_finds_eicar_in_encoded_parts_without_rules():
    """No rules: a message is parsed only when an encoded part could hide the string (the
    header in any case)."""
    import base64
    encoded = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
    for cte in (b"Content-Transfer-Encoding: base64", b"CONTENT-TRANSFER-ENCODING: BASE64"):
        data = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
                + cte + b"\r\n\r\n" + encoded)
        assert EICAR not in data
        assert scan(data, [], eicar=True) == Result("builtin", virus=EICAR_NAME)
    assert scan(b"Subject: x\r\n\r\nplain\r\n", [], eicar=True) == Result("builtin")


def test_builtin_check_decodes_quoted_printable_bodies():
    body = (b"Subject: qp\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nch=\r\neap\r\n")
    assert scan(body, [rule("cheap", "cheap", body=True)], eicar=False).rule == "cheap"


def test_anvil_counts_connections_and_rates_per_client():
    anvil = Anvil(time_unit=60)
    assert anvil.connect("w1", "192.0.2.1", now=0) == (1, 1)
    assert anvil.connect("w2", "192.0.2.1", now=1) == (2, 2)  # another worker, same client
    assert anvil.connect("w2", "192.0.2.2", now=1) == (1, 1)
    anvil.disconnect("w1", "192.0.2.1")
    anvil.disconnect("w1", "192.0.2.1")  # not held by w1 any more: ignored
    assert anvil.connect("w1", "192.0.2.1", now=2) == (2, 3)
    assert [anvil.message("192.0.2.1", now=3) for _ in range(2)] == [1, 2]
    assert anvil.recipient("192.0.2.1", now=3) == 1
    # A new window starts one time unit after the first event; live connections stay.
    assert anvil.connect("w1", "192.0.2.1", now=61) == (3, 1)
    assert anvil.message("192.0.2.1", now=61) == 1


def test_anvil_releases_an_exited_workers_connections_and_forgets_idle_clients():
    anvil = Anvil(time_unit=10)
    for _ in range(3):
        anvil.connect("w1", "192.0.2.1", now=0)
    anvil.connect("w2", "192.0.2.1", now=0)
    anvil.connect("w1", "192.0.2.3", now=0)
    assert anvil.release("w1") == 4 and anvil.release("w1") == 0
    assert anvil.clients["192.0.2.1"].count == 1
    anvil.purge(now=20)
    assert list(anvil.clients) == ["192.0.2.1"]  # still has a live connection


def test_anvil_forgets_a_storms_clients_once_their_window_ends_without_more_storm():
    """A storm's bots are gone from the store within a time unit or two of calm traffic, not
    only after a thousand more requests (an hour's soak grew the master by every bot seen)."""
    anvil = Anvil(time_unit=60)
    for n in range(500):
        anvil.connect("w1", f"192.0.2.{n % 250}", now=n / 10)
        anvil.disconnect("w1", f"192.0.2.{n % 250}")
    assert len(anvil.clients) == 250
    anvil.message("198.51.100.1", now=200)  # one calm request after the window
    assert list(anvil.clients) == ["198.51.100.1"]



def test_anvil_sweeps_a_flood_of_live_clients_rarely():
    """With every client live a sweep finds nothing to forget: it waits until the store has
    doubled (or a time unit has passed), so each request does not walk them all."""
    anvil = Anvil(time_unit=60)
    sweeps = []
    purge = anvil.purge
    anvil.purge = lambda now: (sweeps.append(len(anvil.clients)), purge(now))
    for n in range(20_000):
        anvil.connect("w1", f"10.0.{n // 250}.{n % 250}", now=n / 2000)
    assert len(sweeps) <= 6 and len(anvil.clients) == 20_000  # 0, 1024, 2048, ... 16384


def test_ttl_cache_sweeps_expired_entries_by_age():
    cache = TtlCache(max_entries=1000, sweep_every=60)
    for n in range(300):
        cache.put(("zen.example", f"192.0.2.{n}"), True, expires=n + 300, now=n)
    assert len(cache) == 300  # nothing had expired at the sweeps so far
    cache.put("late", True, expires=10_000, now=700)
    assert len(cache) == 1 and cache.get("late", now=700) is True
    cache.put("bound", True, expires=10_000, now=701)  # no sweep before sweep_every
    assert len(cache) == 2


def test_ttl_cache_is_not_copied_while_every_entry_holds():
    cache = TtlCache(max_entries=1000, sweep_every=60)
    cache.put("a", 1, expires=1000, now=0)
    entries = cache.entries
    cache.put("b", 2, expires=1000, now=500)  # a sweep is due, but nothing has expired
    assert cache.entries is entries
    cache.put("c", 3, expires=2000, now=1001)  # now something has
    assert cache.entries is not entries and set(cache.entries) == {"c"}


def test_greet_passes_hold_for_their_ttl_per_address_and_family():
    passes = PassCache(max_entries=1000, sweep_every=60)
    passes.add("192.0.2.7", ttl=86400, now=0)
    passes.add("2001:db8::7", ttl=2, now=0)
    passes.add("not an address", ttl=2, now=0)
    assert passes.holds("192.0.2.7", now=86399.9) and not passes.holds("192.0.2.7", now=86400)
    assert passes.holds("2001:db8::7", now=1.9) and not passes.holds("2001:db8::7", now=2)
    assert not passes.holds("::192.0.2.7", now=1) and not passes.holds("192.0.2.8", now=1)
    assert passes.holds("not an address", now=1)
    passes.add("192.0.2.9", ttl=10, now=100)  # the sweep: the expired ones are gone
    assert len(passes) == 2 and list(passes.keys) == [0xC0000207, 0xC0000209]


def test_greet_passes_answer_as_a_dict_would_through_merges_and_sweeps():
    rnd = random.Random(7)
    passes, model, now = PassCache(max_entries=100_000, sweep_every=60), {}, 0.0
    for _ in range(30_000):  # over 5,000 passes a merge: several merges and sweeps
        now += rnd.random() / 10
        ip = (f"10.{rnd.randrange(4)}.{rnd.randrange(256)}.{rnd.randrange(256)}"
              if rnd.random() < 0.9 else f"2001:db8::{rnd.randrange(5000):x}")
        if rnd.random() < 0.5:
            ttl = rnd.choice([5, 30, 300, 86400])
            passes.add(ip, ttl, now)
            model[ip] = now + ttl
        else:
            assert passes.holds(ip, now) is (model.get(ip, -1) > now)
    assert list(passes.keys) == sorted(passes.keys)


def test_a_full_pass_cache_drops_the_expired_first_and_keeps_the_newest_pass():
    passes = PassCache(max_entries=3, sweep_every=600)
    for n, ttl in enumerate((5, 100, 100)):
        passes.add(f"10.0.0.{n}", ttl, now=n)
    passes.add("10.0.0.9", 100, now=10)  # over the bound: 10.0.0.0's pass had expired
    assert len(passes) == 3 and passes.holds("10.0.0.9", now=11)
    assert passes.holds("10.0.0.1", now=11) and not passes.holds("10.0.0.0", now=11)
    passes.add("10.0.0.8", 100, now=12)  # over it with none expired: emptied but for this one
    assert len(passes) == 1 and passes.holds("10.0.0.8", now=13)


def test_a_greet_pass_costs_a_fifth_of_a_cache_entry():
    def cost(add) -> float:  # the passes of 5,000 clients, once merged into the arrays
        tracemalloc.start()
        for n in range(5000):
            add(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", n / 10)
        passes._merge()
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return size / 5000

    cache, passes = TtlCache(), PassCache()
    entry = cost(lambda ip, now: cache.put(ip, True, now + 86400, now))
    assert cost(lambda ip, now: passes.add(ip, 86400, now)) < entry / 5


def test_anvil_server_answers_over_a_seqpacket_pair():
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master_end.setblocking(False)
    server = AnvilServer(Anvil(time_unit=60), clock=lambda: 5.0)
    for packet in (b"7 C 192.0.2.9", b"8 C 192.0.2.9", b"garbage", b"9 M 192.0.2.9",
                   b"0 D 192.0.2.9", b"10 R 192.0.2.9"):
        worker_end.send(packet)
    assert server.serve(master_end, owner=1) is True
    answers = [worker_end.recv(64) for _ in range(4)]
    assert answers == [b"7 1 1 0", b"8 2 2 0", b"9 1", b"10 1"]
    assert server.anvil.clients["192.0.2.9"].count == 1
    worker_end.close()
    assert server.serve(master_end, owner=1) is False


def test_anvil_caches_client_names_for_their_ttl_over_the_wire():
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master_end.setblocking(False)
    now = [5.0]
    server = AnvilServer(Anvil(time_unit=60), clock=lambda: now[0])
    for packet in (b"1 N 192.0.2.9", b"0 H 192.0.2.9 mail.example.test mail.example.test 60",
                   b"0 H 192.0.2.10 unknown unknown 60", b"2 N 192.0.2.9", b"3 N 192.0.2.10"):
        worker_end.send(packet)
    assert server.serve(master_end, owner=1) is True
    assert [worker_end.recv(64) for _ in range(3)] == [
        b"1 0", b"2 1 mail.example.test mail.example.test", b"3 1 unknown unknown"]
    now[0] = 65.0  # the TTL has passed
    worker_end.send(b"4 N 192.0.2.9")
    server.serve(master_end, owner=1)
    assert worker_end.recv(64) == b"4 0"


def test_a_ptr_name_counts_only_when_it_is_a_hostname():
    assert valid_hostname("mail.example.test") and valid_hostname("a-b_c.example")
    for bad in ("", "127.0.0.1", "a..b", "-a.example", "a b.example", "a\\032b.example",
                "x" * 64 + ".example", "ex\xe4mple.test"):
        assert not valid_hostname(bad), bad


def test_recipient_table(tmp_path):
    path = tmp_path / "recipients"
    path.write_text("Bob@Example.test  OK  # trailing words are ignored\n\n@Catchall.test\n")
    table = RecipientTable.load(str(path))
    assert table.verdict(canonical("Bob@Example.TEST.")) is True
    assert table.verdict("eve@example.test") is False
    assert table.verdict("anyone@catchall.test") is True
    assert table.verdict("bob@elsewhere.test") is None  # not a local domain: not ours to say
    assert len(table) == 2
    path.write_text("bob@example.test\nbob\n")
    with pytest.raises(ValueError, match="line 2: 'bob' is not an address"):
        RecipientTable.load(str(path))


def test_ipv4_mapped_peers_become_plain_ipv4():
    assert plain_ip("::ffff:127.0.9.9") == "127.0.9.9"
    assert plain_ip("::FFFF:c000:0207") == "192.0.2.7"
    for other in ("192.0.2.7", "::1", "2001:db8::ffff:c000:207", "::127.0.0.1", "fe80::1%lo"):
        assert plain_ip(other) == other
    assert in_networks(plain_ip("::ffff:127.0.9.9"), parse_cidrs(["127.0.9.0/24"]))


def v6only(sock) -> int:
    return sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


def test_ipv6_wildcard_is_dual_stack_unless_ipv4_is_bound_beside_it():
    port = free_port()
    (alone,) = bind_all([("::", port)], 8)
    assert v6only(alone) == 0
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        assert alone.accept()[1][0] == "::ffff:127.0.0.1"
    alone.close()
    v4, v6 = bind_all([("0.0.0.0", port), ("::", port)], 8)  # would clash if v6 were dual
    assert v6only(v6) == 1
    v4.close(), v6.close()


def test_accept_queue_reports_the_fullest_listening_socket():
    socks = bind_all([("127.0.0.1", free_port()), ("127.0.0.1", free_port())], 8)
    waiting = [socket.create_connection(socks[n].getsockname(), timeout=5) for n in (1, 1, 0)]
    assert accept_queue(socks, 8) == (2, 8)
    for sock in waiting + socks:
        sock.close()


def test_free_ports_differ_and_lie_below_the_ephemeral_range():
    # Two listeners a test configures must differ, and no client connection may take a port
    # as its source port before the test binds it (the kernel's ephemeral range).
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port < low for port in ports)


def test_xdist_workers_hand_out_ports_from_slices_of_their_own(monkeypatch):
    """Under pytest-xdist every worker process has its own memory of handed-out ports: each
    takes its own slice of the range, so two workers never configure the same port."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    handed = {}
    for worker in ("gw0", "gw1", "gw2"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        handed[worker] = [free_port() for _ in range(50)]
    slices = {worker: (min(ports), max(ports)) for worker, ports in handed.items()}
    assert slices["gw0"][1] < slices["gw1"][0] and slices["gw1"][1] < slices["gw2"][0]
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    assert slices["gw0"][0] >= wait.LOWEST and slices["gw2"][1] < low
