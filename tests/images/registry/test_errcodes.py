"""Registry error answers become the image service's errors, with messages that say what to do."""

from __future__ import annotations

import email.utils
import json

import pytest

from agent.images import errors
from agent.images.registry import errcodes

WHAT = "manifest docker.io/library/alpine:3.20 at registry-1.docker.io"


def body(code: str, message: str = "", detail=None) -> bytes:
    entry = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}).encode()


@pytest.mark.parametrize(
    ("status", "payload", "cls", "code"),
    [
        (401, body("UNAUTHORIZED", "authentication required"), errors.Unauthorized, "UNAUTHORIZED"),
        (401, b"", errors.Unauthorized, ""),
        (
            403,
            body("DENIED", "requested access to the resource is denied"),
            errors.Denied,
            "DENIED",
        ),
        (403, b"", errors.Denied, ""),
        (400, body("DENIED", "no"), errors.Denied, "DENIED"),
        (400, body("UNAUTHORIZED", "no"), errors.Unauthorized, "UNAUTHORIZED"),
        (429, body("TOOMANYREQUESTS", "slow down"), errors.TooManyRequests, "TOOMANYREQUESTS"),
        (429, b"", errors.TooManyRequests, "TOOMANYREQUESTS"),
        (503, body("TOOMANYREQUESTS", "x"), errors.Unavailable, None),
        (404, body("MANIFEST_UNKNOWN", "manifest unknown"), errors.NotFound, None),
        (404, body("NAME_UNKNOWN", "repository name not known"), errors.NotFound, None),
        (404, b"", errors.NotFound, None),
        (400, body("BLOB_UNKNOWN", "blob unknown"), errors.NotFound, None),
        (500, b"", errors.Unavailable, None),
        (502, b"<html>Bad Gateway</html>", errors.Unavailable, None),
        (503, body("UNAVAILABLE", "down"), errors.Unavailable, None),
        (400, body("MANIFEST_INVALID", "bad"), errors.RegistryError, "MANIFEST_INVALID"),
        (405, body("UNSUPPORTED", "nope"), errors.RegistryError, "UNSUPPORTED"),
        (416, b"", errors.RegistryError, ""),
    ],
)
def test_answers_map_to_the_error_tree(status, payload, cls, code):
    err = errcodes.error_for(status, payload, {}, what=WHAT)
    assert type(err) is cls
    assert isinstance(err, errors.ImageError)
    assert WHAT in str(err)
    assert str(status) in str(err)
    if code is not None:
        assert isinstance(err, errors.RegistryError)
        assert err.status == status
        assert err.code == code


@pytest.mark.parametrize(
    ("status", "payload", "phrases"),
    [
        (
            401,
            body("UNAUTHORIZED", "authentication required", [{"Type": "repository"}]),
            [
                "401 Unauthorized",
                "UNAUTHORIZED: authentication required",
                "check the credentials (--auth-file / imagePullSecrets)",
            ],
        ),
        (
            404,
            body("MANIFEST_UNKNOWN", "manifest unknown", {"Tag": "3.20"}),
            [
                "404 Not Found",
                "MANIFEST_UNKNOWN: manifest unknown",
                "check the repository name and tag",
            ],
        ),
        (
            403,
            body("DENIED", "requested access to the resource is denied"),
            ["403 Forbidden", "DENIED: requested access", "not allowed"],
        ),
        (503, b"", ["503 Service Unavailable", "try again later"]),
        (502, b"upstream connect error\nmore lines", ["502 Bad Gateway (upstream connect error)"]),
    ],
)
def test_messages_name_what_status_code_the_registrys_words_and_what_to_do(
    status, payload, phrases
):
    message = str(errcodes.error_for(status, payload, {}, what=WHAT))
    assert message.startswith(WHAT + ": ")
    assert "\n" not in message
    for phrase in phrases:
        assert phrase in message


def test_the_registrys_message_and_detail_are_kept_on_the_error():
    err = errcodes.error_for(
        401, body("UNAUTHORIZED", "authentication required", {"a": 1}), {}, what=WHAT
    )
    assert isinstance(err, errors.Unauthorized)
    assert err.detail == 'authentication required {"a":1}'


def test_too_many_requests_carries_retry_after_seconds():
    err = errcodes.error_for(
        429,
        body("TOOMANYREQUESTS", "You have reached your pull rate limit."),
        {"retry-after": "30"},
        what=WHAT,
    )
    assert isinstance(err, errors.TooManyRequests)
    assert err.retry_after == 30.0
    assert "rate limited; retry after 30s or authenticate" in str(err)
    assert "pull rate limit" in str(err)


def test_too_many_requests_without_retry_after_says_retry_later():
    err = errcodes.error_for(429, b"", {}, what=WHAT)
    assert isinstance(err, errors.TooManyRequests)
    assert err.retry_after is None
    assert "rate limited; retry later or authenticate" in str(err)


def test_unavailable_mentions_retry_after():
    err = errcodes.error_for(503, b"", {"Retry-After": "5"}, what=WHAT)
    assert "the registry is failing; try again in 5s" in str(err)


def test_a_long_body_is_truncated_to_one_short_line():
    err = errcodes.error_for(400, b"x" * 5000, {}, what=WHAT)
    assert len(str(err)) < 500


def test_an_html_error_page_adds_nothing():
    err = errcodes.error_for(500, b"<!doctype html><html>...</html>", {}, what=WHAT)
    assert str(err) == f"{WHAT}: 500 Internal Server Error; {errcodes.ADVICE_UNAVAILABLE}"


def test_a_non_oci_json_error_is_still_reported():
    err = errcodes.error_for(400, b'{"message": "bad request body"}', {}, what=WHAT)
    assert "bad request body" in str(err)


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("-3", None),
        ("nan", None),
        ("inf", None),
        ("soon", None),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_retry_after_is_delay_seconds_or_an_http_date(value, seconds):
    assert errcodes.parse_retry_after(value, now=NOW) == seconds


def test_parse_body_takes_the_first_error():
    payload = json.dumps(
        {"errors": [{"code": "denied", "message": "first"}, {"code": "X", "message": "second"}]}
    ).encode()
    assert errcodes.parse_body(payload) == ("DENIED", "first", "")
