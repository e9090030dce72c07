"""Every SMTP reply poolmgr sends, as named constants with enhanced status codes.

The replies are declared as data in `replies.toml` beside this module (`R554_RELAY_DENIED =
"554 5.7.1 <{rcpt}>: Relay access denied"`) and become this module's `R###_...` constants
when it is imported. A constant's name starts with its reply code; a test checks this. Texts
follow Postfix's smtpd where Postfix has the reply. Replies that carry a value use `{}` fields,
filled with `Reply.format(...)`. Exception text is never sent to a client.

Exports: Reply, combine, and the R### constants.
"""

import re
import tomllib
from pathlib import Path
from typing import NamedTuple


_WIRE: dict = {}  # Reply: its bytes on the wire


class Reply(NamedTuple):
    code: int
    status: str  # enhanced status code (RFC 3463), "" where RFC 2034 has none (220, 354)
    text: str

    def format(self, **fields) -> "Reply":
        return self._replace(text=self.text.format(**fields))

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}" if self.status else f"{self.code} {self.text}"

    def encode(self) -> bytes:
        """The reply on the wire; a text of several lines ("\n") becomes `250-first`, ...,
        `250 last` (RFC 5321 section 4.2.1), the enhanced code on each line (RFC 2034).
        Kept once made: a session sends the same few replies again and again."""
        wire = _WIRE.get(self)
        if wire is None:
            if len(_WIRE) >= 1024:  # replies that carry a value come and go
                _WIRE.clear()
            wire = _WIRE[self] = self._wire()
        return wire

    def _wire(self) -> bytes:
        if "\n" not in self.text:
            return (str(self) + "\r\n").encode("utf-8", "surrogateescape")
        prefix = f"{self.code}-{self.status} " if self.status else f"{self.code}-"
        *lines, last = self.text.split("\n")
        text = "".join(f"{prefix}{line}\r\n" for line in lines) + str(self._replace(text=last))
        return (text + "\r\n").encode("utf-8", "surrogateescape")

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


def combine(replies: list[Reply]) -> Reply:
    """One reply for the client from per-recipient results downstream.

    All accepted -> the first 2xx. Any temporary failure -> that 4xx, so the sender retries
    (nothing is lost; accepted recipients may see a duplicate). All permanent -> the first 5xx.
    Accepted beside permanent rejects -> 2xx: the caller has already told the sender about
    the rejects with a delivery status notification (`smtp.dsn.settle`).
    """
    for wanted in (lambda r: r.temporary, lambda r: r.ok, lambda r: True):
        for reply in replies:
            if wanted(reply):
                return reply
    return _TABLE["R451_LOCAL_ERROR"]


def _parse(line: str) -> Reply:
    """"554 5.7.1 text" -> Reply(554, "5.7.1", "text"); "220 text" has no enhanced code."""
    code, _, rest = line.partition(" ")
    status, _, text = rest.partition(" ")
    if not re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status):
        status, text = "", rest
    return Reply(int(code), status, text)


with open(Path(__file__).with_name("replies.toml"), "rb") as _handle:
    _TABLE = {name: _parse(line) for name, line in tomllib.load(_handle).items()}
globals().update(_TABLE)


