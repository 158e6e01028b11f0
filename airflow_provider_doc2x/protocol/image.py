"""The Doc2X v2 image API as data: its calls, the images it takes, and the results it answers.

One image is sent as raw JPEG/PNG bytes, either to the synchronous parse (which answers the result)
or to the asynchronous submission (which answers a uid to poll the status of). Before a byte is
sent, an image the API would refuse, and might bill, is refused here by its size and its first
bytes (never by its name). The envelope around each answer is read by
:func:`~airflow_provider_doc2x.protocol.envelope.read_answer`; this module reads its ``data``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import airflow_provider_doc2x.protocol.envelope as envelope
from airflow_provider_doc2x.exceptions import Doc2XInputError, Doc2XProtocolError
from airflow_provider_doc2x.protocol.envelope import STATUS_SUCCESS, Doc2XJobStatus, Doc2XRequest, Doc2XResult

PARSE_PATH = "/api/v2/parse/img/layout"
SUBMIT_PATH = "/api/v2/async/parse/img/layout"
STATUS_PATH = "/api/v2/parse/img/layout/status"

#: Largest image the API takes ("<= 7M"); checked before a byte is sent.
MAX_IMAGE_BYTES = 7 * 1024 * 1024
#: How long Doc2X keeps a job's result.
RESULT_LIFETIME_SECONDS = 24 * 3600

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


def parse_request(image: bytes, *, source: str | None = None) -> Doc2XRequest:
    """Doc2X's synchronous parse of one image: answers when the result is ready."""
    return Doc2XRequest("POST", PARSE_PATH, content=image, bills=True, source=source)


def submit_request(image: bytes, *, source: str | None = None) -> Doc2XRequest:
    """Doc2X's asynchronous submission of one image: answers its job's uid."""
    return Doc2XRequest("POST", SUBMIT_PATH, content=image, bills=True, source=source)


def status_request(uid: str) -> Doc2XRequest:
    """The status (and, once done, the result) of one job."""
    envelope.check_uid(uid)
    return Doc2XRequest("GET", STATUS_PATH, params={"uid": uid}, uid=uid)


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


def read_result(data: Mapping[str, Any], *, uid: str | None = None) -> Doc2XResult:
    """Read the ``data`` of a synchronous parse or of a successful status into a result."""
    result_uid = envelope.check_uid(data["uid"]) if data.get("uid") is not None else uid
    if uid is not None and result_uid != uid:
        # Another job's result (a cache that ignores the query string, say): never stored as this one's.
        raise Doc2XProtocolError(f"Doc2X answered the result of uid {result_uid!r} for another uid", uid=uid)
    if result_uid is None:
        raise Doc2XProtocolError("Doc2X answered a result without a uid")
    result = data.get("result")
    raw_pages = result.get("pages") if isinstance(result, dict) else None
    if not isinstance(raw_pages, list):
        raise Doc2XProtocolError("Doc2X answered a result without a list of pages", uid=result_uid)
    pages = tuple(envelope.read_page(page, index, result_uid) for index, page in enumerate(raw_pages))
    return Doc2XResult(uid=result_uid, pages=pages, convert_zip=_convert_zip_text(data.get("convert_zip")))


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
    return envelope.check_uid(uid, source=request.source)


def read_status(uid: str, data: Mapping[str, Any], *, secrets: Iterable[str] = ()) -> Doc2XJobStatus:
    """A job's status. Statuses this provider does not know are kept as they are (not terminal)."""
    status = data.get("status")
    if not isinstance(status, str) or not envelope.CODE_SHAPE.fullmatch(status.lower()):
        raise Doc2XProtocolError(
            f"Doc2X answered a job status that is not one: {envelope.quote(status, secrets)}", uid=uid
        )
    progress = data.get("progress")
    detail = data.get("detail")
    status = status.lower()
    return Doc2XJobStatus(
        uid=uid,
        status=status,
        progress=envelope.read_progress(progress),
        detail=envelope.redact(detail[: envelope.QUOTE_CHARS], secrets)
        if isinstance(detail, str) and detail
        else None,
        result=read_result(data, uid=uid) if status == STATUS_SUCCESS else None,
    )
