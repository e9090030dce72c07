"""Parsing of SMTP command arguments: MAIL/RCPT paths and parameters, XFORWARD xtext.
"""

__all__ = ["parse_path", "PathError", "valid_address", "split_mailbox", "domain_of", "canonical",
           "xtext_encode", "xtext_decode", "parse_xforward", "BadAddress", "forwarded_address",
           "mailhost_address", "new_queue_id"]

import ipaddress
import os
import re

# RFC 5321 section 4.1.2: "FROM:" / "TO:" then a path in angle brackets. Postfix (and most
# MTAs) also accept a space after the colon and a bare address without brackets.
_PATH = re.compile(r"(?i)(FROM|TO):\s*(<[^<>]*>|[^<>\s]+)(.*)")
_SOURCE_ROUTE = re.compile(r"^@[^:]+:")


class PathError(ValueError):
    """The argument is not a valid path; `kind` is "syntax" or "address"."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def parse_path(arg: str, keyword: str) -> tuple[str, dict[str, str]]:
    """'FROM:<a@b> SIZE=10' -> ('a@b', {'SIZE': '10'}); raises PathError."""
    match = _PATH.fullmatch(arg.strip())
    if not match or match.group(1).upper() != keyword:
        raise PathError("syntax")
    address = match.group(2)
    if address.startswith("<"):
        address = address[1:-1]
    address = _SOURCE_ROUTE.sub("", address)  # RFC 5321 section 4.1.1.3: ignore source routes
    if any(c in address for c in " \t\r\n") or address.count("@") > 1 and '"' not in address:
        raise PathError("address")
    params: dict[str, str] = {}
    for word in match.group(3).split():
        key, _, value = word.partition("=")
        params[key.upper()] = value
    return address, params


def valid_address(address: str) -> bool:
    """An address a command line or a setting may give for RCPT TO: what parse_path reads back
    unchanged, printable, without brackets (nothing that could end the command early)."""
    if not address or not address.isprintable() or any(c in address for c in "<>"):
        return False
    try:
        return parse_path(f"TO:<{address}>", "TO")[0] == address
    except PathError:
        return False


def split_mailbox(address: str) -> tuple[str, str]:
    """(local part, domain) of a mailbox: the local part unquoted (RFC 5321 section 4.1.2
    quoted-string: `"a@b"@c` has the local part `a@b`), the domain lower-cased without a
    trailing dot; "" when there is no domain. The normal form for every rule about
    recipients: relay control and the recipient table see the same address."""
    at, quoted, escaped = -1, False, False
    for index, char in enumerate(address):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "@" and not quoted:
            at = index
    local, domain = (address, "") if at < 0 else (address[:at], address[at + 1:])
    if local.startswith('"') and local.endswith('"') and len(local) > 1:
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local, domain.lower().rstrip(".")


def domain_of(address: str) -> str:
    return split_mailbox(address)[1]


def canonical(address: str) -> str:
    """`local@domain` in lower case, unquoted, without a trailing dot: the lookup key."""
    local, domain = split_mailbox(address)
    return f"{local}@{domain}".lower() if domain else local.lower()


_XTEXT_PLAIN = re.compile(r"[!-*,-<>-~]*\Z")  # printable ASCII but "+" and "="


def xtext_encode(value: str) -> str:
    """RFC 3461 section 4 xtext, as XFORWARD uses it."""
    if _XTEXT_PLAIN.match(value):
        return value
    out = []
    for byte in value.encode("utf-8", "surrogateescape"):
        if 33 <= byte <= 126 and byte not in (ord("+"), ord("=")):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")


def xtext_decode(value: str) -> str:
    if "+" not in value:
        return value
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)


XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
XFORWARD_MAX = 255  # Postfix's xforward attribute values: a hostname or an address at most
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadAddress(ValueError):
    """An XFORWARD ADDR that is not an IP address (Postfix's smtpd: `501 5.5.4 Bad ADDR
    syntax`); args[0] the value."""


def forwarded_address(value: str) -> str:
    """ADDR as Postfix's smtpd takes it (normalize_mailhost_addr), as a bare address: an IPv4
    address, or an IPv6 one with its `IPv6:` prefix (any case; also without it, as poolmgr's
    SMTP pool once sent it), an IPv4-mapped one as the IPv4 address; "" for [UNAVAILABLE],
    any case (XFORWARD_README's forwarded local submission: the client is unknown).
    BadAddress for anything else. `mailhost_address` gives it back the way Postfix wants it."""
    if value.upper() == "[UNAVAILABLE]":
        return ""
    prefixed = value[:5].lower() == "ipv6:"
    plain = value[5:] if prefixed else value
    try:
        address = ipaddress.ip_address(plain)
    except ValueError:
        raise BadAddress(value) from None
    if address.version == 6 and (address.scope_id or address.ipv4_mapped):
        if address.scope_id:  # fe80::1%eth0: no scope outside the host
            raise BadAddress(value)
        return str(address.ipv4_mapped)
    if prefixed and address.version != 6:
        raise BadAddress(value)
    return plain


def mailhost_address(address: str) -> str:
    """XFORWARD ADDR's value for a bare address, as Postfix's smtp client sends it and its
    smtpd requires it (RFC 5321's address literal without brackets): `IPv6:` before an IPv6
    address; "" (sent as [UNAVAILABLE]) stays ""."""
    return f"IPv6:{address}" if ":" in address else address


def parse_xforward(arg: str) -> dict[str, str]:
    """'NAME=x ADDR=1.2.3.4' -> {'NAME': 'x', 'ADDR': '1.2.3.4'}; ValueError on bad syntax,
    BadAddress for an ADDR that is not an IP address; ADDR bare (`forwarded_address`), ""
    when it was [UNAVAILABLE]."""
    attrs = {}
    words = arg.split()
    if not words:
        raise ValueError("empty")
    # A control character would end up in a Received: header and the log: one look at all
    # the words, and another at each value that xtext decoding changed.
    if _CONTROL.search("".join(words)):
        raise ValueError(arg)
    for word in words:
        key, eq, value = word.partition("=")
        key = key.upper()
        if not eq or key not in XFORWARD_ATTRS:
            raise ValueError(word)
        if "+" in value:
            value = xtext_decode(value)
            if _CONTROL.search(value):
                raise ValueError(word)
        if len(value) > XFORWARD_MAX:
            raise ValueError(word)
        attrs[key] = forwarded_address(value) if key == "ADDR" else value
    return attrs


def new_queue_id() -> str:
    """A Postfix-looking short queue id: 10 upper-case hex digits."""
    return os.urandom(5).hex().upper()
