"""FTP URLs and replies mapped to asyncsat errors (pure functions of the FTP driver)."""

from __future__ import annotations

import pytest

from asyncsat.errors import AuthError, PermanentError, RetryableError, TransferError
from asyncsat.transfer.ftp import FtpTarget, error_for_reply, map_exceptions


@pytest.mark.parametrize(("url", "host", "port", "path", "tls"), [
    ("ftp://ftp.host/pub/a%20b/S3A%2B1.nc", "ftp.host", 21, "pub/a b/S3A+1.nc", "none"),
    ("ftp://ftp.host:2121/%2Fabs/x.nc;type=i", "ftp.host", 2121, "/abs/x.nc", "none"),
    ("ftps://ftp.host/x.nc", "ftp.host", 21, "x.nc", "explicit"),
    ("ftps://ftp.host:990/x.nc", "ftp.host", 990, "x.nc", "implicit"),
    ("FTP://[::1]/x.nc", "::1", 21, "x.nc", "none"),
])
def test_url_to_target(url: str, host: str, port: int, path: str, tls: str) -> None:
    target = FtpTarget.parse(url)
    assert (target.host, target.port, target.path, target.tls) == (host, port, path, tls)


def test_folder_urls() -> None:
    assert FtpTarget.parse("ftp://h/", folder=True).path == ""
    assert FtpTarget.parse("ftp://h/a/b/", folder=True).path == "a/b"
    assert FtpTarget.parse("ftp://h/%2F", folder=True).path == "/"
    with pytest.raises(PermanentError, match="names a directory"):
        FtpTarget.parse("ftp://h/a/b/")
    with pytest.raises(PermanentError, match="line break"):
        FtpTarget.parse("ftp://h/a%0D%0ADELE%20b")


def test_login_in_the_url_is_read_but_not_kept_in_the_path() -> None:
    target = FtpTarget.parse("ftp://bob:p%40ss@h/x.nc")
    assert (target.user, target.password, target.path) == ("bob", "p@ss", "x.nc")


@pytest.mark.parametrize(("code", "text", "kind", "throttled"), [
    ("421", "Too many connections from the same IP address.", RetryableError, True),
    ("421", "Too many connections (2) from this IP", RetryableError, True),
    ("421", "There are too many connections from your internet address.", RetryableError, True),
    ("530", "Sorry, the maximum number of clients (2) for this user are already connected.",
     RetryableError, True),
    ("421", "Service not available, closing control connection.", RetryableError, False),
    ("425", "Can't open data connection.", RetryableError, False),
    ("426", "Connection closed; transfer aborted.", RetryableError, False),
    ("450", "File unavailable.", RetryableError, False),
    ("451", "Local error in processing.", RetryableError, False),
    ("530", "Login incorrect.", AuthError, False),
    ("550", "No such file or directory.", PermanentError, False),
    ("500", "Syntax error.", PermanentError, False),
])
def test_reply_to_error(code: str, text: str, kind: type[TransferError],
                        throttled: bool) -> None:
    error = error_for_reply(code, text)
    assert type(error) is kind
    assert getattr(error, "throttled", False) is throttled
    assert code in error.message


def test_socket_errors_are_retryable_and_the_password_is_masked() -> None:
    with pytest.raises(RetryableError, match="timed out"), map_exceptions("pw-123"):
        raise TimeoutError
    with pytest.raises(RetryableError, match="closed the connection"), map_exceptions():
        raise ConnectionResetError
    with pytest.raises(AuthError) as caught, map_exceptions("pw-123"):
        raise AuthError("530 bad password pw-123 for bob")
    assert "pw-123" not in str(caught.value) and "***" in caught.value.message
