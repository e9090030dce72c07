"""Trace headers: the Received: line each hop adds (RFC 5321 section 4.4), removing a header
field a client must not be able to forge, and the header edits a content check asks for
(removals and insertions by position, as a milter makes them; a new Subject).
"""

__all__ = ["received", "remove_fields", "header_section", "tag_subject", "message_id",
           "Removal", "Insertion", "edit_fields", "set_subject", "subject_of"]

import email.header
import email.utils
import functools
import re
import time
from dataclasses import dataclass

HELO_MAX = 255  # RFC 1035 section 2.3.4: a domain name has at most 255 octets
_SUBJECT = re.compile(rb"(?im)^subject[ \t]*:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)")
_SUBJECT_FIELD = re.compile(rb"(?im)^subject[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")
_MESSAGE_ID = re.compile(rb"(?im)^message-id[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)")


def received(*, helo: str | None, addr: str, by: str, software: str, proto: str,
             queue_id: str, rcpts: list[str], name: str = "unknown") -> bytes:
    """`Received: from helo (name [addr]) by host (software) with ESMTP id X for <r>; date`,
    `name` the client's forward-confirmed name, as Postfix's smtpd writes it."""
    literal = f"IPv6:{addr}" if ":" in addr else addr
    lines = [f"Received: from {_printable(helo or 'unknown')} ({_printable(name)} [{literal}])",
             f"\tby {by} ({software}) with {proto} id {queue_id}"]
    date = _date()
    if len(rcpts) == 1:
        lines.append(f"\tfor <{rcpts[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


_dated = [0, ""]  # the second of the last Received: date, and its text


def _date() -> str:
    """RFC 5322 date of now, made once a second (formatdate is slow for every message)."""
    now = int(time.time())
    if _dated[0] != now:
        _dated[:] = [now, email.utils.formatdate(now, localtime=True)]
    return _dated[1]


def _printable(text: str, limit: int = HELO_MAX) -> str:
    """Client text fit for a header: printable ASCII, at most `limit` characters, so the
    header line stays within RFC 5322's 998 octets whatever the client sent."""
    if text.isascii() and text.isprintable() and " " not in text:
        return text[:limit]
    return "".join(c if " " < c < "\x7f" else "?" for c in text[:limit])


def header_section(data: bytes) -> bytes:
    """The message's header fields, each line with its CRLF, without the blank line."""
    if data.startswith(b"\r\n"):
        return b""
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[:end + 2]


@functools.lru_cache(maxsize=16)
def _fields(names: tuple[str, ...]) -> re.Pattern:
    return re.compile(rb"(?im)^(?:" + b"|".join(re.escape(n.encode()) for n in names) +
                      rb")[ \t]*:")


def remove_fields(data: bytes, names: tuple[str, ...]) -> bytes:
    """`data` without any header field called one of `names` (any case, with its
    continuation lines), in one pass over the header; the body is never touched."""
    head = header_section(data)
    field = _fields(names)
    if not field.search(head):
        return data
    kept, dropping = [], False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = field.match(line) is not None
        if not dropping:
            kept.append(line)
    return b"".join(kept) + data[len(head):]


def tag_subject(data: bytes, tag: str) -> bytes:
    """`data` with `tag` in front of its Subject (amavisd's $sa_spam_subject_tag), once; a
    Subject: header is added when there is none. A tag that is not ASCII goes in front of the
    decoded Subject and the whole is encoded anew (RFC 2047)."""
    if not tag:
        return data
    if not tag.isascii():
        current = subject_of(data)
        return data if current.startswith(tag) else set_subject(data, tag + current)
    head = header_section(data)
    encoded = tag.encode("ascii")
    match = _SUBJECT.search(head)
    if match is None:
        return b"Subject: " + encoded.rstrip() + b"\r\n" + data
    at = match.start(1)  # the value, after the blanks that follow the colon
    if data[at:].startswith(encoded):
        return data
    return data[:at] + encoded + data[at:]


def subject_of(data: bytes) -> str:
    """The Subject field's value, unfolded and decoded (RFC 2047 encoded words; raw 8-bit
    text read as UTF-8), or "" when there is none."""
    match = _SUBJECT.search(header_section(data))
    if match is None:
        return ""
    raw = re.sub(r"\r\n(?=[ \t])", "", match.group(1).decode("utf-8", "replace")).strip()
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except Exception:  # a broken encoded word (HeaderParseError), an unknown charset...
        return raw


def message_id(data: bytes) -> str:
    """The Message-ID field's value, unfolded, or "" when there is none."""
    match = _MESSAGE_ID.search(header_section(data))
    if match is None:
        return ""
    return " ".join(match.group(1).decode("utf-8", "replace").split())


@dataclass(frozen=True)
class Removal:
    """Remove the `index`th field called `name` (any case): 1 the first, -1 the last, 0 every
    one (the milter protocol's smfi_chgheader with no value, as rspamd counts)."""
    name: str
    index: int = 0


@dataclass(frozen=True)
class Insertion:
    """Insert `name: value` before the field at `index` (0: at the top); a negative index counts
    from the end (-1: after the last field), None appends (smfi_insheader / smfi_addheader)."""
    name: str
    value: str
    index: int | None = None


_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 section 3.6.8: printable ASCII but ':'


def edit_fields(data: bytes, edits) -> bytes:
    """`data` with `edits` (Removal, Insertion) applied to its header fields one after the
    other, each counting positions on the fields as the edits before it left them; the body
    is never touched. An insertion whose name is not a field name is skipped."""
    if not edits:
        return data
    head = header_section(data)
    fields: list[bytes] = []  # one entry per field, continuation lines included
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    for edit in edits:
        if isinstance(edit, Removal):
            _remove(fields, edit)
        elif _FIELD_NAME.fullmatch(edit.name):
            field = f"{edit.name}: {_fold(edit.value)}\r\n".encode("utf-8", "surrogateescape")
            index = len(fields) if edit.index is None else \
                edit.index if edit.index >= 0 else max(0, len(fields) + edit.index + 1)
            fields.insert(min(index, len(fields)), field)
    return b"".join(fields) + data[len(head):]


def _remove(fields: list[bytes], edit: Removal) -> None:
    name = _fields((edit.name,))
    matching = [i for i, field in enumerate(fields) if name.match(field)]
    if edit.index == 0:
        chosen = matching
    elif 1 <= edit.index <= len(matching) or -len(matching) <= edit.index <= -1:
        chosen = [matching[edit.index - 1 if edit.index > 0 else edit.index]]
    else:
        chosen = []
    for i in reversed(chosen):
        del fields[i]


def _fold(value: str) -> str:
    """A field value fit for the header: its lines joined by CRLF, each continuation line
    starting with white space (a bare line break would start a field of its own)."""
    value = "".join(c if c >= " " or c in "\t\r\n" else "?" for c in value)
    lines = [line for line in re.split(r"\r\n|\r|\n", value.strip()) if line.strip()]
    return "\r\n".join(line if i == 0 or line[:1] in (" ", "\t") else "\t" + line
                        for i, line in enumerate(lines))


def set_subject(data: bytes, subject: str) -> bytes:
    """`data` with its (first) Subject field's value replaced by `subject`; a Subject: field
    is added at the top when there is none. A subject that is not ASCII (a spam_subject_tag
    that is not, in front of the decoded subject) is written as RFC 2047 encoded words: a
    header field must be ASCII unless the message travels with SMTPUTF8, and encoded words
    suit both. rspamd returns its rewritten subject encoded already."""
    value = _fold(subject)
    if not value.isascii():  # (a lone surrogate, which UTF-8 cannot carry, becomes "?")
        text = " ".join(value.split()).encode("utf-8", "replace").decode("utf-8")
        value = email.header.Header(text, "utf-8", header_name="Subject").encode(linesep="\r\n")
    head = header_section(data)
    match = _SUBJECT_FIELD.search(head)
    if match is None:
        return edit_fields(data, [Insertion("Subject", value, 0)])
    field = f"Subject: {value}\r\n".encode("ascii", "replace")
    return data[:match.start()] + field + data[match.end():]
