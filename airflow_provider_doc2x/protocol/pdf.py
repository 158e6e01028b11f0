"""The Doc2X v2 PDF API (the bulk lane) as data: its calls, its urls, and what its answers mean.

Flow: preupload (a uid and a presigned PUT url) -> PUT the PDF to the url -> poll the status ->
export the Markdown as a zip -> download it. The PUT and the downloads go to object storage, not
to the API: they carry no key, and their urls are secrets of a few minutes, never logged whole
(:func:`redact_url`). Every url an answer holds is checked before it is used, and a download goes
only to the hosts the PDF API's files live on, or to the connection's own host.

The envelope around each answer, and the error codes of both APIs, are read by
:mod:`~airflow_provider_doc2x.protocol.envelope`; this module reads the PDF API's ``data``.
:class:`Doc2XPreupload` reads ``PRESIGNED_URL_LIFETIME`` and ``PRESIGNED_URL_MARGIN`` as this
module's globals when it judges a url's age: to change them, set them on this module, not on the
package (which holds a copy of each name).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import airflow_provider_doc2x.protocol.envelope as envelope
from airflow_provider_doc2x.exceptions import (
    Doc2XError,
    Doc2XInputError,
    Doc2XJobFailedError,
    Doc2XProtocolError,
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
)
from airflow_provider_doc2x.protocol.envelope import (
    STATUS_FAILED,
    STATUS_SUCCESS,
    Doc2XAnswer,
    Doc2XJobStatus,
    Doc2XPage,
    Doc2XRequest,
    Doc2XResult,
)

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
#: The error code in an object store's XML answer (S3's and OSS's ``<Code>``), quoted in messages.
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
    return f"{parts.scheme}://{host}{port}{path[: envelope.QUOTE_CHARS]}"


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
            f"Doc2X's PDF API takes the models {', '.join(sorted(PDF_MODELS))}, not {envelope.quote(model)}",
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
    uid = envelope.check_uid(uid)
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
            f"The object store failed {where} (HTTP {status}{said})",
            code="upload_failed",
            retry_after=answer.retry_after,  # a floor of the back-off before the same PUT again
            **context,
        )
    raise Doc2XProtocolError(f"The object store answered {where} with HTTP {status}{said}", **context)


def pdf_status_request(uid: str) -> Doc2XRequest:
    """The status of one PDF's parse (and its pages, once it succeeded)."""
    envelope.check_uid(uid)
    return Doc2XRequest("GET", PDF_STATUS_PATH, params={"uid": uid}, uid=uid)


def read_pdf_status(uid: str, data: Mapping[str, Any], *, secrets: Iterable[str] = ()) -> Doc2XJobStatus:
    """A PDF job's status, its pages sorted by ``page_idx`` once it succeeded.

    A ``failed`` status carries ``detail`` (see :meth:`Doc2XJobStatus.failure`); the other shape of
    failure, an envelope error code, is raised by :func:`read_answer` before this reader is called.
    Statuses this provider does not know are kept, not finished. Every page must carry its
    ``page_idx`` (the map back to the images hangs on it), once.
    """
    status = data.get("status")
    if not isinstance(status, str) or not envelope.CODE_SHAPE.fullmatch(status.lower()):
        raise Doc2XProtocolError(
            f"Doc2X answered a PDF status that is not one: {envelope.quote(status, secrets)}", uid=uid
        )
    status = status.lower()
    detail = data.get("detail")
    return Doc2XJobStatus(
        uid=uid,
        status=status,
        progress=envelope.read_progress(data.get("progress")),
        detail=envelope.redact(detail[: envelope.QUOTE_CHARS], secrets)
        if isinstance(detail, str) and detail
        else None,
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
        envelope.read_page(page, index, uid),
        url=url or None,
        score=None
        if score is None
        else min(100, envelope.whole_number(page, "score", index, uid, default=0)),
    )


def export_request(
    uid: str, *, filename: str | None = None, to: str = "md", formula_mode: str = "dollar"
) -> Doc2XRequest:
    """Start the export of a finished PDF parse (Markdown with ``$`` formulas by default); poll its result."""
    envelope.check_uid(uid)
    if to not in EXPORT_FORMATS or formula_mode not in FORMULA_MODES:
        raise Doc2XInputError(
            f"Doc2X exports to {', '.join(sorted(EXPORT_FORMATS))} with formula_mode "
            f"{' or '.join(sorted(FORMULA_MODES))}, not {envelope.quote(to)} / {envelope.quote(formula_mode)}",
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
            f"folder or wildcard, got {envelope.quote(filename) if isinstance(filename, str) else type(filename).__name__}",
            uid=uid,
        )
    return filename


def export_result_request(uid: str) -> Doc2XRequest:
    """The state of the uid's latest export, and its url once done."""
    envelope.check_uid(uid)
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
    if not isinstance(status, str) or not envelope.CODE_SHAPE.fullmatch(status.lower()):
        raise Doc2XProtocolError(
            f"Doc2X answered an export status that is not one: {envelope.quote(status)}", uid=uid
        )
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
