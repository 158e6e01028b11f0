r"""The local server's PDF API over HTTP: preupload, PUT to a presigned url, status, export, the CDN.

It answers as the PDF API notes describe, for the provider's bulk lane (images of one size packed
losslessly into multi-page PDFs with img2pdf):

- ``POST /api/v2/parse/preupload`` (Bearer key; body none, or JSON ``{"model": "v2" | "v3-2026"}``;
  ``file_name`` and other fields are ignored; another model is the error ``invalid_params``) gives
  ``{"uid", "url"}``: a presigned PUT url on the server itself,
  ``/local/oss/tmp/<uid>.pdf?X-Amz-...&X-Amz-Signature=...``. Past ``preupload_rate_limit`` per
  ``rate_window`` it answers HTTP 429 ``request_limit_exceeded``; with no quota left,
  ``parse_quota_limit``.
- ``PUT`` to that url, no key: the raw PDF (or ``multipart/form-data`` holding it, as pdfdeal
  sends). The store answers HTTP 200 (with an ``ETag``) and the task exists; it refuses with HTTP
  403 and an XML error a wrong signature, an expired url (``upload_url_ttl``), and a url that
  already answered a 200. A PUT that got no 200 (cut by a reset, or an injected 503) may be sent
  again on the same url. The upload's size and type are not checked here: the task fails later.
- ``GET /api/v2/parse/status?uid=``: the task's state, as
  :mod:`~airflow_provider_doc2x.local.pdf_tasks` runs it: ``processing`` with its progress, then
  ``success`` with its ``result``. A failure shows as ``pdf_failure_shape`` says: ``failed`` with
  ``detail``, or an envelope error code.
- ``GET /local/cdn/<uid>_<page_idx>.jpg?x=..&y=..&w=..&h=..&r=0``, no key: a finished task's page
  image, cropped; the links work for ``cdn_ttl`` after the task finished, then answer 403.
- ``POST /api/v2/convert/parse`` (``uid``, ``to`` md|tex|docx, ``formula_mode`` normal|dollar, all
  required; ``filename``, ``merge_cross_page_forms``, ``formula_level`` optional; a bad one is
  ``invalid_params``; a task that has not succeeded is ``convert_not_ready``) answers
  ``{"status": "processing", "url": ""}``; ``GET /api/v2/convert/parse/result?uid=`` and the
  download of its url, no key: see :mod:`~airflow_provider_doc2x.local.pdf_exports`.

Images and PDF pages share the ``quota``. ``/local/stats`` counts preuploads per model asked
(``preuploads_by_model``) beside the tasks' own counts.

:class:`PdfService` answers the calls: it checks the key and the request, and keeps the presigned
uploads; the tasks live in :class:`~airflow_provider_doc2x.local.pdf_tasks.PdfTasks`, the exports
in :class:`~airflow_provider_doc2x.local.pdf_exports.PdfExports`. :func:`pdf_routes` maps the
routes onto it. It reaches the rest of the server (knobs, key check, the upload link, the engine)
through :class:`~airflow_provider_doc2x.local.host.Host`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from airflow_provider_doc2x.local.answers import Refused, api_error, authorization_quote, success
from airflow_provider_doc2x.local.config import ServerConfig
from airflow_provider_doc2x.local.exports import DEFAULT_STEM, FORMATS, FORMULA_MODES, MEDIA_TYPES, Box, crop
from airflow_provider_doc2x.local.host import Host
from airflow_provider_doc2x.local.limits import admit
from airflow_provider_doc2x.local.objectstore import Presigner, multipart_file, store_error
from airflow_provider_doc2x.local.pdf_exports import EXPORT_ROUTE, PdfExports
from airflow_provider_doc2x.local.pdf_tasks import (
    DEFAULT_MODEL,
    FAILED,
    MODELS,
    PROCESSING,
    SUCCESS,
    PdfTask,
    PdfTasks,
)

PREUPLOAD_PATH = "/api/v2/parse/preupload"
PDF_STATUS_PATH = "/api/v2/parse/status"
CONVERT_PATH = "/api/v2/convert/parse"
CONVERT_RESULT_PATH = "/api/v2/convert/parse/result"
#: The store's paths (routes): uploads by PUT, and the CDN's page images (exports: ``EXPORT_ROUTE``).
UPLOAD_ROUTE = "/local/oss/tmp/{name}"
CDN_ROUTE = "/local/cdn/{name}"

#: This server's code for a bad parameter (Doc2X's is not documented).
PARAMETER_ERROR = "invalid_params"
#: This server's code for an export asked of a task that has not succeeded.
NOT_READY = "convert_not_ready"
NOT_FOUND = "parse_status_not_found"
#: Room kept beyond ``pdf_max_bytes`` for a multipart body's headers.
MULTIPART_ROOM = 64 * 1024
ROTATIONS = (0, 90, 180, 270)
_CDN_NAME = re.compile(r"(?P<uid>[0-9a-f-]{36})_(?P<page>\d+)\.jpg")


@dataclass
class Upload:
    """A presigned PUT url handed out by preupload."""

    uid: str
    model: str
    #: The server's URL as the client reached it; the task's links start with it.
    base_url: str
    issued: float
    #: ``upload_url_ttl`` when the url was issued.
    ttl: float
    #: Whether a PUT on it answered 200 (then it is spent).
    used: bool = False


class PdfService:
    """The PDF API's calls, for the routes of :func:`pdf_routes`.

    Args:
        host: the server around it.
    """

    def __init__(self, host: Host) -> None:
        """Start with no uploads, no tasks and zeroed counters."""
        self.host = host
        self.presigner = Presigner()
        self.tasks = PdfTasks(host)
        self.exports = PdfExports(host, self.presigner)
        self.start()

    def start(self) -> None:
        """Forget every upload and zero the counters."""
        self.uploads: dict[str, Upload] = {}
        #: Per key (its Authorization header): when each preupload of the rate window was admitted.
        self.windows: defaultdict[str, deque[float]] = defaultdict(deque)
        self.counts: Counter[str] = Counter()
        #: Preuploads per model asked (no model asked counts as the default).
        self.preuploads_by_model: Counter[str] = Counter()

    def reset(self) -> None:
        """Stop every task's work and start over (``POST /local/reset``)."""
        self.tasks.reset()
        self.exports.start()
        self.start()

    def reconfigured(self) -> None:
        """Follow a change of the knobs (more page workers take waiting pages at once)."""
        self.tasks.reconfigured()

    @property
    def config(self) -> ServerConfig:
        """The server's knobs now."""
        return self.host.config

    def stats(self) -> dict[str, Any]:
        """Count the PDF API's work for ``GET /local/stats``."""
        return {
            "preuploads": self.counts["preuploads"],
            "preuploads_rate_limited": self.counts["preuploads_rate_limited"],
            "puts": self.counts["puts"],
            "puts_refused": self.counts["puts_refused"],
            "puts_failed": self.counts["puts_failed"],
            "preuploads_by_model": dict(self.preuploads_by_model),
            **self.tasks.stats(),
            "exports": self.exports.counts["exports"],
        }

    # Preupload and PUT

    async def preupload(self, request: Request) -> dict[str, Any]:
        """Hand out a uid and its presigned PUT url: the preupload's ``data``.

        Raises:
            Refused: 401, ``invalid_params``, HTTP 429, or ``parse_quota_limit``.
        """
        self.host.requests["preupload"] += 1
        self.host.authorize(request)
        model = preupload_model(await request.body())
        settings = self.config
        if settings.preupload_rate_limit is not None:
            try:
                admit(
                    self.windows[request.headers["authorization"]],
                    limit=settings.preupload_rate_limit,
                    seconds=settings.rate_window,
                    now=time.monotonic(),
                )
            except Refused:
                self.counts["preuploads_rate_limited"] += 1
                raise
        left = self.host.quota_left()
        if left is not None and left <= 0:
            raise api_error("parse_quota_limit", "No page quota left")
        self.purge()
        uid = str(uuid.uuid4())
        base_url = str(request.base_url).rstrip("/")
        self.uploads[uid] = Upload(uid, model, base_url, issued=time.monotonic(), ttl=settings.upload_url_ttl)
        self.counts["preuploads"] += 1
        self.preuploads_by_model[model] += 1
        url = self.presigner.url(base_url, "PUT", upload_path(uid), expires=settings.upload_url_ttl)
        return {"uid": uid, "url": url}

    async def put(self, request: Request, name: str) -> Response:
        """Take a PUT on a presigned url: check the url, receive the body, create the task.

        Raises:
            Refused: the store's 403 (signature, expiry, reuse) or an injected 503, as XML.
            ConnectionGone: the link cut the upload (``reset_next_uploads``) or the client left.
        """
        self.host.requests["put"] += 1
        self.counts["puts"] += 1
        path = request.url.path
        try:
            self.presigner.check("PUT", path, request.query_params)
            upload = self.uploads.get(name.removesuffix(".pdf"))
            if upload is None:
                raise store_error(403, "AccessDenied", "No upload is expected at this url", path)
            self.check_unused(upload, path)
            if time.monotonic() >= upload.issued + upload.ttl:
                raise store_error(403, "AccessDenied", "Request has expired", path)
        except Refused:
            self.counts["puts_refused"] += 1
            raise
        limit = self.config.pdf_max_bytes
        with self.host.upload_in_flight():
            body, size = await self.host.receive_body(request, keep=limit + MULTIPART_ROOM)
        settings = self.config
        if settings.put_fail_next > 0:
            self.host.config = replace(settings, put_fail_next=settings.put_fail_next - 1)
            self.counts["puts_failed"] += 1
            raise store_error(503, "ServiceUnavailable", "Please reduce your request rate.", path)
        try:
            self.check_unused(upload, path)  # another PUT on this url may have won meanwhile
        except Refused:
            self.counts["puts_refused"] += 1
            raise
        upload.used = True
        content_type = request.headers.get("content-type", "")
        if size <= len(body) and content_type.lower().startswith("multipart/form-data"):
            body = multipart_file(body, content_type) or body
            size = len(body)
        digest = hashlib.md5(body, usedforsecurity=False).hexdigest().upper()
        self.tasks.add(
            upload.uid, upload.model, upload.base_url, b"" if size > limit else body, oversize=size > limit
        )
        return Response(status_code=200, headers={"ETag": f'"{digest}"'})

    def check_unused(self, upload: Upload, path: str) -> None:
        """Refuse a url that already answered a 200.

        Raises:
            Refused: HTTP 403 ``AccessDenied``.
        """
        if upload.used:
            raise store_error(403, "AccessDenied", "This upload url was already used", path)

    # Status

    def live_task(self, uid: str) -> PdfTask:
        """The task of a uid, while its result lives.

        Raises:
            Refused: ``parse_status_not_found`` (unknown, not uploaded yet, or expired).
        """
        task = self.tasks.live(uid)
        if task is None:
            raise api_error(NOT_FOUND, f"No task with uid {uid!r}, or its result expired")
        return task

    def status(self, request: Request, uid: str) -> dict[str, Any]:
        """Report a PDF task's status ``data``.

        Raises:
            Refused: 401, ``parse_status_not_found``, or the task's failure as an envelope error.
        """
        self.host.requests["pdf_status"] += 1
        self.host.authorize(request)
        task = self.live_task(uid)
        if not task.picked_up:
            if self.config.pickup_status == "not_found":
                raise api_error(NOT_FOUND, f"No task with uid {uid!r}, or its result expired")
            return {"status": PROCESSING, "progress": 0}
        if task.status == FAILED:
            assert task.failure is not None
            if task.failure_shape == "envelope":
                raise api_error(task.failure, f"Failed: {task.failure}")
            detail = task.failure
            if self.config.echo_key and "authorization" in request.headers:
                detail = f"{detail} {authorization_quote(request.headers['authorization'])}"
            return {"status": FAILED, "progress": task.progress, "detail": detail}
        if task.status == SUCCESS:
            return {"status": SUCCESS, "progress": 100, "result": self.tasks.result(task)}
        return {"status": PROCESSING, "progress": task.progress}

    # The CDN

    async def cdn(self, name: str, query: Mapping[str, str]) -> Response:
        """Serve a page image, cropped to ``x, y, w, h`` and turned by ``r`` when the query asks.

        Raises:
            Refused: 404 for an unknown image, 403 once ``cdn_ttl`` has passed, 400 for a bad query.
        """
        match = _CDN_NAME.fullmatch(name)
        task = self.tasks.tasks.get(match["uid"]) if match else None
        resource = f"/local/cdn/{name}"
        if match is None or task is None or task.status != SUCCESS or task.document is None:
            raise store_error(404, "NoSuchKey", "The specified key does not exist.", resource)
        assert task.finished is not None
        now = time.monotonic()
        if now > task.finished + self.config.cdn_ttl or now > task.uploaded + self.config.result_ttl:
            raise store_error(403, "AccessDenied", "The link has expired", resource)
        index = int(match["page"])
        if index >= task.page_count:
            raise store_error(404, "NoSuchKey", "The specified key does not exist.", resource)
        box, rotation = crop_query(query, resource)
        image = await asyncio.to_thread(task.document.page, index)
        if image.blank:
            raise store_error(404, "NoSuchKey", "The page holds no image.", resource)
        return Response(await asyncio.to_thread(crop, image.data, box, rotation), media_type="image/jpeg")

    # Exports

    async def export(self, request: Request) -> dict[str, Any]:
        """Start an export of a finished task: the convert call's ``data``.

        Raises:
            Refused: 401, ``invalid_params``, ``parse_status_not_found``, ``convert_not_ready``.
        """
        self.host.requests["convert"] += 1
        self.host.authorize(request)
        asked = export_parameters(await request.body())
        task = self.live_task(asked["uid"])
        if task.status != SUCCESS:
            raise api_error(NOT_READY, f"The task {task.uid!r} has not parsed successfully")
        self.exports.ask(task, asked["to"], asked["formula_mode"], asked.get("filename") or DEFAULT_STEM)
        return {"status": PROCESSING, "url": ""}

    async def export_result(self, request: Request, uid: str) -> dict[str, Any]:
        """Report the uid's latest export: the convert result call's ``data``.

        Raises:
            Refused: 401, or ``parse_status_not_found`` (no task, or no export asked).
        """
        self.host.requests["convert_result"] += 1
        self.host.authorize(request)
        task = self.live_task(uid)
        export = self.exports.latest(uid)
        if export is None:
            raise api_error(NOT_FOUND, f"No export of uid {uid!r} was asked for")
        return await self.exports.state(task, export, str(request.base_url).rstrip("/"))

    def download(self, request: Request, uid: str, name: str) -> Response:
        """Serve an export's file to a presigned GET.

        Raises:
            Refused: the store's 403 (signature) or 404 (no such file, or the task expired).
        """
        path = request.url.path
        self.presigner.check("GET", path, request.query_params)
        data = self.exports.files.get((uid, name))
        if data is None or self.tasks.live(uid) is None:
            raise store_error(404, "NoSuchKey", "The specified key does not exist.", path)
        media_type = MEDIA_TYPES["docx" if name.endswith(".docx") else "zip"]
        return Response(data, media_type=media_type)

    # Housekeeping

    def purge(self) -> None:
        """Forget expired tasks, their exports, and urls that can no longer be used."""
        now = time.monotonic()
        for uid in self.tasks.purge():
            self.exports.forget(uid)
        for uid, upload in list(self.uploads.items()):
            if now > upload.issued + max(upload.ttl, self.config.result_ttl):
                del self.uploads[uid]


def pdf_routes(pdf: PdfService) -> APIRouter:
    """Map the PDF API's routes onto ``pdf``; the keyless ones (PUT, download, CDN) are counted as such."""
    router = APIRouter()

    @router.post(PREUPLOAD_PATH)
    async def preupload(request: Request) -> Response:
        return success(await pdf.preupload(request))

    @router.put(UPLOAD_ROUTE)
    async def put_upload(request: Request, name: str) -> Response:
        pdf.host.count_keyless(request, "put")
        return await pdf.put(request, name)

    @router.get(PDF_STATUS_PATH)
    async def pdf_status(request: Request, uid: str = "") -> Response:
        return success(pdf.status(request, uid))

    @router.post(CONVERT_PATH)
    async def convert(request: Request) -> Response:
        return success(await pdf.export(request))

    @router.get(CONVERT_RESULT_PATH)
    async def convert_result(request: Request, uid: str = "") -> Response:
        return success(await pdf.export_result(request, uid))

    @router.get(EXPORT_ROUTE)
    async def export_file(request: Request, uid: str, name: str) -> Response:
        pdf.host.count_keyless(request, "export")
        return pdf.download(request, uid, name)

    @router.get(CDN_ROUTE)
    async def cdn(request: Request, name: str) -> Response:
        pdf.host.count_keyless(request, "cdn")
        return await pdf.cdn(name, request.query_params)

    return router


def upload_path(uid: str) -> str:
    """The path of a presigned PUT url."""
    return UPLOAD_ROUTE.format(name=f"{uid}.pdf")


def json_object(body: bytes) -> dict[str, Any]:
    """Read a JSON object body; an empty body is ``{}``.

    Raises:
        Refused: ``invalid_params`` for anything else.
    """
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        raise api_error(PARAMETER_ERROR, "The body must be a JSON object") from None
    if not isinstance(value, dict):
        raise api_error(PARAMETER_ERROR, "The body must be a JSON object")
    return value


def preupload_model(body: bytes) -> str:
    """The model a preupload asks for: none is v2; ``file_name`` and other fields are ignored.

    Raises:
        Refused: ``invalid_params`` for a bad body or another model.
    """
    model = json_object(body).get("model")
    if model is None:
        return DEFAULT_MODEL
    if model not in MODELS:
        raise api_error(PARAMETER_ERROR, f"model must be one of {list(MODELS)}")
    return str(model)


def export_parameters(body: bytes) -> dict[str, Any]:
    """Check an export's parameters.

    Raises:
        Refused: ``invalid_params``, naming the first bad one.
    """
    asked = json_object(body)
    uid = asked.get("uid")
    if not isinstance(uid, str) or not uid:
        raise api_error(PARAMETER_ERROR, "uid is required")
    if asked.get("to") not in FORMATS:
        raise api_error(PARAMETER_ERROR, f"to is required, one of {list(FORMATS)}")
    if asked.get("formula_mode") not in FORMULA_MODES:
        raise api_error(PARAMETER_ERROR, f"formula_mode is required, one of {list(FORMULA_MODES)}")
    filename = asked.get("filename")
    if filename is not None and (
        not isinstance(filename, str)
        or not filename
        or len(filename) > 200
        or any(character in filename for character in "/\\\0")
        or filename in {".", ".."}
    ):
        raise api_error(PARAMETER_ERROR, "filename must be a plain file name without an extension")
    merge = asked.get("merge_cross_page_forms")
    if merge is not None and not isinstance(merge, bool):
        raise api_error(PARAMETER_ERROR, "merge_cross_page_forms must be a boolean")
    level = asked.get("formula_level")
    if level is not None and (isinstance(level, bool) or level not in (0, 1, 2)):
        raise api_error(PARAMETER_ERROR, "formula_level must be 0, 1 or 2")
    return asked


def crop_query(query: Mapping[str, str], resource: str) -> tuple[Box | None, int]:
    """Read a CDN query: the crop box (all of x, y, w, h, or none) and the turn ``r``.

    Raises:
        Refused: HTTP 400 ``InvalidArgument`` for a partial or bad box, or a turn not a multiple of 90.
    """
    try:
        values = {key: int(query[key]) for key in ("x", "y", "w", "h", "r") if key in query}
    except ValueError:
        raise store_error(400, "InvalidArgument", "x, y, w, h and r must be integers", resource) from None
    rotation = values.pop("r", 0)
    if rotation % 360 not in ROTATIONS:
        raise store_error(400, "InvalidArgument", "r must be a multiple of 90", resource)
    if not values:
        return None, rotation % 360
    if len(values) != 4 or values["w"] <= 0 or values["h"] <= 0 or values["x"] < 0 or values["y"] < 0:
        raise store_error(400, "InvalidArgument", "x, y, w and h go together, w and h above 0", resource)
    return (values["x"], values["y"], values["w"], values["h"]), rotation % 360
