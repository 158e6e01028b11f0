"""
The Doc2X v2 image API as data: what to send, and what an answer means.

This module does no I/O. The hook's synchronous and asynchronous transports both build their
requests here and hand every answer back here, so the two paths cannot drift apart: one table of
endpoints, one reading of answers, one mapping of error codes to exception classes, one rule for
what may be retried.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XError,
    Doc2XInputError,
    Doc2XJobFailedError,
    Doc2XJobNotFoundError,
    Doc2XPermanentError,
    Doc2XProtocolError,
    Doc2XQuotaError,
    Doc2XRateLimitError,
    Doc2XTransientError,
)

DEFAULT_BASE_URL = "https://v2.doc2x.noedgeai.com"
PARSE_PATH = "/api/v2/parse/img/layout"
SUBMIT_PATH = "/api/v2/async/parse/img/layout"
STATUS_PATH = "/api/v2/parse/img/layout/status"

#: Largest image the API takes ("<= 7M"); checked before a byte is sent.
MAX_IMAGE_BYTES = 7 * 1024 * 1024
#: The key's limit as the vendor states it: 30 images per 30 seconds.
DEFAULT_RATE_LIMIT_IMAGES = 30
DEFAULT_RATE_LIMIT_WINDOW = 30.0
#: How long Doc2X keeps a job's result.
RESULT_LIFETIME_SECONDS = 24 * 3600

IMAGE_MAGIC = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png"}

STATUS_PROCESSING = "processing"
STATUS_SUCCESS = "success"
STATUS_FAILED = "failed"
TERMINAL_STATUSES = frozenset({STATUS_SUCCESS, STATUS_FAILED})

#: Every error code the API notes list, mapped to what it means for the caller.
ERROR_CODES: dict[str, type[Doc2XError]] = {
    "unauthorized": Doc2XAuthError,
    "request_limit_exceeded": Doc2XRateLimitError,
    "parse_task_limit_exceeded": Doc2XRateLimitError,
    "parse_concurrency_limit": Doc2XRateLimitError,
    "parse_file_too_large": Doc2XInputError,
    "parse_file_invalid": Doc2XInputError,
    "parse_file_not_image": Doc2XInputError,
    "parse_quota_limit": Doc2XQuotaError,
    "parse_status_not_found": Doc2XJobNotFoundError,
    "parse_error": Doc2XJobFailedError,
    "parse_create_task_error": Doc2XTransientError,
    "internal_error": Doc2XTransientError,
}

_BODY_QUOTE_CHARS = 200


@dataclass(frozen=True)
class Doc2XRequest:
    """One call to the API, transport-neutral. ``bills`` marks an upload that costs a page."""

    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    content: bytes | None = None
    bills: bool = False
    uid: str | None = None
    source: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        # The body is raw image bytes, not multipart: that is what the API expects.
        return {"Content-Type": "application/octet-stream"} if self.content is not None else {}


def parse_request(image: bytes, *, source: str | None = None) -> Doc2XRequest:
    return Doc2XRequest("POST", PARSE_PATH, content=image, bills=True, source=source)


def submit_request(image: bytes, *, source: str | None = None) -> Doc2XRequest:
    return Doc2XRequest("POST", SUBMIT_PATH, content=image, bills=True, source=source)


def status_request(uid: str) -> Doc2XRequest:
    if not uid or not isinstance(uid, str):
        raise Doc2XJobNotFoundError(f"A Doc2X job uid must be a non-empty string, got {uid!r}")
    return Doc2XRequest("GET", STATUS_PATH, params={"uid": uid}, uid=uid)


@dataclass(frozen=True)
class Doc2XPage:
    page_idx: int
    page_width: int
    page_height: int
    md: str
    url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "page_idx": self.page_idx,
            "page_width": self.page_width,
            "page_height": self.page_height,
            "md": self.md,
        }


@dataclass(frozen=True)
class Doc2XResult:
    """A parsed image: its pages and, when it has figures, the raw ``convert_zip`` payload."""

    uid: str
    pages: tuple[Doc2XPage, ...]
    convert_zip: str | None = None

    @property
    def markdown(self) -> str:
        return "\n\n".join(page.md for page in self.pages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "pages": [page.to_dict() for page in self.pages],
            "markdown": self.markdown,
            "convert_zip": self.convert_zip,
        }


@dataclass(frozen=True)
class Doc2XJobStatus:
    uid: str
    status: str
    progress: int | None = None
    detail: str | None = None
    result: Doc2XResult | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class Doc2XAnswer:
    """An HTTP answer as the transports saw it, before it is read."""

    http_status: int
    body: bytes
    headers: Mapping[str, str]

    @property
    def trace_id(self) -> str | None:
        return self.headers.get("trace-id") or self.headers.get("x-trace-id")

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after")
        try:
            return max(0.0, float(value)) if value is not None else None
        except ValueError:
            return None  # An HTTP date: rare here, and the back-off covers it.


def sniff_image_type(data: bytes) -> str | None:
    """The image's MIME type by its magic bytes (never by its name), or None if not JPEG/PNG."""
    for magic, mime in IMAGE_MAGIC.items():
        if data.startswith(magic):
            return mime
    return None


def check_image_size(size: int, *, source: str) -> None:
    if size == 0:
        raise Doc2XInputError(f"Image {source} is empty: nothing to parse", source=source)
    if size > MAX_IMAGE_BYTES:
        raise Doc2XInputError(
            f"Image {source} is {size} bytes, over Doc2X's limit of {MAX_IMAGE_BYTES} bytes (7 MB): "
            "downscale or recompress it first",
            source=source,
            code="parse_file_too_large",
        )


def check_image(data: bytes, *, source: str) -> None:
    """Refuse, before anything is sent, an image the API would refuse (and might bill)."""
    check_image_size(len(data), source=source)
    if sniff_image_type(data) is None:
        raise Doc2XInputError(
            f"Image {source} is neither JPEG nor PNG by its content (first bytes {data[:8]!r}): "
            "Doc2X takes only jpg/png images; convert it first",
            source=source,
            code="parse_file_not_image",
        )


def read_answer(request: Doc2XRequest, answer: Doc2XAnswer) -> dict[str, Any]:
    """Return the ``data`` of a successful answer, or raise the error class the answer means."""
    context: dict[str, Any] = {
        "http_status": answer.http_status,
        "uid": request.uid,
        "trace_id": answer.trace_id,
        "source": request.source,
    }
    payload = _json_or_none(answer.body)
    code = payload.get("code") if isinstance(payload, dict) else None
    message = (payload.get("msg") or payload.get("message")) if isinstance(payload, dict) else None

    if answer.http_status == 401 or code == "unauthorized":
        raise Doc2XAuthError(
            "Doc2X refused the API key: check the password of the Doc2X connection",
            code=code or "unauthorized",
            **context,
        )
    if answer.http_status == 429:
        raise Doc2XRateLimitError(
            "Doc2X rate limit exceeded for this key",
            code=code or "request_limit_exceeded",
            retry_after=answer.retry_after,
            **context,
        )
    if code is None:
        quote = answer.body[:_BODY_QUOTE_CHARS].decode("utf-8", "replace")
        unreadable: type[Doc2XError] = (
            Doc2XTransientError if answer.http_status >= 500 else Doc2XProtocolError
        )
        raise unreadable(
            f"Doc2X answered HTTP {answer.http_status} with a body that is not its JSON: {quote!r}", **context
        )
    if code == "success" and answer.http_status < 400:
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, dict):
            raise Doc2XProtocolError("Doc2X answered success without a data object", code=code, **context)
        return data
    error_class = ERROR_CODES.get(code)
    if error_class is None:
        unknown: type[Doc2XError] = Doc2XTransientError if answer.http_status >= 500 else Doc2XProtocolError
        raise unknown(
            f"Doc2X answered an unknown error code {code!r}: {message or 'no message'}", code=code, **context
        )
    if error_class is Doc2XRateLimitError:
        raise Doc2XRateLimitError(
            f"Doc2X limit reached: {message or code}", code=code, retry_after=answer.retry_after, **context
        )
    raise error_class(f"Doc2X error {code}: {message or 'no message'}", code=code, **context)


def read_result(data: Mapping[str, Any], *, uid: str | None = None) -> Doc2XResult:
    """Read the ``data`` of a synchronous parse or of a successful status into a result."""
    result_uid = str(data.get("uid") or uid or "")
    result = data.get("result") or {}
    raw_pages = result.get("pages") if isinstance(result, dict) else None
    if not isinstance(raw_pages, list):
        raise Doc2XProtocolError("Doc2X answered a result without pages", uid=result_uid or None)
    pages = tuple(
        Doc2XPage(
            page_idx=int(page.get("page_idx", index)),
            page_width=int(page.get("page_width") or 0),
            page_height=int(page.get("page_height") or 0),
            md=str(page.get("md") or ""),
            url=page.get("url"),
        )
        for index, page in enumerate(raw_pages)
    )
    return Doc2XResult(uid=result_uid, pages=pages, convert_zip=data.get("convert_zip") or None)


def read_uid(request: Doc2XRequest, data: Mapping[str, Any]) -> str:
    uid = data.get("uid")
    if not isinstance(uid, str) or not uid:
        raise Doc2XProtocolError("Doc2X accepted the image but answered no uid", source=request.source)
    return uid


def read_status(uid: str, data: Mapping[str, Any]) -> Doc2XJobStatus:
    status = str(data.get("status") or "")
    if not status:
        raise Doc2XProtocolError("Doc2X answered a job status without a status", uid=uid)
    progress = data.get("progress")
    return Doc2XJobStatus(
        uid=uid,
        status=status,
        progress=int(progress) if isinstance(progress, (int, float)) else None,
        detail=data.get("detail") or None,
        result=read_result(data, uid=uid) if status == STATUS_SUCCESS else None,
    )


def is_retryable(error: BaseException) -> bool:
    """The one rule for the hook's retries: transient errors only, never a permanent one."""
    return isinstance(error, Doc2XTransientError) and not isinstance(error, Doc2XPermanentError)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
