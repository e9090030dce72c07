"""The built-in content check: configured header/body rules and the EICAR test string.

`scan` parses the message with the standard library's `email` package, so the EICAR string is
found in base64 or quoted-printable attachments too, as a virus scanner would find it.

Exports: scan, Verdict, EICAR.
"""

import email
import email.policy
from typing import NamedTuple

from ..smtp import replies as R

# The EICAR anti-virus test file (https://www.eicar.org/download-anti-malware-testfile/).
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


class Verdict(NamedTuple):
    result: str           # clean, tagged or rejected
    reason: str           # rule name or virus name, "" when clean
    reply: R.Reply | None  # the rejection, when rejected


CLEAN = Verdict("clean", "", None)


def _parts(message) -> list[bytes]:
    out = []
    for part in message.walk():
        if part.is_multipart():
            continue
        try:
            payload = part.get_payload(decode=True)
        except Exception:  # a broken encoding is content, not a scanner failure
            payload = None
        if payload:
            out.append(payload)
    return out


def scan(data: bytes, rules, eicar: bool) -> Verdict:
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    bodies = None
    if eicar:
        bodies = _parts(message)
        if EICAR in data or any(EICAR in body for body in bodies):
            return Verdict("rejected", "Eicar-Test-Signature",
                           R.R554_VIRUS.format(name="Eicar-Test-Signature"))
    tagged = []
    for rule in rules:
        if rule["header"]:
            texts = [str(v) for v in message.get_all(rule["header"], [])]
        else:
            if bodies is None:
                bodies = _parts(message)
            texts = [b.decode("utf-8", "replace") for b in bodies]
        if any(rule["pattern"].search(text) for text in texts):
            if rule["action"] == "reject":
                return Verdict("rejected", rule["name"],
                               R.R554_CONTENT_RULE.format(name=rule["name"]))
            tagged.append(rule["name"])
    if tagged:
        return Verdict("tagged", ",".join(tagged), None)
    return CLEAN
