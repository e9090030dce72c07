"""The clamd check against a real clamd (Debian's clamav-daemon) with a local EICAR signature:
EICAR found in a base64 attachment and inside a zip, a clean message, clamd down, the
StreamMaxLength refusal, the host:port address; and the reply parser on its own."""

import base64
import io
import socket
import threading
import zipfile

import pytest

from poolmgr import config
from poolmgr.scanner.backends import clamd as clamd_backend
from poolmgr.scanner.backends.base import CheckFailed, Message, Result
from poolmgr.scanner.backends.builtin import EICAR
from poolmgr.testing import EICAR_NAME, Clamd, free_port

Backend = clamd_backend.Backend


@pytest.fixture(scope="module")
def clamd():
    with Clamd(tcp=True) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def small_clamd():
    with Clamd(tcp=True, stream_max_length="1K") as daemon:
        yield daemon


def backend(address: str, timeout: str = "10s") -> Backend:
    cfg = config.from_dict({"scanner": {"checks": ["clamd"],
                                        "clamd": {"address": address, "timeout": timeout}}})
    return Backend(cfg)


def message(data: bytes) -> Message:
    return Message(data=data, queue_id="Q", sender="a@x", rcpts=("b@y",),
                   client_addr="192.0.2.1", client_name="", helo="h")


def mime(attachment: bytes, filename: str, ctype: str = "application/octet-stream") -> bytes:
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (b"From: a@x\r\nTo: b@y\r\nSubject: attached\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="BOUNDARY"\r\n\r\n'
            b"--BOUNDARY\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n"
            b"--BOUNDARY\r\nContent-Type: " + ctype.encode() + b"\r\n"
            b"Content-Transfer-Encoding: base64\r\n"
            b'Content-Disposition: attachment; filename="' + filename.encode() + b'"\r\n\r\n'
            + encoded + b"--BOUNDARY--\r\n")


def plain(body: bytes = b"Hello.\r\n") -> bytes:
    return b"From: a@x\r\nTo: b@y\r\nSubject: hello\r\n\r\n" + body


def zipped(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return out.getvalue()


def test_eicar_in_a_base64_attachment_is_found_by_name(clamd):
    data = mime(EICAR, "eicar.com")
    assert EICAR not in data  # only clamd's MIME decoding can find it
    result = backend(clamd.address).check(message(data))
    assert result.check == "clamd"
    assert result.virus.startswith(EICAR_NAME)


def test_eicar_inside_a_zip_attachment_is_found(clamd):
    data = mime(zipped("readme.txt", b"padding\n" * 100 + EICAR), "files.zip",
                "application/zip")
    result = backend(clamd.address).check(message(data))
    assert result.virus.startswith(EICAR_NAME)


def test_a_plain_message_is_clean(clamd):
    assert backend(clamd.address).check(message(plain())) == Result("clamd")


def test_a_message_of_several_chunks_is_scanned_whole(clamd):
    # The EICAR string sits after the first chunk: all chunks reach clamd.
    data = mime(b"\0" * (3 * clamd_backend.CHUNK) + EICAR, "big.bin")
    assert backend(clamd.address).check(message(data)).virus.startswith(EICAR_NAME)
    big_clean = plain(b"x" * 70 + b"\r\n") * 3000
    assert backend(clamd.address).check(message(big_clean)) == Result("clamd")


def test_the_host_port_address(clamd):
    result = backend(clamd.tcp_address).check(message(mime(EICAR, "eicar.com")))
    assert result.virus.startswith(EICAR_NAME)
    assert backend(clamd.tcp_address).check(message(plain())) == Result("clamd")


def test_a_socket_that_does_not_exist_fails(tmp_path):
    with pytest.raises(CheckFailed) as failed:
        backend(f"unix:{tmp_path}/nothing.ctl").check(message(plain()))
    assert failed.value.check == "clamd"
    assert "No such file or directory" in failed.value.detail


def test_a_closed_port_fails():
    with pytest.raises(CheckFailed) as failed:
        backend(f"127.0.0.1:{free_port()}").check(message(plain()))
    assert "Connection refused" in failed.value.detail


@pytest.mark.parametrize("over_tcp", [False, True])
def test_over_stream_max_length_fails_naming_the_limit(small_clamd, over_tcp):
    check = backend(small_clamd.tcp_address if over_tcp else small_clamd.address)
    assert check.check(message(plain())) == Result("clamd")  # under 1K
    # One chunk; several (clamd answers and closes while more are sent).
    for size in (4 * 1024, 40 * clamd_backend.CHUNK):
        with pytest.raises(CheckFailed) as failed:
            check.check(message(plain(b"x" * size)))
        assert "StreamMaxLength" in failed.value.detail
        assert "size limit exceeded" in failed.value.detail


def silent_server(reply: bytes | None):
    """A daemon stand-in on a loopback port that reads the stream and answers `reply` (None: never
    answers). Returns (address, stop)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    done = threading.Event()

    def serve():
        conn, _ = listener.accept()
        with conn:
            received = b""
            while not received.endswith(b"\0\0\0\0") and not done.is_set():
                more = conn.recv(65536)
                if not more:
                    break
                received += more
            if reply is not None:
                conn.sendall(reply)
            else:
                done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop():
        done.set()
        thread.join(10)
        listener.close()

    return f"127.0.0.1:{listener.getsockname()[1]}", stop


def test_no_answer_within_the_timeout_fails():
    address, stop = silent_server(None)
    try:
        with pytest.raises(CheckFailed) as failed:
            backend(address, "1s").check(message(plain()))
        assert "no answer" in failed.value.detail and "1s" in failed.value.detail
    finally:
        stop()


@pytest.mark.parametrize("reply", [b"", b"hello\0", b"stream:  FOUND\0"])
def test_a_malformed_answer_fails(reply):
    address, stop = silent_server(reply)
    try:
        with pytest.raises(CheckFailed) as failed:
            backend(address).check(message(plain()))
        assert failed.value.detail.isprintable()
    finally:
        stop()


@pytest.mark.parametrize("reply, expected", [
    (b"stream: OK", Result("clamd")),
    (b"stream: Eicar-Test-Signature FOUND", Result("clamd", virus="Eicar-Test-Signature")),
])
def test_parse_reply(reply, expected):
    assert clamd_backend.parse_reply(reply) == expected


def test_parse_reply_errors_are_failures():
    with pytest.raises(CheckFailed, match="Can't allocate memory ERROR"):
        clamd_backend.parse_reply(b"Can't allocate memory ERROR")
    with pytest.raises(CheckFailed) as failed:
        clamd_backend.parse_reply(b"stream: \xff\x01 weird")
    assert failed.value.detail.isprintable()
