"""Header edits as a milter makes them (smtp/headers.py edit_fields, set_subject): removals by
instance, insertions by position, folded values, and a body that is never touched."""

from poolmgr.smtp.headers import (Insertion, Removal, edit_fields, set_subject, subject_of,
                                  tag_subject)

MESSAGE = (b"Received: from a\r\n\tby b\r\nX-Tag: one\r\nSubject: hello\r\n there\r\n"
           b"x-tag: two\r\nX-Tag: three\r\n\r\nX-Tag: in the body\r\n")


def names(data: bytes) -> list[str]:
    head = data.split(b"\r\n\r\n")[0].decode()
    return [line.split(":")[0] for line in head.split("\r\n") if line[:1] not in " \t"]


def test_removals_count_instances_of_one_name():
    assert b"one" not in edit_fields(MESSAGE, [Removal("X-TAG", 1)])
    last = edit_fields(MESSAGE, [Removal("X-Tag", -1)])
    assert b"three" not in last and b"two" in last
    every = edit_fields(MESSAGE, [Removal("x-tag", 0)])
    assert names(every) == ["Received", "Subject"]
    assert every.endswith(b"\r\n\r\nX-Tag: in the body\r\n")  # the body is never touched
    assert edit_fields(MESSAGE, [Removal("X-Tag", 4), Removal("X-Tag", -4),
                                 Removal("Other", 0)]) == MESSAGE
    assert b"by b" not in edit_fields(MESSAGE, [Removal("Received", 1)])  # with its folds


def test_insertions_by_position():
    edited = edit_fields(MESSAGE, [Insertion("A", "top", 0), Insertion("B", "end"),
                                   Insertion("C", "second", 1), Insertion("D", "last", -1),
                                   Insertion("E", "before last", -2),
                                   Insertion("F", "far", -100), Insertion("G", "far", 100)])
    assert names(edited) == ["F", "A", "C", "Received", "X-Tag", "Subject", "x-tag", "X-Tag",
                             "B", "E", "D", "G"]


def test_values_are_folded_and_bad_names_skipped():
    edited = edit_fields(MESSAGE, [Insertion("X-R", "a;\r\n\tb;\nc\r\n", 0),
                                   Insertion("Bad Name", "x", 0), Insertion("X-N", "a\x00b", 0)])
    assert edited.startswith(b"X-N: a?b\r\nX-R: a;\r\n\tb;\r\n\tc\r\nReceived:")
    assert edit_fields(MESSAGE, []) is MESSAGE


def test_a_message_without_header_fields():
    assert edit_fields(b"\r\nbody\r\n", [Insertion("X", "y")]) == b"X: y\r\n\r\nbody\r\n"


def test_set_subject_replaces_the_first_subject_with_its_folds():
    assert set_subject(MESSAGE, "[SPAM] hello there") == MESSAGE.replace(
        b"Subject: hello\r\n there\r\n", b"Subject: [SPAM] hello there\r\n")
    assert set_subject(b"From: a\r\n\r\nbody", "new") == b"Subject: new\r\nFrom: a\r\n\r\nbody"


def test_a_subject_that_is_not_ascii_is_written_as_encoded_words():
    """A new subject that is not ASCII goes in as RFC 2047 encoded words, folded, never as
    raw 8-bit text in a message that may not travel with SMTPUTF8."""
    assert set_subject(b"From: a\r\n\r\n", "caf\u00e9") == \
        b"Subject: =?utf-8?b?Y2Fmw6k=?=\r\nFrom: a\r\n\r\n"
    long = "[SPAM] Gr\u00fc\u00dfe aus Berlin " + "x" * 80
    edited = set_subject(MESSAGE, long)
    field = edited.split(b"\r\n\r\n")[0].split(b"Subject: ")[1].split(b"\r\nFrom")[0]
    assert field.isascii() and all(len(line) <= 78 for line in field.split(b"\r\n"))
    assert subject_of(edited) == long


def test_subject_of_decodes_encoded_words_and_folds():
    assert subject_of(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus\r\n Berlin\r\n\r\n") == \
        "Gr\u00fc\u00dfe aus Berlin"
    assert subject_of("Subject: caf\u00e9\r\n\r\n".encode()) == "caf\u00e9"  # raw UTF-8
    assert subject_of(b"Subject: =?x-unknown?q?abc?=\r\n\r\n") == "=?x-unknown?q?abc?="
    assert subject_of(b"From: a\r\n\r\nSubject: in the body\r\n") == ""
    assert subject_of(b"Subject: =?utf-8?b?4?=\r\n\r\n") == "=?utf-8?b?4?="  # bad base64


def test_a_subject_tag_that_is_not_ascii_is_encoded_with_the_subject_once():
    message = b"From: a\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nbody\r\n"
    tagged = tag_subject(message, "[\u0421\u041f\u0410\u041c] ")
    assert subject_of(tagged) == "[\u0421\u041f\u0410\u041c] Gr\u00fc\u00dfe"
    assert tagged.split(b"\r\n\r\n")[0].isascii()
    assert tag_subject(tagged, "[\u0421\u041f\u0410\u041c] ") == tagged  # once
    broken = tag_subject(b"Subject: =?utf-8?b?4?=\r\n\r\n", "[\u0421\u041f\u0410\u041c] ")
    assert subject_of(broken) == "[\u0421\u041f\u0410\u041c] =?utf-8?b?4?="
    bare = tag_subject(b"From: a\r\n\r\nbody\r\n", "[\u0421\u041f\u0410\u041c] ")
    assert bare.startswith(b"Subject: =?utf-8?")
    assert subject_of(bare) == "[\u0421\u041f\u0410\u041c]"
    # An ASCII tag leaves the field's bytes as they were (a DKIM signature may cover them).
    assert tag_subject(message, "***Spam*** ") == message.replace(b"Subject: ",
                                                                  b"Subject: ***Spam*** ")
