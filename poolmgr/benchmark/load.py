"""The load generator: one process of client arrivals for a scenario (asyncio).

    python -m poolmgr.benchmark.load SPEC.json RESULT.json

SPEC (written by `poolmgr bench run`) holds the scenario, the target's addresses (`targets`:
several nodes take the connections in turn, round-robin, as senders spread over equal MX
records), this process's index among `processes`, and the wall-clock start. Arrivals follow
each phase's rates (this process takes 1/processes of each), or a replay's list (every
processes-th arrival, each client holding as long as its session in the mail log did); every
client comes from its own 127.x.y.z address (see `address`), and stops by itself: bots after
their hold or give-up time, everyone at the end of the drain. RESULT gets a per-second series
(open connections by profile; legitimate messages sent, accepted, deferred, refused) and one
record per bot connection (how it ended, whether its banner came) and per legitimate message.

A closed loop (the scenario's `loop`: profile, clients, duration; the scanner-pool and
cluster-overhead kinds) instead starts `clients` clients at once, each making one connection of
the profile after another until `duration` has passed: the load is as fast as the server
answers, not a rate. A legitimate client with `messages = 0` sends one message after another on
its connection until then.
"""

__all__ = ["address", "LISTED_PROFILE", "main", "listed_prefixes", "Generator", "IdleBot"]

import asyncio
import errno
import itertools
import json
import random
import resource
import signal
import socket
import sys
import time
from collections import Counter

from .scenario import PROFILES

LISTED_PROFILE = "listed"
_ORDER = tuple(PROFILES)
SPAM = (b"From: <offer@bot.example>\r\nTo: <bob@example.test>\r\nSubject: cheap pills\r\n\r\n"
        b"Buy now.\r\n")


# Each (profile, process) pair has a /16 of its own: 64,000 clients, each from its own address,
# so that no source address runs out of ephemeral ports and no two runs' clients share one
# for long (TIME_WAIT). 16 processes (scenario's most) x 9 profiles fit in 127.60-203.
MAX_PROCESSES = 16


def address(profile: str, index: int, n: int) -> str:
    """Client n of a profile in generator process `index`: 127.(60+16k+index).x.y."""
    second = 60 + MAX_PROCESSES * _ORDER.index(profile) + index
    return f"127.{second}.{(n // 250) % 256}.{n % 250 + 1}"


def listed_prefixes(processes: int) -> list[str]:
    k = _ORDER.index(LISTED_PROFILE)
    return [f"127.{60 + MAX_PROCESSES * k + i}." for i in range(processes)]


class Stalled(Exception):
    """No progress within the client's patience."""


class Client:
    """A minimal SMTP client conversation with a deadline per reply."""

    def __init__(self, reader, writer, patience: float):
        self.reader, self.writer, self.patience = reader, writer, patience

    async def reply(self) -> tuple[int, str]:
        while True:
            try:
                async with asyncio.timeout(self.patience):  # no task of its own, as wait_for's
                    line = await self.reader.readline()
            except TimeoutError:
                raise Stalled() from None
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                text = line.decode("utf-8", "replace").strip()
                return int(text[:3]) if text[:3].isdigit() else 0, text

    async def command(self, line: bytes) -> tuple[int, str]:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def message(self, data: bytes) -> tuple[int, str]:
        body = data.replace(b"\r\n.", b"\r\n..")
        self.writer.write(body + (b"" if body.endswith(b"\r\n") else b"\r\n") + b".\r\n")
        await self.writer.drain()
        return await self.reply()


class IdleBot:
    """An idle bot, the bulk of a flood, with no task, stream or transport (the generator
    shares the machine with the server: this is a third of the CPU an asyncio stream takes):
    a non-blocking socket whose connect goes out at once, read when the loop finds it
    readable, its replies' codes noted (the banner's 220 greets it; 421, 521 or 554 and the
    server's close end it), closed at its hold's end. `done`, when set (a future), gets how
    it ended: "held", the last reply's code, "closed" if none came, or "connect_failed"."""

    __slots__ = ("generator", "loop", "sock", "record", "started", "pending", "last", "timer",
                 "done")

    def __init__(self, generator: "Generator", source: str, target: tuple, hold: float,
                 done=None):
        self.generator, self.loop, self.done = generator, asyncio.get_running_loop(), done
        self.record, self.started = generator.bot_record("idle"), time.monotonic()
        self.pending, self.last, self.timer, self.sock = b"", "", None, None
        try:  # out of files or buffers is a failed connect too, not the generator's end
            self.sock = socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET,
                                      socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            self.sock.bind((source, 0))
            refused = self.sock.connect_ex(target) not in (0, errno.EINPROGRESS)
        except OSError:
            refused = True
        if refused:
            self.end("connect_failed")
            return
        self.loop.add_reader(self.sock.fileno(), self.readable)
        self.timer = self.loop.call_later(hold, self.end, "held")

    def readable(self) -> None:
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:  # refused or reset: before any reply, the connect failed
            self.end(self.last or ("closed" if self.record.get("greeted") is not None
                                   else "connect_failed"))
            return
        if not data:
            self.end(self.last or "closed")
            return
        self.record.setdefault("greeted", False)  # connected: something came
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            if line[3:4] == b"-":
                continue
            self.last = line[:3].decode("ascii", "replace")
            self.record["greeted"] = self.record["greeted"] or self.last == "220"
            if self.last in ("421", "521", "554"):
                self.end(self.last)
                return

    def end(self, how: str) -> None:
        if self.record["ended"]:
            return
        if self.sock is not None:
            if how == "held" and "greeted" not in self.record:  # nothing came: connected?
                try:
                    self.sock.getpeername()
                except OSError:
                    how = "connect_failed"
            if self.timer is not None:
                self.loop.remove_reader(self.sock.fileno())
                self.timer.cancel()
            self.sock.close()
            self.sock = None
        self.record["ended"] = how
        if how != "connect_failed":
            self.record["held"] = round(time.monotonic() - self.started, 3)
        self.generator.idle_ended(self)
        if self.done is not None and not self.done.done():
            self.done.set_result(how)


class Generator:
    def __init__(self, spec: dict):
        self.spec = spec
        self.scenario = spec["scenario"]
        self.profiles = self.scenario["profiles"]
        self.index, self.processes = spec["index"], spec["processes"]
        self.targets = [tuple(t) for t in spec.get("targets") or [(spec["host"], spec["port"])]]
        self.turn = 0  # the next connection's target, round-robin
        self.open = Counter()
        self.legit = Counter()
        self.bots: list[dict] = []
        self.messages: list[dict] = []
        self.series: list[dict] = []
        self.numbers = Counter()
        self.t0 = spec["t0"]
        self.end = float("inf")  # monotonic time the load ends (set by run)
        self.random = random.Random(spec.get("seed", 1) * 1000 + self.index)
        self.idle_bots: set[IdleBot] = set()  # open now
        self.idle_drained: asyncio.Event | None = None  # set when the last one ends

    def rel(self) -> float:
        return round(time.time() - self.t0, 3)

    async def connect(self, profile: str, source: str):
        host, port = self.targets[self.turn % len(self.targets)]
        self.turn += 1
        async with asyncio.timeout(30):  # no task of its own, as wait_for's
            return await asyncio.open_connection(host, port, local_addr=(source, 0))

    # -- bots
    async def bot(self, profile: str, hold: float | None = None) -> None:
        n = self.numbers[profile]
        self.numbers[profile] += 1
        source = address(profile, self.index, n)
        knobs = self.profiles[profile]
        if hold is not None and "hold" in knobs:  # a replayed session's own hold
            knobs = {**knobs, "hold": hold}
        if profile == "idle":
            return await self.idle(source, knobs["hold"])  # a closed loop's
        tries = 1 + (int(knobs.get("reconnects", 0)) if profile == "reconnector" else 0)
        for attempt in range(tries):
            record, started = self.bot_record(profile, attempt), time.monotonic()
            try:
                reader, writer = await self.connect(profile, source)
            except (OSError, asyncio.TimeoutError):
                record["ended"] = "connect_failed"
                self.open[profile] -= 1
                continue
            try:
                record["ended"] = await self.behave(profile, knobs, reader, writer, record)
            except Stalled:
                record["ended"] = "gave_up" if profile not in ("slowloris",
                                                               "pregreet") else "held"
            except (ConnectionError, OSError):
                record["ended"] = record["ended"] or "closed"
            finally:
                writer.close()
                self.open[profile] -= 1
                record["held"] = round(time.monotonic() - started, 3)
            if record["ended"] not in ("closed", "421", "521", "554") or \
                    profile != "reconnector":
                break

    def bot_record(self, profile: str, attempt: int = 0) -> dict:
        record = {"profile": profile, "t": self.rel(), "ended": "", "data": False,
                  "attempt": attempt}
        self.bots.append(record)
        self.open[profile] += 1
        return record

    def idle_arrival(self, hold: float | None) -> None:
        """An idle bot of the schedule (`hold`: a replayed session's own), left to itself."""
        n = self.numbers["idle"]
        self.numbers["idle"] += 1
        self.start_idle(address("idle", self.index, n),
                        self.profiles["idle"]["hold"] if hold is None else hold)

    def start_idle(self, source: str, hold: float, done=None) -> IdleBot:
        target = self.targets[self.turn % len(self.targets)]
        self.turn += 1
        bot = IdleBot(self, source, target, hold, done)
        if bot.sock is not None:
            self.idle_bots.add(bot)
        return bot

    def idle_ended(self, bot: IdleBot) -> None:
        self.open["idle"] -= 1
        self.idle_bots.discard(bot)
        if not self.idle_bots and self.idle_drained is not None:
            self.idle_drained.set()

    async def idle(self, source: str, hold: float) -> None:
        """An idle bot that the caller waits for (a closed loop's)."""
        done = asyncio.get_running_loop().create_future()
        self.start_idle(source, hold, done)
        await done

    async def behave(self, profile, knobs, reader, writer, record) -> str:
        if profile == "probe":
            client = Client(reader, writer, knobs["give_up"])
            code, _ = await client.reply()
            if code != 220:
                return str(code)
            record["greeted"] = True
            code, _ = await client.command(b"QUIT")
            return "quit" if code == 221 else str(code)
        if profile in ("slowloris", "pregreet"):
            hold = knobs["hold"]
            deadline = time.monotonic() + hold
            if profile == "pregreet":
                writer.write(b"EHLO bot.example\r\n")
                await writer.drain()
            client = Client(reader, writer, hold)
            last = ""
            while time.monotonic() < deadline:
                client.patience = max(0.01, min(deadline - time.monotonic(),
                                                 knobs.get("interval", hold)))
                try:
                    code, text = await client.reply()
                    last = str(code)
                    record["greeted"] = record.get("greeted") or code == 220
                    if code in (421, 521, 554):
                        return last
                except Stalled:
                    if profile == "slowloris":
                        writer.write(b"X")
                        await writer.drain()
                except ConnectionError:
                    return last or "closed"
            return "held"
        client = Client(reader, writer, knobs["give_up"])
        code, _ = await client.reply()
        if code != 220:
            return str(code)
        record["greeted"] = True
        code, _ = await client.command(b"EHLO bot.example")
        if code != 250:
            return str(code)
        code, _ = await client.command(b"MAIL FROM:<offer@bot.example>")
        if code != 250:
            return str(code)
        names = ([f"u{self.random.randrange(10**6)}" for _ in range(knobs["recipients"])]
                 if profile == "dictionary" else ["bob"])
        accepted, last = 0, ""
        for name in names:
            code, text = await client.command(f"RCPT TO:<{name}@example.test>".encode())
            last = text[:9]
            if code == 250:
                accepted += 1
            elif code in (421, 521):
                return str(code)
        if not accepted:
            await client.command(b"QUIT")
            return last[:3]
        code, _ = await client.command(b"DATA")
        if code != 354:
            return str(code)
        record["data"] = True
        code, _ = await client.message(SPAM)
        await client.command(b"QUIT")
        return "spam_accepted" if code == 250 else str(code)

    # -- legitimate mail
    def legit_record(self, connection: int, k: int) -> tuple[dict, bytes, str]:
        knobs = self.profiles["legit"]
        size = self.random.choice(knobs["sizes"])
        rcpt = self.random.choice(knobs["recipients"])
        mid = f"<bench-{self.index}-{connection}-{k}@partner.example>"
        head = (f"From: <sender{connection}@partner.example>\r\nTo: <{rcpt}>\r\n"
                f"Subject: bench {connection}.{k}\r\nMessage-ID: {mid}\r\n\r\n").encode()
        data = head + (b"x" * 76 + b"\r\n") * max(1, (size - len(head)) // 78)
        record = {"t": self.rel(), "size": len(data), "id": mid, "outcome": "", "reply": "",
                  "latency": None}
        self.messages.append(record)
        self.legit["sent"] += 1
        return record, data, rcpt

    async def legit_message(self) -> None:
        """One legitimate connection: `messages` messages, each timed from its MAIL (the
        first from the connect) to the reply after its final dot."""
        n = self.numbers["legit"]
        self.numbers["legit"] += 1
        knobs = self.profiles["legit"]
        self.open["legit"] += 1
        started = time.monotonic()
        writer = None
        record, data, rcpt = self.legit_record(n, 0)  # counted even if the connect fails
        try:
            reader, writer = await self.connect("legit", address("legit", self.index, n))
            client = Client(reader, writer, knobs["timeout"])
            code, text = await client.reply()
            if code == 220:
                code, text = await client.command(b"EHLO partner.example")
            messages = int(knobs["messages"])  # 0: one after another until the load ends
            for k in range(messages) if messages else itertools.count():
                if k and not messages and time.monotonic() >= self.end:
                    break
                if k:
                    record, data, rcpt = self.legit_record(n, k)
                    started = time.monotonic()
                for step in (f"MAIL FROM:<sender{n}@partner.example> SIZE={len(data)}",
                             f"RCPT TO:<{rcpt}>", "DATA"):
                    if code >= 400 or code == 0:
                        break
                    code, text = await client.command(step.encode())
                else:
                    code, text = await client.message(data)
                self.finish(record, code, text, started)
                if record["outcome"] != "accepted":
                    break
            if record["outcome"] == "accepted":
                await client.command(b"QUIT")
        except (Stalled, ConnectionError, OSError, asyncio.TimeoutError) as exc:
            if not record["outcome"]:
                self.finish(record, 0, f"{type(exc).__name__} {exc}".strip(), started)
        finally:
            if writer is not None:
                writer.close()
            self.open["legit"] -= 1

    def finish(self, record: dict, code: int, text: str, started: float) -> None:
        record["reply"] = text[:60]
        record["outcome"] = ("accepted" if 200 <= code < 300 else "deferred"
                             if 400 <= code < 500 else "refused" if code >= 500 else "failed")
        record["latency"] = round(time.monotonic() - started, 4)
        self.legit[record["outcome"]] += 1

    # -- the run
    async def ticker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.series.append({"t": self.rel(), "process": self.index, "open": dict(self.open),
                                "legit": dict(self.legit)})
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def repeat(self, profile: str) -> None:
        """A closed-loop client: one connection of the profile after another until the load
        ends (a refused connect waits a little, so a server that is down is not spun on)."""
        while time.monotonic() < self.end:
            if profile == "legit":
                await self.legit_message()
            else:
                await self.bot(profile)
                if self.bots[-1]["ended"] == "connect_failed":
                    await asyncio.sleep(0.1)

    def schedule(self) -> tuple[list[tuple[float, str, float | None]], float]:
        """This process's arrivals (seconds from the start, profile, hold or None for the
        profile's own) and the time the last phase ends."""
        loop = self.scenario.get("loop")
        if loop:  # this process's share of the clients, all at once
            return ([(0.0, loop["profile"], None)] * len(range(loop["clients"])[
                self.index::self.processes]), loop["duration"])
        if self.scenario.get("kind") == "replay":
            mine = self.scenario["arrivals"][self.index::self.processes]
            end = max((a[0] for a in self.scenario["arrivals"]), default=0.0)
            return [(due, profile, hold) for due, profile, hold in mine], end
        arrivals, offset = [], 0.0
        for phase in self.scenario["phases"]:
            for profile, rate in phase["rates"].items():
                rate /= self.processes
                if rate <= 0:
                    continue
                count = int(rate * phase["duration"])
                first = self.random.random() / rate
                arrivals += [(offset + first + i / rate, profile, None) for i in range(count)]
            offset += phase["duration"]
        return sorted(arrivals, key=lambda a: a[0]), offset

    async def run(self) -> None:
        # TERM (the bench past its time limit) ends the run; main() still writes the records.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM,
                                                      asyncio.current_task().cancel)
        await asyncio.sleep(max(0.0, self.t0 - time.time()))
        stop = asyncio.Event()
        ticker = asyncio.ensure_future(self.ticker(stop))
        tasks: list[asyncio.Task] = []
        start = time.monotonic()
        arrivals, end = self.schedule()
        self.end = start + end
        for due, profile, hold in arrivals:
            await asyncio.sleep(max(0.0, start + due - time.monotonic()))
            if self.scenario.get("loop"):
                coro = self.repeat(profile)
            elif profile == "legit":
                coro = self.legit_message()
            elif profile == "idle":
                self.idle_arrival(hold)
                continue
            else:
                coro = self.bot(profile, hold)
            tasks.append(asyncio.ensure_future(coro))
        await asyncio.sleep(max(0.0, start + end - time.monotonic()))
        drained = time.monotonic() + self.scenario["drain"]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=self.scenario["drain"])
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.idle_bots:
            self.idle_drained = asyncio.Event()
            try:
                async with asyncio.timeout(max(0.0, drained - time.monotonic())):
                    await self.idle_drained.wait()
            except TimeoutError:
                for bot in list(self.idle_bots):
                    bot.end("held")
        stop.set()
        await ticker


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as handle:
        spec = json.load(handle)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    generator = Generator(spec)
    try:
        asyncio.run(generator.run())
    except asyncio.CancelledError:  # TERM: what was done so far is written
        pass
    with open(out_path, "w") as handle:
        json.dump({"series": generator.series, "bots": generator.bots,
                   "messages": generator.messages}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
