"""Registry error answers → the image service's error tree.

A registry explains a failed request with a status and, usually, an OCI distribution error
body::

    {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown",
                 "detail": {"Tag": "3.99"}}]}

:func:`error_for` turns that into one error whose one-line message names what was asked
for and where, the status, the code, the registry's words and what the user can do:

=====================================================  ========================
answer                                                 error
=====================================================  ========================
401, ``UNAUTHORIZED``                                  :class:`~errors.Unauthorized`
403, ``DENIED``                                        :class:`~errors.Denied`
429, ``TOOMANYREQUESTS``                               :class:`~errors.TooManyRequests`
404, ``MANIFEST_UNKNOWN``, ``BLOB_UNKNOWN``,
``NAME_UNKNOWN``                                       :class:`~errors.NotFound`
5xx                                                    :class:`~errors.Unavailable`
anything else                                          :class:`~errors.RegistryError`
=====================================================  ========================

The status decides first (a 401 is ``Unauthorized`` whatever its code says); the code
decides for statuses without a rule of their own. ``NotFound`` and ``Unavailable`` are not
``RegistryError``\\ s (the tree puts them beside it), so the return type is ``ImageError``.
"""

from __future__ import annotations

import email.utils
import http
import json
import time
from collections.abc import Mapping
from typing import Any

from agent.images import errors

#: The OCI distribution spec's error codes (plus Docker Hub's ``TOOMANYREQUESTS``).
CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    }
)
_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"})

ADVICE_UNAUTHORIZED = (
    "check the credentials (--auth-file / imagePullSecrets); anonymous pulls of a "
    "repository that does not exist are refused this way too"
)
ADVICE_DENIED = "the credentials are not allowed to pull this repository; check their access"
ADVICE_NOT_FOUND = "check the repository name and tag"
ADVICE_UNAVAILABLE = "the registry is failing; try again later"

_MAX_TEXT = 300


def error_for(
    status: int, body: bytes, headers: Mapping[str, str], *, what: str
) -> errors.ImageError:
    """The error for a registry's failed answer.

    Args:
        status: the HTTP status.
        body: the response body (may be empty, e.g. for ``HEAD``; need not be JSON).
        headers: the response headers (``Retry-After`` is read case-insensitively).
        what: what was asked for, and where: ``"manifest docker.io/library/alpine:3.20 at
            registry-1.docker.io"``.
    """
    code, message, detail = parse_body(body)
    codes = {code} if code else set()
    phrase = _phrase(status)
    said = f"{code}: {message}" if code and message else (code or message)
    head = f"{what}: {status} {phrase}".rstrip() + (f" ({said})" if said else "")
    registry_text = message + (f" {detail}" if detail else "")

    def build(cls: type[errors.RegistryError], advice: str) -> errors.RegistryError:
        return cls(f"{head}; {advice}", status=status, code=code, detail=registry_text)

    if status == 401:
        return build(errors.Unauthorized, ADVICE_UNAUTHORIZED)
    if status == 403:
        return build(errors.Denied, ADVICE_DENIED)
    if status == 429:
        return _too_many(head, status, code, registry_text, headers)
    if status == 404:
        return errors.NotFound(f"{head}; {ADVICE_NOT_FOUND}")
    if status >= 500:
        retry_after = parse_retry_after(_header(headers, "Retry-After"))
        advice = ADVICE_UNAVAILABLE
        if retry_after:
            advice = advice.replace("later", f"in {_seconds(retry_after)}")
        return errors.Unavailable(f"{head}; {advice}")
    if "UNAUTHORIZED" in codes:
        return build(errors.Unauthorized, ADVICE_UNAUTHORIZED)
    if "DENIED" in codes:
        return build(errors.Denied, ADVICE_DENIED)
    if "TOOMANYREQUESTS" in codes:
        return _too_many(head, status, code, registry_text, headers)
    if codes & _NOT_FOUND_CODES:
        return errors.NotFound(f"{head}; {ADVICE_NOT_FOUND}")
    return errors.RegistryError(head, status=status, code=code, detail=registry_text)


def parse_body(body: bytes) -> tuple[str, str, str]:
    """``(code, message, detail)`` of the first error in an OCI error body.

    ``detail`` is compact JSON (or ``""``). A body that is not an OCI error is reported
    as its first line (truncated) in ``message``, so an HTML error page from a proxy still
    says something.
    """
    if not body:
        return "", "", ""
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"]:
        first = doc["errors"][0]
        if isinstance(first, dict):
            code = str(first.get("code") or "").upper()
            message = _one_line(str(first.get("message") or ""))
            raw_detail = first.get("detail")
            detail = ""
            if raw_detail not in (None, "", [], {}):
                detail = _one_line(json.dumps(raw_detail, separators=(",", ":"), default=str))
            return code, message, detail
    if isinstance(doc, dict) and isinstance(doc.get("details") or doc.get("message"), str):
        return "", _one_line(str(doc.get("details") or doc.get("message"))), ""
    text = body.decode("utf-8", errors="replace").strip()
    if text.lstrip().startswith("<"):
        return "", "", ""  # an HTML page says nothing useful in one line
    return "", _one_line(text.splitlines()[0] if text else ""), ""


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date.

    Returns ``None`` for a missing or unparsable value; a date in the past gives ``0``.
    ``now`` (a Unix time) is for tests.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 and seconds == seconds and seconds != float("inf") else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _too_many(
    head: str, status: int, code: str, detail: str, headers: Mapping[str, str]
) -> errors.TooManyRequests:
    retry_after = parse_retry_after(_header(headers, "Retry-After"))
    wait = f"retry after {_seconds(retry_after)}" if retry_after is not None else "retry later"
    return errors.TooManyRequests(
        f"{head}; rate limited; {wait} or authenticate",
        status=status,
        code=code or "TOOMANYREQUESTS",
        detail=detail,
        retry_after=retry_after,
    )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f}s" if value >= 1 or value == 0 else f"{value:.1f}s"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"
