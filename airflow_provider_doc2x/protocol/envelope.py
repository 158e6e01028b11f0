"""What both Doc2X APIs share: a request, an answer and its envelope, the error codes, redaction.

This module does no I/O. The hook's transport builds every request with :class:`Doc2XRequest` and
hands every answer back as a :class:`Doc2XAnswer` to :func:`read_answer`, for the worker and the
triggerer alike: one reading of ``{"code", "msg", "data"}``, one mapping of error codes (the image
API's and the PDF API's) to exception classes, one rule for what may be retried. The results both
APIs answer (:class:`Doc2XResult` of :class:`Doc2XPage`, :class:`Doc2XJobStatus`) and the reading
of one page live here too, so that :mod:`~airflow_provider_doc2x.protocol.image` and
:mod:`~airflow_provider_doc2x.protocol.pdf` stand side by side and neither imports the other.

Every byte of an answer is treated as hostile. Whatever its shape (a field of the wrong type, a
number that is infinite or not a number, JSON nested too deep, a uid with a newline in it), an
answer either reads into the types below or raises a :class:`Doc2XError` subclass: never a bare
``TypeError`` that would kill a trigger. Any text the server wrote passes through :func:`redact`
before it reaches a message, so that a server or proxy that echoes the ``Authorization`` header
cannot put the key into an exception, a log line or the database.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XBudgetError,
    Doc2XBudgetUnavailableError,
    Doc2XError,
    Doc2XInputError,
    Doc2XJobFailedError,
    Doc2XJobNotFoundError,
    Doc2XPermanentError,
    Doc2XProtocolError,
    Doc2XQuotaError,
    Doc2XRateLimitError,
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
    is_permanent,
)

#: Longest uid accepted from the server (Doc2X's are 36-character UUIDs).
MAX_UID_CHARS = 128
#: Characters of server text quoted in a message, after redaction.
QUOTE_CHARS = 200

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
#: The codes this provider gives failures that Doc2X did not name (see ``Doc2XError.default_code``).
OWN_CODES: dict[str, type[Doc2XError]] = {
    error_class.default_code: error_class
    for error_class in (
        Doc2XError,
        Doc2XTransientError,
        Doc2XSubmitUncertainError,
        Doc2XProtocolError,
        Doc2XPermanentError,
        Doc2XInputError,
        Doc2XBudgetError,
        Doc2XBudgetUnavailableError,
    )
}
#: The PDF API's codes beyond the image API's table, and what they mean for the caller:
#:
#: - Permanent (no retry of the same file can succeed; Airflow fails the task at once; its images
#:   may still go through the image lane): ``parse_page_limit_exceeded`` (over 2000 pages: split
#:   it), ``parse_file_not_pdf``, ``parse_pdf_invalid`` (pdfdeal's name for a malformed PDF, like
#:   ``parse_file_invalid``), and ``parse_file_lock``: the file failed repeatedly and is locked
#:   for a day, longer than any retry of a task.
#: - Job failed (not resent by the hook: a resend bills again): ``parse_timeout``, a PDF over the
#:   service's 15 minutes. The same file would likely time out again; the vendor's remedy is a
#:   smaller PDF, which the caller makes by packing again with fewer pages.
#: - Retried with back-off (:class:`Doc2XRateLimitError`, already in the image table):
#:   ``parse_task_limit_exceeded`` and ``parse_concurrency_limit``, tasks or pages in progress; a
#:   429 is the same. ``parse_create_task_error`` and ``internal_error`` stay transient,
#:   ``parse_error`` a failed job and ``parse_quota_limit`` permanent, as in the image table.
PDF_ERROR_CODES: dict[str, type[Doc2XError]] = {
    "parse_page_limit_exceeded": Doc2XInputError,
    "parse_file_lock": Doc2XInputError,
    "parse_file_not_pdf": Doc2XInputError,
    "parse_pdf_invalid": Doc2XInputError,
    "parse_timeout": Doc2XJobFailedError,
}
#: This provider's codes for what goes wrong on the way to object storage and back.
PDF_OWN_CODES: dict[str, type[Doc2XError]] = {
    # The store refused the url (403: expired or its signature does not match): preupload again.
    "presigned_url_refused": Doc2XTransientError,
    # The PUT failed before its body was sent whole, or the store answered 408/429/5xx: the same
    # url may be used again while it is young.
    "upload_failed": Doc2XTransientError,
    # The url already took a PDF (HTTP 200): the vendor forbids using it again.
    "presigned_url_used": Doc2XInputError,
    # The export of a finished parse failed.
    "export_failed": Doc2XJobFailedError,
    # A url the provider does not download from (a host outside the list, plain http, credentials).
    "download_refused": Doc2XInputError,
}
#: A code Doc2X may use that this provider has not seen: letters, digits and underscores.
CODE_SHAPE = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: A pasted bearer token or Doc2X key, wherever it appears in server text.
_TOKENS = re.compile(r"(?i)(bearer\s+)[^\s\"',;&<>]+|\bsk-[A-Za-z0-9_\-]{4,}")
_MIN_SECRET_CHARS = 4


def error_class_for(code: str | None) -> type[Doc2XError]:
    """The exception class a failure code means: Doc2X's own codes, then this provider's."""
    if code is None:
        return Doc2XError
    return code_class(code) or OWN_CODES.get(code) or PDF_OWN_CODES.get(code) or Doc2XProtocolError


def code_class(code: Any) -> type[Doc2XError] | None:
    """The class of one of Doc2X's codes: the image API's table, then the PDF API's; None if unknown."""
    if not isinstance(code, str):
        return None
    return ERROR_CODES.get(code) or PDF_ERROR_CODES.get(code)


def is_permanent_code(code: str | None) -> bool:
    """Whether a failure with this code can be fixed by no retry (by its class, as everywhere)."""
    return is_permanent(error_class_for(code))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove the given secrets, and anything shaped like ``Bearer ...`` or ``sk-...``, from text."""
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET_CHARS:
            text = text.replace(secret, "***")
    return _TOKENS.sub(lambda match: f"{match.group(1)}***" if match.group(1) else "sk-***", text)


def quote(value: Any, secrets: Iterable[str] = ()) -> str:
    """Server text as it may appear in a message: redacted, shortened, and quoted like ``%r``."""
    text = value if isinstance(value, str) else str(value)
    text = redact(text[: QUOTE_CHARS * 4], secrets)
    if len(text) > QUOTE_CHARS:
        text = text[:QUOTE_CHARS] + "..."
    return repr(text)


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
    #: The body's type: raw image bytes for the image API, JSON for the PDF API's calls.
    content_type: str = "application/octet-stream"

    @property
    def headers(self) -> dict[str, str]:
        """The request's own headers (the transport adds the key and the accepted encodings)."""
        # An image goes as raw bytes, not multipart: that is what the API expects.
        return {"Content-Type": self.content_type} if self.content is not None else {}

    @property
    def what(self) -> str:
        """The call in a few words, for messages: ``GET /api/v2/...``."""
        return f"{self.method} {self.path}"


def check_uid(uid: Any, *, source: str | None = None) -> str:
    """A uid is a short string of printable characters; anything else is refused before it is used."""
    if not isinstance(uid, str) or not uid or len(uid) > MAX_UID_CHARS or not uid.isprintable() or " " in uid:
        raise Doc2XProtocolError(
            f"A Doc2X job uid must be 1-{MAX_UID_CHARS} printable characters without spaces, "
            f"got {quote(uid) if isinstance(uid, str) else type(uid).__name__}",
            source=source,
        )
    if _TOKENS.search(uid):
        # A server or proxy that echoes the Authorization header as a uid must not get the key
        # into the task state store, trigger kwargs or XCom.
        raise Doc2XProtocolError("Doc2X answered a uid shaped like an API key; it is not used", source=source)
    return uid


@dataclass(frozen=True)
class Doc2XPage:
    """One page of a result: its index, its size in pixels and its Markdown."""

    page_idx: int
    page_width: int
    page_height: int
    md: str
    url: str | None = None
    #: The PDF API's parse quality, 0-100 (absent from the image API's pages).
    score: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The page as JSON for XCom (the page image's url is left out: it expires with the job)."""
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
        """The Markdown of every page, pages separated by a blank line."""
        return "\n\n".join(page.md for page in self.pages)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON."""
        return {
            "uid": self.uid,
            "pages": [page.to_dict() for page in self.pages],
            "markdown": self.markdown,
            "convert_zip": self.convert_zip,
        }


@dataclass(frozen=True)
class Doc2XJobStatus:
    """Where a job stands; ``result`` is set once it succeeded, ``detail`` may say why it failed."""

    uid: str
    status: str
    progress: int | None = None
    detail: str | None = None
    result: Doc2XResult | None = None

    @property
    def is_terminal(self) -> bool:
        """Done, well or not: no later answer will differ."""
        return self.status in TERMINAL_STATUSES

    def failure(self) -> Doc2XError:
        """The error a ``failed`` status means.

        The vendor's clients read the reason from ``detail``: when it is one of Doc2X's codes it
        picks the class, otherwise the job failed to parse (``parse_error``), and the detail is
        kept in the message only.
        """
        code = self.detail if code_class(self.detail) is not None else "parse_error"
        reason = f": {quote(self.detail)}" if self.detail and self.detail != code else ""
        return error_class_for(code)(f"Doc2X reports the job failed{reason}", code=code, uid=self.uid)


@dataclass(frozen=True)
class Doc2XAnswer:
    """An HTTP answer as the transport saw it, before it is read."""

    http_status: int
    body: bytes
    headers: Mapping[str, str]

    @property
    def trace_id(self) -> str | None:
        """Doc2X's trace id of the call (what its support asks for), if it is a sane value."""
        value = self.headers.get("trace-id") or self.headers.get("x-trace-id")
        if value and len(value) <= MAX_UID_CHARS and value.isprintable():
            return value
        return None

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asks to wait (``Retry-After``), within reason."""
        value = self.headers.get("retry-after")
        try:
            seconds = float(value) if value is not None else math.nan
        except ValueError:
            return None  # An HTTP date: rare here, and the back-off covers it.
        return min(max(0.0, seconds), 3600.0) if math.isfinite(seconds) else None


def read_answer(request: Doc2XRequest, answer: Doc2XAnswer, *, secrets: Iterable[str] = ()) -> dict[str, Any]:
    """Return the ``data`` of a successful answer, or raise the error class the answer means."""
    secrets = tuple(secrets)
    context: dict[str, Any] = {
        "http_status": answer.http_status,
        "uid": request.uid,
        "trace_id": answer.trace_id,
        "source": request.source,
    }
    payload = _json_or_none(answer.body)
    envelope = payload if isinstance(payload, dict) else {}
    code = envelope.get("code")
    message = envelope.get("msg") or envelope.get("message")
    said = f": {quote(message, secrets)}" if isinstance(message, str) and message else ""
    if code is not None and (not isinstance(code, str) or not CODE_SHAPE.fullmatch(code)):
        raise Doc2XProtocolError(
            f"Doc2X answered HTTP {answer.http_status} with a code that is not one: {quote(code, secrets)}",
            **context,
        )

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
        unreadable: type[Doc2XError] = (
            Doc2XTransientError if answer.http_status >= 500 else Doc2XProtocolError
        )
        quoted = quote(answer.body[: QUOTE_CHARS * 4].decode("utf-8", "replace"), secrets)
        raise unreadable(
            f"Doc2X answered HTTP {answer.http_status} with a body that is not its JSON: {quoted}", **context
        )
    if code == "success" and 200 <= answer.http_status < 300:
        data = envelope.get("data")
        if not isinstance(data, dict):
            raise Doc2XProtocolError("Doc2X answered success without a data object", code=code, **context)
        return data
    error_class = code_class(code)
    if error_class is None:
        unknown: type[Doc2XError] = Doc2XTransientError if answer.http_status >= 500 else Doc2XProtocolError
        raise unknown(f"Doc2X answered an unknown error code {code!r}{said}", code=code, **context)
    if error_class is Doc2XRateLimitError:
        raise Doc2XRateLimitError(
            f"Doc2X limit reached{said}", code=code, retry_after=answer.retry_after, **context
        )
    raise error_class(f"Doc2X error {code}{said}", code=code, **context)


def read_page(page: Any, index: int, uid: str) -> Doc2XPage:
    """One page of a result as both APIs answer it; the PDF reader adds its own checks on top."""
    if not isinstance(page, dict):
        raise Doc2XProtocolError(
            f"Doc2X answered page {index} as a {type(page).__name__}, not an object", uid=uid
        )
    md = page.get("md")
    if md is not None and not isinstance(md, str):
        raise Doc2XProtocolError(f"Doc2X answered page {index} with md of type {type(md).__name__}", uid=uid)
    url = page.get("url")
    return Doc2XPage(
        page_idx=whole_number(page, "page_idx", index, uid, default=index),
        page_width=whole_number(page, "page_width", index, uid, default=0),
        page_height=whole_number(page, "page_height", index, uid, default=0),
        md=md or "",
        url=url if isinstance(url, str) else None,
    )


def whole_number(page: dict, name: str, index: int, uid: str, *, default: int) -> int:
    """A page's integer field: an int, or a float with no fraction; anything else is refused."""
    value = page.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Doc2XProtocolError(
            f"Doc2X answered page {index} with {name} of type {type(value).__name__}", uid=uid
        )
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise Doc2XProtocolError(f"Doc2X answered page {index} with {name}={value!r}", uid=uid)
    number = int(value)
    if not 0 <= number < 2**31:
        raise Doc2XProtocolError(f"Doc2X answered page {index} with {name}={number} out of range", uid=uid)
    return number


def read_progress(value: Any) -> int | None:
    """A status's progress as a percentage, or None for a value that is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return None
    return min(100, max(0, int(value)))


def is_retryable(error: BaseException) -> bool:
    """The one rule for the hook's retries: transient errors only, never a permanent one."""
    return isinstance(error, Doc2XTransientError) and not is_permanent(error)


def _json_or_none(body: bytes) -> Any:
    """The body as JSON, or None for anything that is not (too deep, invalid, not UTF-8)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError, MemoryError):
        return None
