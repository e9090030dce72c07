"""Banned contents (amavisd's $banned_filename_re, `scanner.banned_filenames`): MIME parts, and
the members of zip archives attached, whose file name, declared type or file type a configured
pattern matches.

Each part is described as amavisd describes it, by its declared MIME type, its file types from
its first bytes (a few, with amavisd's file(1) short names: `.exe` and `.exe-ms` for a Windows
program, `.zip`, `.pdf`, ...) and its file name: `application/octet-stream,.exe,.exe-ms,
invoice.pdf.exe`. Every pattern is matched against each of these on its own, so one list holds
name rules (`\\.exe$`), type rules (`^application/x-msdownload$`) and content rules
(`^\\.exe-ms$`). `find` returns the first banned part with the path down to it, as amavisd's
log line shows it: `multipart/mixed | application/zip,.zip,files.zip | .exe,.exe-ms,a.exe`.
"""

__all__ = ["Banned", "find", "describe", "file_types", "MAX_MEMBERS"]

import email.errors
import email.header
import email.utils
import io
import zipfile
from dataclasses import dataclass

from .backends.base import TooDeep, leaf_parts

# (first bytes, file types) as amavisd names what file(1) says of them; only what a banned rule
# is commonly written for.
MAGIC = ((b"MZ", (".exe", ".exe-ms")),
         (b"\x7fELF", (".elf",)),
         (b"PK\x03\x04", (".zip",)),
         (b"Rar!\x1a\x07", (".rar",)),
         (b"7z\xbc\xaf\x27\x1c", (".7z",)),
         (b"%PDF-", (".pdf",)),
         (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", (".doc",)))  # OLE2: MS Office 97-2003
MAX_MEMBERS = 1000  # members of one zip archive whose first bytes are read; every member's
# name is matched (the directory is parsed already), the rest by their names alone


@dataclass(frozen=True)
class Banned:
    part: str   # the banned part: "application/octet-stream,.exe,.exe-ms,a.pdf.exe"
    path: str   # from the message's top down to it, " | " between levels (amavisd's log)


def file_types(head: bytes) -> tuple[str, ...]:
    """amavisd's short file(1) types of content starting with `head`."""
    return next((types for magic, types in MAGIC if head.startswith(magic)), ())


def describe(declared: str, types: tuple[str, ...], name: str) -> str:
    return ",".join(p for p in (declared, *types, name) if p)


def _name(part) -> str:
    """The part's file name: Content-Disposition's filename or Content-Type's name, RFC 2231
    and RFC 2047 encodings decoded."""
    raw = part.get_filename() or part.get_param("name") or ""
    if isinstance(raw, tuple):  # RFC 2231 value get_param did not collapse
        raw = email.utils.collapse_rfc2231_value(raw)
    try:
        name = str(email.header.make_header(email.header.decode_header(str(raw))))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        # a broken encoded word is content, not a failure: the name as it was written
        name = str(raw)
    return _visible(name)


def _visible(name: str) -> str:
    """No control characters (a line break in a name would forge a log line)."""
    return "".join("?" if ord(c) < 0x20 or ord(c) == 0x7f else c for c in name)


def _matches(patterns, declared: str, types: tuple[str, ...], name: str) -> bool:
    return any(p.search(value) for value in (declared, *types, name) if value
               for p in patterns)


def _members(payload: bytes):
    """(name, file types) of the members of a zip archive; nothing when it is not one or
    cannot be read (the archive is then judged by its own name and type). A member that
    cannot be read (encrypted, damaged, an unknown method) is judged by its name alone."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
    except Exception:  # not a zip, or one zipfile cannot read (a version it does not know...)
        return
    with archive:
        for number, info in enumerate(archive.infolist()):
            if info.is_dir():
                continue
            head = b""
            if number < MAX_MEMBERS:
                # A damaged member (zlib.error, BadZipFile, NotImplementedError...) is
                # content, not a scanner failure: it keeps no file type.
                try:
                    with archive.open(info) as member:
                        head = member.read(8)
                except Exception:
                    head = b""
            yield _visible(info.filename.rsplit("/", 1)[-1]), file_types(head)


def find(data: bytes, patterns) -> Banned | None:
    """The first part of the message `data` that a pattern matches, or None."""
    if not patterns:
        return None
    try:
        message, parts = leaf_parts(data)
    except TooDeep as exc:  # the parts cannot be looked into: the message is banned
        return Banned(str(exc), str(exc))
    top = message.get_content_type() if message.is_multipart() else ""
    for part in parts:
        declared, name = part.get_content_type(), _name(part)
        try:
            payload = part.get_payload(decode=True) or b""
        except Exception:  # a broken encoding is content, not a scanner failure
            payload = b""
        types = file_types(payload[:8])
        here = describe(declared, types, name)
        path = f"{top} | {here}" if top else here
        if _matches(patterns, declared, types, name):
            return Banned(here, path)
        if ".zip" in types:
            for member, member_types in _members(payload):
                if _matches(patterns, "", member_types, member):
                    inside = describe("", member_types, member)
                    return Banned(inside, f"{path} | {inside}")
    return None
