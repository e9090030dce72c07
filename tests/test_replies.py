"""Meta-tests of the reply constants: names match codes, enhanced codes match classes, every
constant is sent by some module, and every reply a module or test names exists (a typo fails
here, not in front of a client)."""

import ast
import re
from pathlib import Path

from poolmgr.smtp import replies as R

ROOT = Path(__file__).resolve().parent.parent
REPLY_NAME = re.compile(r"R\d{3}_[A-Z0-9_]+")


def constants():
    return {name: value for name, value in vars(R).items() if isinstance(value, R.Reply)}


def test_names_carry_their_codes():
    for name, reply in constants().items():
        match = re.fullmatch(r"R(\d{3})_[A-Z0-9_]+", name)
        assert match, name
        assert int(match.group(1)) == reply.code, name


def test_enhanced_status_codes_match_the_reply_class():
    for name, reply in constants().items():
        if reply.status:
            assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", reply.status), name
            assert reply.status[0] == str(reply.code)[0], name
        else:
            assert reply.code in (220, 354), f"{name} needs an enhanced status code"


def names_used(path: Path) -> set[tuple[int, str]]:
    """(line, name) of every name a file reads from the replies module: `R.<NAME>` wherever the
    module is imported as R (or any alias), `from ...replies import NAME`, and any attribute
    that looks like a reply constant (`x.R550_...`), whatever it is read from."""
    tree = ast.parse(path.read_text())
    aliases, used = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name == "replies":
                    aliases.add(alias.asname or alias.name)
                elif (node.module or "").split(".")[-1] == "replies":
                    used.add((node.lineno, alias.name))
        elif isinstance(node, ast.Import):
            aliases |= {alias.asname for alias in node.names
                        if alias.name.endswith(".replies") and alias.asname}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (
                REPLY_NAME.fullmatch(node.attr)
                or isinstance(node.value, ast.Name) and node.value.id in aliases):
            used.add((node.lineno, node.attr))
    return used


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_every_reply_used_exists():
    missing = [f"{path.relative_to(ROOT)}:{line}: R.{name}"
               for path in sources("poolmgr", "tests") for line, name in names_used(path)
               if not hasattr(R, name)]
    assert missing == []


def test_every_reply_is_sent_by_some_module():
    replies_py = ROOT / "poolmgr/smtp/replies.py"
    used = {name for path in sources("poolmgr") if path != replies_py
            for _, name in names_used(path)}
    assert sorted(set(constants()) - used) == [], "replies no module sends: remove them"


def test_every_constant_is_exported():
    assert sorted(set(constants()) - set(R.__all__)) == []


def test_combine_never_hides_a_temporary_failure():
    ok, temp, perm = R.R250_OK, R.R451_LOCAL_ERROR, R.R554_VIRUS
    assert R.combine([ok, ok]) is ok
    assert R.combine([ok, temp]) is temp
    assert R.combine([perm, temp]) is temp
    assert R.combine([perm, perm]) is perm
    assert R.combine([ok, perm]) is ok


def test_encoding():
    assert R.R554_RELAY_DENIED.format(rcpt="a@b").encode() == \
        b"554 5.7.1 <a@b>: Relay access denied\r\n"
    assert R.R354_DATA.encode() == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert R.Reply(250, "", "mx\nPIPELINING\nSIZE 10").encode() == \
        b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
    assert R.Reply(550, "5.7.1", "first\nsecond").encode() == \
        b"550-5.7.1 first\r\n550 5.7.1 second\r\n"
