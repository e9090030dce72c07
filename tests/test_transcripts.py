"""SMTP transcripts kept as data (tests/transcripts/*.txt), replayed against a real poolmgr.

Format: `C: line` is sent with CRLF appended (Python escapes such as \\n and \\x41 are decoded,
so a bare LF can be written); consecutive C lines go out in one write (pipelining);
`S: 250 2.1.5 text` reads one whole reply and checks its code and the start of its last line;
`E:` expects the server to close; `# from: 127.x.y.z` picks the client's source address.
"""

import codecs
from pathlib import Path

import pytest

from helpers import Raw

TRANSCRIPTS = sorted((Path(__file__).parent / "transcripts").glob("*.txt"))


def parse(path: Path):
    source, steps = "127.0.0.1", []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("# from:"):
            source = raw.split(":", 1)[1].strip()
        elif raw.startswith("#") or not raw.strip():
            continue
        else:
            kind, _, text = raw.partition(":")
            steps.append((kind, text[1:] if text.startswith(" ") else text))
    return source, steps


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(shared_poolmgr, path):
    source, steps = parse(path)
    client = Raw(shared_poolmgr.smtp_port, source)
    pending = b""
    try:
        for number, (kind, text) in enumerate(steps, 1):
            if kind == "C":
                pending += codecs.escape_decode(text.encode("utf-8"))[0] + b"\r\n"
                continue
            if pending:
                client.send(pending)
                pending = b""
            if kind == "S":
                code, lines = client.reply()
                expected_code, _, rest = text.partition(" ")
                assert code == int(expected_code), f"step {number}: {lines} != {text!r}"
                if rest:
                    assert lines[-1][4:].startswith(rest), f"step {number}: {lines} != {text!r}"
            elif kind == "E":
                assert client.closed(), f"step {number}: connection still open"
            else:
                raise AssertionError(f"{path.name}: unknown step {kind!r}")
    finally:
        client.close()


def test_transcripts_are_present():
    assert len(TRANSCRIPTS) >= 10
