"""Header edits as a milter makes them (smtp/headers.py edit_fields, set_subject): removals by
instance, insertions by position, folded values, and a body that is never touched."""

from poolmgr.smtp.headers import Insertion, Removal, edit_fields, set_subject

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
    assert set_subject(b"From: a\r\n\r\n", "caf\u00e9").startswith("Subject: caf\u00e9\r\n".encode())
