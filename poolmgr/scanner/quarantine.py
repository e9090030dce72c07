"""The quarantine: mail the scanner discarded or rejected, kept with an index (amavisd's
$QUARANTINEDIR), and what `poolmgr quarantine` does with it.

Each message is one file, `ID.eml`, written to a temporary name, synced and renamed (as a
maildir delivery), holding the data exactly as the scanner received it. The index, `index`, has
one JSON object per line: `{"id", "date", "time", "client", "sender", "recipients", "verdict",
"reason", "size", "queue_id"}` when a message is kept, and `{"id", "released", "date", "time"}`
when it was released. Appends are whole lines under an exclusive lock, so scanner workers never
interleave; purge rewrites the index under the same lock.

`release` re-injects a kept message to `scanner.next_hop` with its original envelope, or for
other recipients (amavisd-release's alternate recipients): the message as the scanner received
it, plus an `X-Poolmgr-Scan: released` line, bypassing the checks; it notes the release in the
index (`"to"`: the recipients it went to). `select` is what `quarantine list
--since/--reason` shows.
"""

__all__ = ["keep", "entries", "find", "read", "release", "purge", "as_dict", "Entry",
           "ReleaseError", "INDEX", "prepare", "select", "since"]

import email.utils
import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime

from .. import maildir
from ..config import parse_duration
from ..smtp import relay

INDEX = "index"
_ID = re.compile(r"[0-9A-Za-z-]{1,64}")


@dataclass
class Entry:
    id: str
    date: str
    time: float
    client: str
    sender: str
    recipients: list[str]
    verdict: str
    reason: str
    size: int
    queue_id: str
    released: list[str] = field(default_factory=list)  # dates of each release


def prepare(directory: str) -> list[str]:
    """Create the quarantine and its index; both, for the master to hand to the workers'
    user. Raises OSError."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    index = os.path.join(directory, INDEX)
    os.close(os.open(index, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    return [directory, index]


@contextmanager
def _locked_index(directory: str, mode: str):
    with open(os.path.join(directory, INDEX), mode, encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _append(directory: str, record: dict) -> None:
    with _locked_index(directory, "a") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def keep(directory: str, data: bytes, *, queue_id: str, client: str, sender: str,
         recipients: list[str], verdict: str, reason: str) -> str:
    """Store one message; its quarantine id. Raises OSError when it cannot be kept (the caller
    must then not discard the message)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    now = time.time()
    ident = f"{verdict.replace('_', '-')}-{queue_id}-{os.urandom(3).hex()}"
    maildir.write_synced(os.path.join(directory, f".{ident}.tmp"),
                         os.path.join(directory, f"{ident}.eml"), data)
    _append(directory, {"id": ident, "date": email.utils.formatdate(now, localtime=True),
                        "time": now, "client": client, "sender": sender,
                        "recipients": list(recipients), "verdict": verdict,
                        "reason": reason, "size": len(data), "queue_id": queue_id})
    return ident


def entries(directory: str) -> list[Entry]:
    """Every message still in the quarantine, oldest first, with its releases."""
    path = os.path.join(directory, INDEX)
    if not os.path.exists(path):
        return []
    kept: dict[str, Entry] = {}
    with _locked_index(directory, "r") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn line from a crash: the rest of the index still counts
            if "released" in record:
                if record.get("id") in kept:
                    kept[record["id"]].released.append(record["date"])
            elif isinstance(record, dict) and "id" in record:
                try:
                    kept[record["id"]] = Entry(**record)
                except TypeError:
                    continue
    return [e for e in kept.values()
            if os.path.exists(os.path.join(directory, f"{e.id}.eml"))]


def find(directory: str, ident: str) -> Entry | None:
    if not _ID.fullmatch(ident):
        return None
    return next((e for e in entries(directory) if e.id == ident), None)


def read(directory: str, entry: Entry) -> bytes:
    with open(os.path.join(directory, f"{entry.id}.eml"), "rb") as handle:
        return handle.read()


class ReleaseError(Exception):
    """The next hop did not take the released message; it stays in the quarantine."""


def release(cfg, entry: Entry, to: list[str] | None = None) -> str:
    """Re-inject `entry` to cfg.scanner.next_hop, for its own recipients or for `to`; the next
    hop's reply. ReleaseError when it is not accepted for every recipient."""
    recipients = list(to) if to else list(entry.recipients)
    scanner = cfg.scanner
    data = (f"X-Poolmgr-Scan: released from quarantine ({entry.id}) by poolmgr at "
            f"{scanner.hostname}\r\n").encode() + read(scanner.quarantine, entry)
    hop = scanner.next_hop
    if hop.kind == "maildir":
        try:
            name = maildir.deliver(hop.path, f"Return-Path: <{entry.sender}>\r\n".encode()
                                   + data)
        except OSError as exc:
            raise ReleaseError(f"maildir delivery to {hop.path} failed: {exc.strerror}") \
                from None
        result = f"delivered to maildir as {name}"
    else:
        outgoing = relay.Outgoing(entry.sender, recipients, data,
                                  smtputf8=not (entry.sender.isascii() and
                                                all(r.isascii() for r in recipients)),
                                  body_8bit=not data.isascii(),
                                  xforward={"IDENT": entry.queue_id, "SOURCE": "LOCAL"})
        try:
            replies = relay.send(hop, outgoing, helo=scanner.hostname, timeouts=cfg.timeouts,
                                 deadline=time.monotonic() + scanner.timeout)
        except relay.RelayError as exc:
            raise ReleaseError(f"next hop {hop} failed at {exc.stage}: {exc.detail}") from None
        refused = [f"<{r}>: {reply}" for r, reply in zip(recipients, replies)
                   if not reply.ok]
        if refused:
            raise ReleaseError(f"next hop {hop} refused " + "; ".join(refused))
        result = f"relay={hop}, {replies[0]}"
    mark_released(scanner.quarantine, entry, recipients)
    return result


def mark_released(directory: str, entry: Entry, to: list[str]) -> None:
    now = time.time()
    _append(directory, {"id": entry.id, "released": True, "to": list(to),
                        "date": email.utils.formatdate(now, localtime=True), "time": now})


def since(text: str, now: float | None = None) -> float:
    """`--since`: an age ("2h", "30m", "7d") or a local date and time ("2026-12-07",
    "2026-12-07T10:30", "2026-12-07 10:30:00") -> a time stamp. ValueError otherwise."""
    now = time.time() if now is None else now
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"--since: expected an age like 2h or a date like 2026-12-07 or "
                         f"2026-12-07T10:30, got {text!r}") from None


def select(kept: list[Entry], after: float | None = None, reason: str = "") -> list[Entry]:
    """The entries kept at or after `after`, whose verdict starts with `reason` (virus, banned,
    spam) or whose reason contains it (a virus or file name), case-insensitively."""
    wanted = reason.lower()
    return [e for e in kept if (after is None or e.time >= after) and
            (not wanted or e.verdict.lower().startswith(wanted) or wanted in e.reason.lower())]


def purge(directory: str, older_than: float, now: float | None = None) -> list[str]:
    """Remove messages kept more than `older_than` seconds ago; their ids."""
    now = time.time() if now is None else now
    path = os.path.join(directory, INDEX)
    if not os.path.exists(path):
        return []
    removed: list[str] = []
    with _locked_index(directory, "r+") as handle:
        lines = handle.readlines()
        keep_lines = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            ident = record.get("id", "")
            old = "released" not in record and now - record.get("time", now) > older_than
            if old and _ID.fullmatch(ident):
                try:
                    os.unlink(os.path.join(directory, f"{ident}.eml"))
                except FileNotFoundError:
                    pass
                removed.append(ident)
            elif ident not in removed:
                keep_lines.append(line)
        handle.seek(0)
        handle.writelines(keep_lines)
        handle.truncate()
    return removed


def as_dict(entry: Entry) -> dict:
    return asdict(entry)
