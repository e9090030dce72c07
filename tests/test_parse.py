import pytest

from poolmgr.smtp.parse import (BadAddress, PathError, canonical, domain_of, mailhost_address,
                                parse_path, parse_xforward, split_mailbox, xtext_decode,
                                xtext_encode)


@pytest.mark.parametrize("arg,address,params", [
    ("FROM:<a@b.c>", "a@b.c", {}),
    ("from: <a@b.c> SIZE=10 body=8bitmime", "a@b.c", {"SIZE": "10", "BODY": "8bitmime"}),
    ("FROM:<>", "", {}),
    ("FROM:a@b.c", "a@b.c", {}),
    ("FROM:<@relay.example,@r2.example:a@b.c>", "a@b.c", {}),
    ("FROM:<a@b.c> SMTPUTF8", "a@b.c", {"SMTPUTF8": ""}),
])
def test_mail_paths(arg, address, params):
    assert parse_path(arg, "FROM") == (address, params)


@pytest.mark.parametrize("arg,kind", [("TO:<a@b>", "syntax"), ("FROM a@b", "syntax"),
                                      ("FROM:<a b@c>", "address"), ("FROM:<a@b@c>", "address")])
def test_bad_paths(arg, kind):
    with pytest.raises(PathError) as info:
        parse_path(arg, "FROM")
    assert info.value.kind == kind


def test_domain_of():
    assert domain_of("Bob@Example.TEST.") == "example.test"
    assert domain_of("postmaster") == ""


def test_xtext_round_trip():
    for text in ["plain", "a+b=c", "sp ace", "[UNAVAILABLE]"]:
        assert xtext_decode(xtext_encode(text)) == text
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"


def test_xforward_parsing():
    assert parse_xforward("NAME=x ADDR=127.0.0.2 helo=a+2Bb") == \
        {"NAME": "x", "ADDR": "127.0.0.2", "HELO": "a+b"}
    for bad in ["", "NAME", "COLOR=red"]:
        with pytest.raises(ValueError):
            parse_xforward(bad)


def test_xforward_addr_is_an_ip_address_as_postfix_takes_it():
    """Postfix's smtpd: IPv6 with `IPv6:` (any case; bare too, as poolmgr once sent it),
    v4-mapped as IPv4, [UNAVAILABLE] an unknown client (""), anything else `501 5.5.4 Bad ADDR
    syntax`; sent on with `IPv6:` again, which Postfix's smtpd requires."""
    assert parse_xforward("ADDR=IPv6:2001:db8::1")["ADDR"] == "2001:db8::1"
    assert parse_xforward("ADDR=IPV6:::1")["ADDR"] == "::1"
    assert parse_xforward("ADDR=2001:db8::1")["ADDR"] == "2001:db8::1"
    assert parse_xforward("ADDR=IPv6:::ffff:192.0.2.1")["ADDR"] == "192.0.2.1"
    assert parse_xforward("ADDR=[unavailable] NAME=x") == {"ADDR": "", "NAME": "x"}
    for bad in ["not-an-address", "IPv6:192.0.2.1", "[192.0.2.1]", "192.0.2.300", "IPv6:",
                "IPv6:fe80::1%eth0", "fe80::1%]x"]:
        with pytest.raises(BadAddress) as refused:
            parse_xforward(f"NAME=x ADDR={bad}")
        assert refused.value.args[0] == bad
    assert [mailhost_address(a) for a in ("2001:db8::1", "192.0.2.1", "")] == \
        ["IPv6:2001:db8::1", "192.0.2.1", ""]


@pytest.mark.parametrize("address, local, domain", [
    ("user@Example.TEST.", "user", "example.test"),
    ('"user@evil.test"@example.test', "user@evil.test", "example.test"),
    ('"a\\"b"@example.test', 'a"b', "example.test"),
    ("user%evil.test@example.test", "user%evil.test", "example.test"),
    ("evil.test!user@example.test", "evil.test!user", "example.test"),
    ("victim%evil.test", "victim%evil.test", ""),
    ("Postmaster", "Postmaster", ""),
    ("user@[192.0.2.1]", "user", "[192.0.2.1]"),
])
def test_split_mailbox_unquotes_and_normalises(address, local, domain):
    assert split_mailbox(address) == (local, domain)


def test_canonical_is_the_lookup_key():
    assert canonical("Bob@Example.TEST.") == "bob@example.test"
    assert canonical('"Bob"@example.test') == "bob@example.test"
    assert canonical("PostMaster") == "postmaster"


def test_xforward_values_with_control_characters_or_too_long_are_refused():
    for bad in ["IDENT=abc+0Adef", "HELO=a+0Db", "NAME=x+00", "NAME=" + "a" * 256]:
        with pytest.raises(ValueError):
            parse_xforward(bad)
    assert parse_xforward("NAME=" + "a" * 255)["NAME"] == "a" * 255


def test_received_header_takes_only_printable_helo_text():
    from poolmgr.smtp.headers import received

    header = received(helo="bad\x00helo\xff\r\n" + "x" * 3000, addr="192.0.2.1", by="mx",
                      software="poolmgr", proto="ESMTP", queue_id="Q", rcpts=["a@b.test"])
    assert header.isascii() and all(len(line) <= 998 for line in header.split(b"\r\n"))
    assert header.startswith(b"Received: from bad?helo???xxx")
