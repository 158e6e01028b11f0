"""The Doc2X v2 image API as data: what to send, and what an answer means.

This module does no I/O. The hook's transport builds every request here and hands every answer
back here, for the worker and the triggerer alike: one table of endpoints, one reading of
answers, one mapping of error codes to exception classes, one rule for what may be retried.

Every byte of an answer is treated as hostile. Whatever its shape (a field of the wrong type, a
number that is infinite or not a number, JSON nested too deep, a uid with a newline in it), an
answer either reads into the types below or raises a :class:`Doc2XError` subclass: never a bare
``TypeError`` that would kill a trigger. Any text the server wrote passes through :func:`redact`
before it reaches a message, so that a server or proxy that echoes the ``Authorization`` header
cannot put the key into an exception, a log line or the database.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

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
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
    is_permanent,
)
from airflow_provider_doc2x.settings import (  # noqa: F401 - the API's facts, named here too
    DEFAULT_BASE_URL,
    DEFAULT_RATE_LIMIT_IMAGES,
    DEFAULT_RATE_LIMIT_WINDOW,
)

PARSE_PATH = "/api/v2/parse/img/layout"
SUBMIT_PATH = "/api/v2/async/parse/img/layout"
STATUS_PATH = "/api/v2/parse/img/layout/status"

#: Largest image the API takes ("<= 7M"); checked before a byte is sent.
MAX_IMAGE_BYTES = 7 * 1024 * 1024
#: How long Doc2X keeps a job's result.
RESULT_LIFETIME_SECONDS = 24 * 3600
#: Longest uid accepted from the server (Doc2X's are 36-character UUIDs).
MAX_UID_CHARS = 128
#: Characters of server text quoted in a message, after redaction.
QUOTE_CHARS = 200

IMAGE_MAGIC = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png"}
#: What a refused file looks like, to name it in the error (never quoting its bytes).
OTHER_FILE_MAGIC = {
    b"%PDF": "a PDF document",
    b"GIF8": "a GIF image",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
    b"BM": "a BMP image",
    b"PK\x03\x04": "a ZIP archive (or an Office document)",
    b"\x1f\x8b": "a gzip archive",
    b"<svg": "an SVG image",
    b"<?xml": "an XML document",
}

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
    )
}
#: A code Doc2X may use that this provider has not seen: letters, digits and underscores.
_CODE_SHAPE = re.compile(r"[a-z][a-z0-9_]{0,63}")
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


def parse_request(image: bytes, *, source: str | None = None) -> Doc2XRequest:
    """Doc2X's synchronous parse of one image: answers when the result is ready."""
    return Doc2XRequest("POST", PARSE_PATH, content=image, bills=True, source=source)


def submit_request(image: bytes, *, source: str | None = None) -> Doc2XRequest:
    """Doc2X's asynchronous submission of one image: answers its job's uid."""
    return Doc2XRequest("POST", SUBMIT_PATH, content=image, bills=True, source=source)


def status_request(uid: str) -> Doc2XRequest:
    """The status (and, once done, the result) of one job."""
    check_uid(uid)
    return Doc2XRequest("GET", STATUS_PATH, params={"uid": uid}, uid=uid)


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


def sniff_image_type(data: bytes) -> str | None:
    """The image's MIME type by its magic bytes (never by its name), or None if not JPEG/PNG."""
    for magic, mime in IMAGE_MAGIC.items():
        if data.startswith(magic):
            return mime
    return None


def describe_content(head: bytes) -> str:
    """What a file that is not a JPEG/PNG seems to be, from its first bytes: for errors, never the bytes."""
    for magic, kind in OTHER_FILE_MAGIC.items():
        if head.startswith(magic):
            return kind
    if head[8:12] == b"WEBP":
        return "a WebP image"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "a HEIC image"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "an unknown binary format"
    return (
        "text"
        if all(character.isprintable() or character.isspace() for character in text)
        else "an unknown format"
    )


def check_image_size(size: int, *, source: str) -> None:
    """Refuse an empty image, or one over Doc2X's 7 MB, from its size alone."""
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
    check_image_head(data, source=source)


def check_image_head(head: bytes, *, source: str) -> None:
    """Refuse a file whose first bytes are not a JPEG's or a PNG's, naming what it seems to be."""
    if sniff_image_type(head) is None:
        raise Doc2XInputError(
            f"Image {source} is not a JPEG or PNG by its content (it looks like {describe_content(head)}): "
            "Doc2X takes only jpg/png images; convert it first",
            source=source,
            code="parse_file_not_image",
        )


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
    if code is not None and (not isinstance(code, str) or not _CODE_SHAPE.fullmatch(code)):
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


def read_result(data: Mapping[str, Any], *, uid: str | None = None) -> Doc2XResult:
    """Read the ``data`` of a synchronous parse or of a successful status into a result."""
    result_uid = check_uid(data["uid"]) if data.get("uid") is not None else uid
    if uid is not None and result_uid != uid:
        # Another job's result (a cache that ignores the query string, say): never stored as this one's.
        raise Doc2XProtocolError(f"Doc2X answered the result of uid {result_uid!r} for another uid", uid=uid)
    if result_uid is None:
        raise Doc2XProtocolError("Doc2X answered a result without a uid")
    result = data.get("result")
    raw_pages = result.get("pages") if isinstance(result, dict) else None
    if not isinstance(raw_pages, list):
        raise Doc2XProtocolError("Doc2X answered a result without a list of pages", uid=result_uid)
    pages = tuple(_read_page(page, index, result_uid) for index, page in enumerate(raw_pages))
    return Doc2XResult(uid=result_uid, pages=pages, convert_zip=_convert_zip_text(data.get("convert_zip")))


def _read_page(page: Any, index: int, uid: str) -> Doc2XPage:
    if not isinstance(page, dict):
        raise Doc2XProtocolError(
            f"Doc2X answered page {index} as a {type(page).__name__}, not an object", uid=uid
        )
    md = page.get("md")
    if md is not None and not isinstance(md, str):
        raise Doc2XProtocolError(f"Doc2X answered page {index} with md of type {type(md).__name__}", uid=uid)
    url = page.get("url")
    return Doc2XPage(
        page_idx=_whole_number(page, "page_idx", index, uid, default=index),
        page_width=_whole_number(page, "page_width", index, uid, default=0),
        page_height=_whole_number(page, "page_height", index, uid, default=0),
        md=md or "",
        url=url if isinstance(url, str) else None,
    )


def _whole_number(page: dict, name: str, index: int, uid: str, *, default: int) -> int:
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


def _convert_zip_text(value: Any) -> str | None:
    """``convert_zip`` as text: the storage layer keeps anything it cannot unpack raw, with a warning."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, allow_nan=True, default=str)


def read_uid(request: Doc2XRequest, data: Mapping[str, Any]) -> str:
    """The uid of a job Doc2X just accepted."""
    uid = data.get("uid")
    if uid is None or uid == "":
        raise Doc2XProtocolError("Doc2X accepted the image but answered no uid", source=request.source)
    return check_uid(uid, source=request.source)


def read_status(uid: str, data: Mapping[str, Any], *, secrets: Iterable[str] = ()) -> Doc2XJobStatus:
    """A job's status. Statuses this provider does not know are kept as they are (not terminal)."""
    status = data.get("status")
    if not isinstance(status, str) or not _CODE_SHAPE.fullmatch(status.lower()):
        raise Doc2XProtocolError(
            f"Doc2X answered a job status that is not one: {quote(status, secrets)}", uid=uid
        )
    progress = data.get("progress")
    detail = data.get("detail")
    status = status.lower()
    return Doc2XJobStatus(
        uid=uid,
        status=status,
        progress=_progress(progress),
        detail=redact(detail[:QUOTE_CHARS], secrets) if isinstance(detail, str) and detail else None,
        result=read_result(data, uid=uid) if status == STATUS_SUCCESS else None,
    )


def _progress(value: Any) -> int | None:
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


# -- The PDF API (the bulk lane) ----------------------------------------------------------------
#
# Flow: preupload (a uid and a presigned PUT url) -> PUT the PDF to the url -> poll the status ->
# export the Markdown as a zip -> download it. The PUT and the downloads go to object storage, not
# to the API: they carry no key, and their urls are secrets of a few minutes, never logged whole.

PREUPLOAD_PATH = "/api/v2/parse/preupload"
PDF_STATUS_PATH = "/api/v2/parse/status"
EXPORT_PATH = "/api/v2/convert/parse"
EXPORT_RESULT_PATH = "/api/v2/convert/parse/result"

#: The models the preupload takes; none chosen means the service's default, v2.
PDF_MODELS = frozenset({"v2", "v3-2026"})
#: The PDF API's default model. The image API takes no model; the vendor describes its output as
#: "consistent with /parse/pdf" (whose default is v2), so its results count as v2's.
DEFAULT_MODEL = "v2"
#: How long a presigned PUT url lives (the vendor: 5 minutes).
PRESIGNED_URL_LIFETIME = 300.0
#: A failed PUT is retried on the same url only while the url is younger than its lifetime less
#: this margin (a retry started near the end would be refused on arrival); after that, a new
#: preupload.
PRESIGNED_URL_MARGIN = 60.0
#: Longest url accepted from the service (presigned urls run to several hundred characters).
MAX_URL_CHARS = 4096
#: Longest export file name accepted (no extension; Doc2X names the file inside the zip with it).
MAX_FILENAME_CHARS = 128
#: The largest PDF the service takes (preupload: 1 GB).
MAX_PDF_BYTES = 1024 * 1024 * 1024
#: Seconds after a PUT's 200 during which an unknown uid means "not picked up yet". The service
#: fetches the upload with a delay (the vendor: under 20 s), and it is not documented whether the
#: status says ``processing`` or ``parse_status_not_found`` meanwhile (open question 1; doc2x-mcp
#: retries not-found, which hints at the latter): three times the stated delay, then not-found is
#: what it says.
PDF_PICKUP_GRACE_SECONDS = 60.0
#: A status this provider gives a PDF job while the service has not picked its upload up yet.
STATUS_AWAITING_PICKUP = "awaiting_pickup"
#: Hosts the PDF API's files are downloaded from (besides the connection's own host), https only:
#: the export zips (S3 in China), uploads (Aliyun OSS) and the CDN's page images and figure crops.
DOWNLOAD_HOST_SUFFIXES = (".amazonaws.com.cn", ".aliyuncs.com", ".noedgeai.com")
#: What an export's url names, per format: the result call shows the uid's latest export, so a url
#: is taken only when it names the format asked for (doc2x-mcp's rule).
EXPORT_URL_MARKERS = {"md": "convert_md_", "tex": "convert_tex_", "docx": "convert_docx"}
EXPORT_FORMATS = frozenset(EXPORT_URL_MARKERS)
FORMULA_MODES = frozenset({"normal", "dollar"})

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
_STORE_ERROR_CODE = re.compile(r"<Code>([A-Za-z0-9_.\-]{1,64})</Code>")


def redact_url(url: Any) -> str:
    """A url as it may be logged: ``scheme://host/path``, no query, no credentials (presigned urls are secrets)."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    try:
        parts = urlsplit(url[:MAX_URL_CHARS])
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<a malformed url>"
    if not parts.scheme or not host:
        return "<a url that is not absolute>"
    path = parts.path if parts.path.isprintable() else repr(parts.path)[1:-1]
    return f"{parts.scheme}://{host}{port}{path[:QUOTE_CHARS]}"


def check_presigned_url(url: Any, *, uid: str | None = None) -> str:
    """A url from the service, checked before it is used.

    Absolute ``http(s)``, with a host, no credentials in it, printable with no spaces, at most
    ``MAX_URL_CHARS`` characters. Anything else is a :class:`Doc2XProtocolError` (naming the url redacted, never whole).
    """
    problem = None
    if not isinstance(url, str):
        problem = f"a {type(url).__name__}, not a string"
    elif not url or len(url) > MAX_URL_CHARS:
        problem = f"{len(url)} characters long (1-{MAX_URL_CHARS} accepted)"
    elif not url.isprintable() or any(character.isspace() for character in url):
        problem = "holding spaces or control characters"
    else:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not one
        except ValueError:
            parts = None
        if parts is None:
            problem = "malformed"
        elif parts.scheme not in ("http", "https") or not parts.hostname:
            problem = "not an absolute http(s) url"
        elif parts.username is not None or parts.password is not None or "@" in parts.netloc:
            problem = "carrying credentials"
    if problem:
        raise Doc2XProtocolError(f"Doc2X answered a url that is {problem}: {redact_url(url)}", uid=uid)
    return url


def preupload_request(model: str | None = None) -> Doc2XRequest:
    """Ask for a uid and a presigned url to PUT one PDF to.

    No body unless a model is chosen (as doc2x-mcp does): then ``{"model": "v2" | "v3-2026"}``.
    Nothing is billed yet: a preupload whose answer is lost is asked for again.
    """
    if model is None:
        return Doc2XRequest("POST", PREUPLOAD_PATH)
    if model not in PDF_MODELS:
        raise Doc2XInputError(
            f"Doc2X's PDF API takes the models {', '.join(sorted(PDF_MODELS))}, not {quote(model)}",
            code="invalid_model",
        )
    return _json_request(PREUPLOAD_PATH, {"model": model})


@dataclass(frozen=True)
class Doc2XPreupload:
    """A uid and the presigned url to PUT its PDF to, with when the url was issued.

    ``issued_at`` is a reading of the caller's monotonic clock when the answer arrived; the url is
    ``repr``-redacted (it is a secret for its five minutes).
    """

    uid: str
    url: str = field(repr=False)
    issued_at: float = 0.0

    @property
    def redacted_url(self) -> str:
        """The url as it may be logged."""
        return redact_url(self.url)

    def age(self, now: float) -> float:
        """Seconds since the url was issued, by the same clock as ``issued_at``."""
        return now - self.issued_at

    def is_young(self, now: float) -> bool:
        """Whether a PUT that failed may be sent again on this url (younger than its lifetime less a margin)."""
        return self.age(now) < PRESIGNED_URL_LIFETIME - PRESIGNED_URL_MARGIN


def read_preupload(data: Mapping[str, Any], *, issued_at: float = 0.0) -> Doc2XPreupload:
    """A preupload's ``data``: a uid and a presigned url, both checked."""
    uid = data.get("uid")
    if uid is None or uid == "":
        raise Doc2XProtocolError("Doc2X answered a preupload without a uid")
    uid = check_uid(uid)
    return Doc2XPreupload(uid, check_presigned_url(data.get("url"), uid=uid), issued_at)


def read_put_answer(answer: Doc2XAnswer, *, url: str, uid: str | None, source: str | None) -> None:
    """Read the object store's answer to a PUT: HTTP 200 is success, anything else raises.

    - 403: the store refused the url (expired, or its signature does not match): preupload again
      (``presigned_url_refused``).
    - 408, 429, 5xx: the upload did not land; the same url may be used again while it is young
      (``upload_failed``).
    - another 2xx: the store took the body but did not answer as documented; the PDF may be
      parsed and billed (:class:`Doc2XSubmitUncertainError`).
    - anything else: :class:`Doc2XProtocolError`.
    """
    status = answer.http_status
    if status == 200:
        return
    match = _STORE_ERROR_CODE.search(answer.body[:4096].decode("utf-8", "replace"))
    said = f" ({match.group(1)})" if match else ""
    where = f"the PUT of {source} to {redact_url(url)}"
    context: dict[str, Any] = {
        "http_status": status,
        "uid": uid,
        "source": source,
        "trace_id": answer.trace_id,
    }
    if 200 <= status < 300:
        raise Doc2XSubmitUncertainError(
            f"The object store answered {where} with HTTP {status}, not 200: it took the PDF, which "
            "Doc2X may parse and bill, so it is not sent again automatically",
            **context,
        )
    if status == 403:
        raise Doc2XTransientError(
            f"The object store refused {where} (HTTP 403{said}): the url expired or does not match; "
            "a new preupload is needed",
            code="presigned_url_refused",
            **context,
        )
    if status in (408, 429) or status >= 500:
        raise Doc2XTransientError(
            f"The object store failed {where} (HTTP {status}{said})", code="upload_failed", **context
        )
    raise Doc2XProtocolError(f"The object store answered {where} with HTTP {status}{said}", **context)


def pdf_status_request(uid: str) -> Doc2XRequest:
    """The status of one PDF's parse (and its pages, once it succeeded)."""
    check_uid(uid)
    return Doc2XRequest("GET", PDF_STATUS_PATH, params={"uid": uid}, uid=uid)


def read_pdf_status(uid: str, data: Mapping[str, Any], *, secrets: Iterable[str] = ()) -> Doc2XJobStatus:
    """A PDF job's status, its pages sorted by ``page_idx`` once it succeeded.

    A ``failed`` status carries ``detail`` (see :meth:`Doc2XJobStatus.failure`); the other shape of
    failure, an envelope error code, is raised by :func:`read_answer` before this reader is called.
    Statuses this provider does not know are kept, not finished. Every page must carry its
    ``page_idx`` (the map back to the images hangs on it), once.
    """
    status = data.get("status")
    if not isinstance(status, str) or not _CODE_SHAPE.fullmatch(status.lower()):
        raise Doc2XProtocolError(
            f"Doc2X answered a PDF status that is not one: {quote(status, secrets)}", uid=uid
        )
    status = status.lower()
    detail = data.get("detail")
    return Doc2XJobStatus(
        uid=uid,
        status=status,
        progress=_progress(data.get("progress")),
        detail=redact(detail[:QUOTE_CHARS], secrets) if isinstance(detail, str) and detail else None,
        result=_read_pdf_result(uid, data) if status == STATUS_SUCCESS else None,
    )


def _read_pdf_result(uid: str, data: Mapping[str, Any]) -> Doc2XResult:
    result = data.get("result")
    raw_pages = result.get("pages") if isinstance(result, dict) else None
    if not isinstance(raw_pages, list):
        raise Doc2XProtocolError("Doc2X answered a PDF result without a list of pages", uid=uid)
    pages = sorted(
        (_read_pdf_page(page, index, uid) for index, page in enumerate(raw_pages)), key=_page_index
    )
    for before, after in itertools.pairwise(pages):
        if before.page_idx == after.page_idx:
            raise Doc2XProtocolError(f"Doc2X answered page_idx {after.page_idx} twice", uid=uid)
    return Doc2XResult(uid=uid, pages=tuple(pages))


def _page_index(page: Doc2XPage) -> int:
    return page.page_idx


def _read_pdf_page(page: Any, index: int, uid: str) -> Doc2XPage:
    if not isinstance(page, dict):
        raise Doc2XProtocolError(
            f"Doc2X answered page {index} as a {type(page).__name__}, not an object", uid=uid
        )
    if page.get("page_idx") is None:
        raise Doc2XProtocolError(f"Doc2X answered page {index} without its page_idx", uid=uid)
    url = page.get("url")
    if url is not None and not isinstance(url, str):
        raise Doc2XProtocolError(
            f"Doc2X answered page {index} with url of type {type(url).__name__}", uid=uid
        )
    score = page.get("score")
    return dataclasses.replace(
        _read_page(page, index, uid),
        url=url or None,
        score=None if score is None else min(100, _whole_number(page, "score", index, uid, default=0)),
    )


def export_request(
    uid: str, *, filename: str | None = None, to: str = "md", formula_mode: str = "dollar"
) -> Doc2XRequest:
    """Start the export of a finished PDF parse (Markdown with ``$`` formulas by default); poll its result."""
    check_uid(uid)
    if to not in EXPORT_FORMATS or formula_mode not in FORMULA_MODES:
        raise Doc2XInputError(
            f"Doc2X exports to {', '.join(sorted(EXPORT_FORMATS))} with formula_mode "
            f"{' or '.join(sorted(FORMULA_MODES))}, not {quote(to)} / {quote(formula_mode)}",
            uid=uid,
        )
    body: dict[str, Any] = {"uid": uid, "to": to, "formula_mode": formula_mode}
    if filename is not None:
        body["filename"] = check_export_filename(filename, uid=uid)
    return _json_request(EXPORT_PATH, body, uid=uid)


def check_export_filename(filename: Any, *, uid: str | None = None) -> str:
    """An export's file name: a short printable name, no folder, no extension needed."""
    if (
        not isinstance(filename, str)
        or not filename
        or len(filename) > MAX_FILENAME_CHARS
        or not filename.isprintable()
        or any(character in filename for character in '/\\:*?"<>|')
        or filename in (".", "..")
    ):
        raise Doc2XInputError(
            f"An export's file name must be 1-{MAX_FILENAME_CHARS} printable characters with no "
            f"folder or wildcard, got {quote(filename) if isinstance(filename, str) else type(filename).__name__}",
            uid=uid,
        )
    return filename


def export_result_request(uid: str) -> Doc2XRequest:
    """The state of the uid's latest export, and its url once done."""
    check_uid(uid)
    return Doc2XRequest("GET", EXPORT_RESULT_PATH, params={"uid": uid}, uid=uid)


@dataclass(frozen=True)
class Doc2XExport:
    """Where a uid's latest export stands; ``url`` (a presigned GET url, redacted in ``repr``) once done."""

    uid: str
    status: str
    url: str | None = field(default=None, repr=False)

    @property
    def is_failed(self) -> bool:
        """The export failed."""
        return self.status == STATUS_FAILED

    def names(self, to: str = "md") -> bool:
        """Whether the export is done and its url names the format asked for (not an earlier export's)."""
        if self.status != STATUS_SUCCESS or not self.url:
            return False
        return EXPORT_URL_MARKERS[to] in urlsplit(self.url).path

    def failure(self) -> Doc2XError:
        """The error a failed export means."""
        return Doc2XJobFailedError("Doc2X reports the export failed", code="export_failed", uid=self.uid)


def read_export(uid: str, data: Mapping[str, Any]) -> Doc2XExport:
    r"""An export's ``data``: its status, and its url once done.

    The url may hold a literal ``\u0026`` for ``&`` (the vendor's sample does): it is replaced
    before the url is checked. An empty url is no url yet; statuses this provider does not know
    are kept, not finished.
    """
    status = data.get("status")
    if not isinstance(status, str) or not _CODE_SHAPE.fullmatch(status.lower()):
        raise Doc2XProtocolError(f"Doc2X answered an export status that is not one: {quote(status)}", uid=uid)
    url = data.get("url")
    if url is None or url == "":
        return Doc2XExport(uid, status.lower())
    if not isinstance(url, str):
        raise Doc2XProtocolError(f"Doc2X answered an export url of type {type(url).__name__}", uid=uid)
    return Doc2XExport(uid, status.lower(), check_presigned_url(url.replace("\\u0026", "&"), uid=uid))


def check_download_url(url: Any, *, own_base_url: str) -> str:
    """A url the provider downloads from, checked before a byte is sent.

    https on the hosts the PDF API's files live on (``DOWNLOAD_HOST_SUFFIXES``, on the default
    port), or the connection's own scheme, host and port (a local server). Anything else is refused.
    """
    try:
        checked = check_presigned_url(url)
        if _origin(checked) == _origin(own_base_url):
            return checked
        parts = urlsplit(checked)
        host = (parts.hostname or "").lower()
        if parts.scheme == "https" and parts.port in (None, 443) and host.endswith(DOWNLOAD_HOST_SUFFIXES):
            return checked
    except (Doc2XProtocolError, ValueError):
        pass
    raise Doc2XInputError(
        f"Not downloading {redact_url(url)}: only https urls on "
        f"{', '.join('*' + suffix for suffix in DOWNLOAD_HOST_SUFFIXES)} or on the connection's own host "
        "are fetched",
        code="download_refused",
    )


def _origin(url: str) -> tuple[str, str, int | None]:
    """A url's scheme, host (lower case) and port (the scheme's default when none is written)."""
    parts = urlsplit(url)
    return (
        parts.scheme,
        (parts.hostname or "").lower(),
        parts.port or {"http": 80, "https": 443}.get(parts.scheme),
    )


def _json_request(path: str, body: Mapping[str, Any], *, uid: str | None = None) -> Doc2XRequest:
    return Doc2XRequest(
        "POST", path, content=json.dumps(body).encode(), uid=uid, content_type="application/json"
    )
