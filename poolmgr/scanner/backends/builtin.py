"""The built-in check (`builtin` in scanner.checks): configured header/body rules and the EICAR
test string.

The message is parsed with the standard library's `email` package, so the EICAR string is
found in base64 or quoted-printable attachments too, as a virus scanner would find it; a message
with no such part and no rules to check is searched as it is, without parsing. A hit on EICAR
is a virus; a rule with action reject names itself in `Result.rule`, a rule with action tag in
`Result.tests`. A message whose multiparts nest deeper than Postfix's mime_nesting_limit
(base.MIME_NESTING_LIMIT) cannot be looked into: it is banned contents, `MIME nesting exceeds
safety limit`.
"""

__all__ = ["Backend", "EICAR", "EICAR_NAME", "scan"]

import re

from ...smtp.relay import PRECHECK_MAX
from .base import Check, Message, Result, TooDeep, leaf_parts

# The EICAR anti-virus test file (https://www.eicar.org/download-anti-malware-testfile/).
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


EICAR_NAME = "Eicar-Test-Signature"  # as ClamAV names it


class Backend(Check):
    name = "builtin"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.rules = cfg.scanner.rules
        self.eicar = cfg.scanner.eicar

    def check(self, message: Message) -> Result:
        return scan(message.data, self.rules, self.eicar)


def _bodies(parts) -> list[bytes]:
    out = []
    for part in parts:
        try:
            payload = part.get_payload(decode=True)
        except Exception:  # a broken encoding is content, not a scanner failure
            payload = None
        if payload:
            out.append(payload)
    return out


# Only an encoded part (base64, quoted-printable) can hide the EICAR string from a plain search.
_ENCODED = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:\s*(?:base64|quoted-printable)")


def _encoded(data: bytes) -> bool:
    """Whether a part is base64 or quoted-printable; the regex runs only where those words
    are (a tenth of its cost on a message that has none)."""
    if len(data) <= PRECHECK_MAX:  # above, the lowercase copy would cost more than it saves
        lowered = data.lower()
        if b"base64" not in lowered and b"quoted-printable" not in lowered:
            return False
    return _ENCODED.search(data) is not None


def scan(data: bytes, rules, eicar: bool) -> Result:
    if eicar and EICAR in data:
        return Result("builtin", virus=EICAR_NAME)
    if not rules and not (eicar and _encoded(data)):
        return Result("builtin")  # nothing needs the MIME structure: skip parsing it
    try:
        message, parts = leaf_parts(data)
    except TooDeep as exc:  # its parts cannot be looked into: banned, as Postfix rejects it
        return Result("builtin", banned=str(exc))
    bodies = None
    if eicar:
        bodies = _bodies(parts)
        if any(EICAR in body for body in bodies):
            return Result("builtin", virus=EICAR_NAME)
    tagged = []
    for rule in rules:
        if rule["header"]:
            texts = [str(v) for v in message.get_all(rule["header"], [])]
        else:
            if bodies is None:
                bodies = _bodies(parts)
            texts = [b.decode("utf-8", "replace") for b in bodies]
        if any(rule["pattern"].search(text) for text in texts):
            if rule["action"] == "reject":
                return Result("builtin", rule=rule["name"], tests=tuple(tagged))
            tagged.append(rule["name"])
    return Result("builtin", tests=tuple(tagged))
