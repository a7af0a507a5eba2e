"""Pure parts: retry decisions, names, payload checks, checksums, redaction."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from asyncsat import checksums
from asyncsat.errors import (
    AuthError,
    ChecksumError,
    DiskFullError,
    OfflineError,
    PayloadError,
    PermanentError,
    RetryableError,
    SizeError,
    UsageError,
)
from asyncsat.logs import Redactor
from asyncsat.models import Provider
from asyncsat.naming import (
    implicit_provider_name,
    name_from_content_disposition,
    name_from_url,
    sanitize,
    split_login,
)
from asyncsat.retry import Policy, backoff, decide
from asyncsat.transfer import payload

POLICY = Policy(max_attempts=5, backoff_initial=1.0, backoff_max=60.0)


def test_transient_errors_are_retried_until_the_budget_is_spent() -> None:
    err = RetryableError("reset")
    assert decide(err, 0, False, POLICY).action == "retry"
    assert decide(err, 3, False, POLICY).action == "retry"
    assert decide(err, 4, False, POLICY).action == "fail"


def test_progress_resets_the_budget_but_verification_failures_do_not() -> None:
    assert decide(RetryableError("reset"), 4, True, POLICY).failures == 0
    assert decide(SizeError("short"), 4, True, POLICY).action == "fail"


def test_a_refused_login_gets_one_retry() -> None:
    assert decide(AuthError("HTTP 401"), 0, False, POLICY).action == "retry"
    assert decide(AuthError("HTTP 401"), 1, False, POLICY).action == "fail"


def test_the_same_wrong_file_twice_is_bad_at_the_source() -> None:
    wrong = ChecksumError("md5 mismatch", evidence="md5:aa")
    first = decide(wrong, 0, False, POLICY)
    assert first.action == "retry" and not first.bad_at_source
    again = decide(wrong, 1, False, POLICY, repeated=True)
    assert again.action == "fail" and again.bad_at_source
    # other wrong digests each time: a flaky path, retried within the budget
    assert decide(wrong, 3, False, POLICY).action == "retry"
    assert decide(wrong, POLICY.max_attempts - 1, False, POLICY).action == "fail"
    assert decide(SizeError("size", evidence="size:1"), 1, False, POLICY,
                  repeated=True).bad_at_source


def test_permanent_and_offline() -> None:
    assert decide(PermanentError("404"), 0, False, POLICY).action == "fail"
    assert decide(OfflineError("lta"), 0, False, POLICY).action == "offline"


def test_throttling_never_uses_the_budget_and_honours_retry_after() -> None:
    d = decide(RetryableError("429", retry_after=120, throttled=True), 4, False, POLICY)
    assert d.action == "retry" and d.failures == 4 and d.delay >= 120


def test_a_full_disk_never_uses_the_budget_and_waits_longer_each_try() -> None:
    """Each try is a request to the provider: a disk full for hours must not mean one
    every second or two (it was `backoff(1)` at every try)."""
    full = DiskFullError("no space left to write x.part")
    first = decide(full, 2, True, POLICY, tries=1)
    later = decide(full, 2, True, POLICY, tries=8)
    assert first.action == later.action == "retry" and first.failures == later.failures == 2
    assert first.delay <= 2.0 and later.delay == POLICY.backoff_max


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    assert 1.0 <= backoff(1, POLICY) <= 2.0
    assert 8.0 <= backoff(4, POLICY) <= 9.0
    assert backoff(30, POLICY) == 60.0


def test_policy_reads_provider_settings() -> None:
    p = Provider(1, "x", "http", None, {"max_attempts": 9, "backoff_max": 5})
    assert Policy.for_provider(p) == Policy(9, 1.0, 5.0)


@pytest.mark.parametrize(("raw", "expected"), [
    ("../../etc/passwd", "passwd"),
    ("..", ""),
    ("a/b\\c.zip", "c.zip"),
    ("S2A:MSI*?.zip", "S2A_MSI_.zip"),
    ("name\x00.zip", "name_.zip"),
    (" .hidden. ", "hidden"),
])
def test_sanitize_never_escapes_the_folder(raw: str, expected: str) -> None:
    assert sanitize(raw) == expected


def test_names_from_urls_and_headers() -> None:
    assert name_from_url("https://h/a/S2A%20X.zip?x=1") == "S2A X.zip"
    assert name_from_url("https://h/a/%2e%2e%2fetc%2fpasswd") == "passwd"
    assert name_from_content_disposition('attachment; filename="S1A.zip"') == "S1A.zip"
    assert name_from_content_disposition(
        "attachment; filename*=UTF-8''%C3%A9t%C3%A9.nc") == "été.nc"
    assert name_from_content_disposition(None) == ""
    assert len(sanitize("x" * 500 + ".zip").encode()) <= 200
    assert sanitize("x" * 500 + ".zip").endswith(".zip")


def test_split_login_takes_the_secret_out_of_the_url() -> None:
    u = split_login("https://me:p%40ss@Example.com:8443/d/f.zip?a=1#frag")
    assert (u.url, u.user, u.password) == ("https://example.com:8443/d/f.zip?a=1", "me", "p@ss")
    assert "p@ss" not in repr(u)
    assert implicit_provider_name(u.url) == "example.com_8443"
    for bad in ("notaurl", "file:///etc/passwd", "http://", "http://h:99999/x", "http://h/a b"):
        with pytest.raises(UsageError) as info:
            split_login(bad)
        assert "\n" not in info.value.message


def test_payload_judged_by_content(tmp_path: Path) -> None:
    def check(content: bytes, name: str) -> None:
        p = tmp_path / "x.part"
        p.write_bytes(content)
        payload.check(p, name)

    with pytest.raises(PayloadError, match="HTML"):
        check(b"\n<!DOCTYPE html><html></html>", "anything.bin")
    with pytest.raises(PayloadError, match="error document"):
        check(b'<?xml version="1.0"?><error xmlns="x"><code/><message>No</message></error>',
              "S1.zip")
    with pytest.raises(PayloadError, match="text document"):
        check(b'{"detail": "Max session number exceeded"}', "S5P.nc")
    with pytest.raises(PayloadError, match="zip"):
        check(b"PK\x03\x04" + b"\x00" * 100, "S2.zip")
    check(b"CDF\x01" + b"\x00" * 100, "S5P_served_as.zip")  # netCDF under a .zip name: fine
    check(b'{"type": "Feature"}', "item.json")  # a JSON product is a JSON product
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("manifest.safe", "<xml/>")
    check(good.read_bytes(), "S2.zip")


def test_checksum_parsing() -> None:
    assert checksums.parse("MD5:" + "A" * 32).value == "a" * 32
    assert checksums.parse("sha3-256:" + "0" * 64).algo == "sha3_256"
    for bad in ("md5", "md5:123", "crc32:00000000", "sha256:" + "g" * 64):
        with pytest.raises(UsageError):
            checksums.parse(bad)
    h = checksums.new_hasher("blake3")
    h.update(b"abc")
    assert h.hexdigest().startswith("6437b3ac38465133")


def test_redactor_masks_known_secrets_and_secret_shapes() -> None:
    r = Redactor()
    r.add("hunter2-secret")
    text = r("login hunter2-secret failed for https://bob:pw123@host/x?token=abc&x=1 "
             "Authorization: Bearer eyJabc.def password=swordfish")
    for secret in ("hunter2-secret", "pw123", "abc&", "eyJabc.def", "swordfish"):
        assert secret not in text
    assert "x=1" in text and "https://" in text


def test_redactor_masks_the_signature_of_a_pre_signed_url() -> None:
    """A STAC asset signed for a while (Azure's `sig`, S3's, GCS's) is fetched by whoever
    has its URL: the signature never reaches a log line; the rest of the URL does."""
    r = Redactor()
    azure = r("https://acct.blob.core.windows.net/c/a.tif?st=2026-11-30&se=2026-12-01"
              "&sp=r&sig=Xy%2Fz123secret")
    s3 = r("https://b.s3.amazonaws.com/k.tif?X-Amz-Algorithm=AWS4-HMAC-SHA256"
           "&X-Amz-Credential=AKIAEXAMPLE%2F20261130&X-Amz-Signature=abcdef0123"
           "&X-Amz-Security-Token=FQoGZXIvYXdzEJr")
    assert "Xy%2Fz123secret" not in azure and "se=2026-12-01" in azure
    for secret in ("AKIAEXAMPLE", "abcdef0123", "FQoGZXIvYXdzEJr"):
        assert secret not in s3
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in s3


def test_redactor_quick_check_never_skips_text_a_pattern_masks() -> None:
    from asyncsat import logs

    shapes = ["ftp://u:p@h/x", "HTTPS://A:B@c", "?TOKEN=abc", "access_token: 'x1'",
              "Passwd=zz", "PWD = q", "client_SECRET=s", "apiKey=k", "api_key:k",
              "X-Auth-Token: t", "AUTHORIZATION: Basic dXNlcjpw", "authorization=Bearer b",
              "&sig=s1", "?X-Amz-Signature=ab12", "&x-amz-credential=AK%2F1",
              "&X-Amz-Security-Token=FQo", "?X-Goog-Signature=9f",
              "?__token__=exp=1~hmac=ab", "&hdnts=exp%3D1~hmac%3Dab"]
    for text in shapes + [f"download done {s} at 3" for s in shapes]:
        full = text
        for pattern in logs._PATTERNS:
            full = pattern.sub(lambda m: m.group("keep") + logs.MASK, full)
        assert full != text, text  # each shape is one the patterns mask...
        assert Redactor()(text) == full  # ...and the quick check lets it through
    plain = '{"download_id": 7, "url": "http://127.0.0.1:8080/files/f.bin", "size": 4096}'
    assert Redactor()(plain) == plain


def test_random_binary_that_starts_like_text_is_not_an_error_page(tmp_path: Path) -> None:
    p = tmp_path / "x.part"
    for first in (b"{", b"<", b"["):
        p.write_bytes(first + b"\x00\xff\x13binary" * 50)
        payload.check(p, "product.bin")


def test_binary_that_starts_with_pk_is_a_zip_only_with_a_zip_signature(
        tmp_path: Path) -> None:
    p = tmp_path / "x.part"
    p.write_bytes(b"PK\x9a\x17" + os.urandom(1000))  # 1 file in 65,536 starts so
    payload.check(p, "granule.bin")
    p.write_bytes(b"PK\x03\x04" + os.urandom(1000))  # a zip's header: checked, and broken
    with pytest.raises(PayloadError, match="zip archive is broken"):
        payload.check(p, "granule.bin")


def test_namespaced_and_empty_error_payloads(tmp_path: Path) -> None:
    p = tmp_path / "x.part"
    p.write_bytes(b'<?xml version="1.0"?>\n<m:error xmlns:m="urn:odata"><m:code>404</m:code>'
                  b"<m:message>Product not found</m:message></m:error>")
    with pytest.raises(PayloadError, match=r"error document: Product not found$"):
        payload.check(p, "$value")  # no extension: the root element still says error
    p.write_bytes(b"")
    with pytest.raises(PayloadError, match="empty"):
        payload.check(p, "S2A.zip")
    payload.check(p, "marker")  # an empty file of no known binary type may be one
    p.write_bytes(b'<?xml version="1.0"?><errors-summary count="0"/>')
    payload.check(p, "report.xml")  # only a root element named `error` is an error


def test_redactor_masks_a_login_in_every_form_a_server_echoes() -> None:
    import base64

    r = Redactor()
    r.add_login("alice", "p@ss word")
    basic = base64.b64encode(b"alice:p@ss word").decode()
    text = r(f"refused {basic} / p%40ss%20word / p@ss word")
    assert basic not in text and "p%40ss%20word" not in text and "p@ss word" not in text


def test_null_or_empty_url_is_a_usage_error() -> None:
    for bad in (None, "", "   "):
        with pytest.raises(UsageError, match="empty URL"):
            split_login(bad)


def test_implicit_provider_names_are_valid_provider_names() -> None:
    import re

    valid = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    for url, name in [("http://[::1]:8080/x", "1_8080"), ("ftp://[fe80::2]/y", "fe80__2"),
                      ("https://Data.Example.org/z", "data.example.org")]:
        assert implicit_provider_name(url) == name
        assert valid.match(name)


def test_redactor_leaves_a_path_or_a_word_that_ends_like_a_secrets_name() -> None:
    """`/etc/passwd: x` names a file, not a password (a user trial: the word after it was
    masked in an error message); a key name after `?`, `&`, a space, a quote or `_` is
    still one."""
    r = Redactor()
    for text in ("unsupported URL 'file:///etc/passwd': the scheme must be one of http",
                 "--dest /etc/passwd: /etc/passwd is a file, not a folder",
                 "see /run/secrets/token: missing"):
        assert r(text) == text
    assert r("db_password=swordfish") == "db_password=***"
    assert r('{"password": "x1"}') == '{"password": "***"}'


def test_redactor_masks_a_secrets_name_at_the_end_of_a_word() -> None:
    """A name joined to a word before it is still a secret's (camelCase JSON, an
    environment variable, a vendor's query parameter): the redactor caught these before it
    left the end of a word alone."""
    r = Redactor()
    assert r("PGPASSWORD=hunter2 psql") == "PGPASSWORD=*** psql"
    assert r('{"accessToken": "abc123", "idToken": "t2"}') == \
        '{"accessToken": "***", "idToken": "***"}'
    assert r("https://h.example/x?apitoken=abc123") == "https://h.example/x?apitoken=***"
    assert r("clientSecret=abc123") == "clientSecret=***"
    assert r("https://h.example/p?a=1&sessionToken=s3") == "https://h.example/p?a=1&sessionToken=***"


def test_redactor_masks_a_token_that_starts_a_paths_segment() -> None:
    """A CDN's token in the path (Akamai's `hdnts=` / `__token__=` segment) is a secret as
    it is in the query: the name follows a `/`, and b76f69e left it in clear; a path that
    ends like a name, followed by `:`, is still left alone."""
    r = Redactor()
    assert r("GET https://cdn.example/hdnts=exp=1~acl=*~hmac=f00d/a.nc failed") == \
        "GET https://cdn.example/hdnts=*** failed"
    assert r("https://cdn.example/__token__=hmac=beef/b.nc") == "https://cdn.example/__token__=***"
    assert r("see /run/secrets/token: missing") == "see /run/secrets/token: missing"
