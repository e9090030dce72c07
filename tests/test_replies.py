"""Meta-tests of the reply table: names match codes, enhanced codes match classes."""

import re

from poolmgr.smtp import replies as R


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
