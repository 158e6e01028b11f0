"""The local Doc2X server's knobs: :class:`ServerConfig`, every one settable at run time.

Kept apart from :mod:`~airflow_provider_doc2x.local.server` so that the server's parts (the image
API in :mod:`~airflow_provider_doc2x.local.image_service`, the PDF API in
:mod:`~airflow_provider_doc2x.local.pdf_service` and its tasks) all read one config without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from airflow_provider_doc2x import protocol

#: What PDF status answers before pickup (``ServerConfig.pickup_status``).
PICKUP_STATUSES = ("processing", "not_found")
#: How a failed PDF task shows in status (``ServerConfig.pdf_failure_shape``).
FAILURE_SHAPES = ("status", "envelope")
#: When an upload enters its key's rate window (``ServerConfig.rate_counted_at``).
RATE_COUNTED_AT = ("arrival", "answer")


@dataclass
class ServerConfig:
    """The server's knobs; every one can be changed at run time with ``POST /local/config``."""

    #: The accepted key; None accepts any non-empty Bearer token.
    api_key: str | None = None
    engine: str = "simple"
    #: Seconds an async job stays ``processing`` (also how long a synchronous parse takes at least).
    processing_time: float = 1.0
    #: Seconds added before every answer.
    latency: float = 0.0
    #: Share of requests answered with an HTML 502 page instead (seeded, so repeatable).
    error_rate: float = 0.0
    #: The next N requests answer an HTML 503 page, whatever they are.
    fail_next: int = 0
    #: The next N status calls (image or PDF API) answer HTTP 429 ``request_limit_exceeded``, as a
    #: gateway that throttles polling does; nothing else is refused by it.
    throttle_status_next: int = 0
    #: The next N uploads are accepted and billed, then their answer stalls for ``stall_seconds``.
    stall_next: int = 0
    stall_seconds: float = 30.0
    #: Images a key may upload per ``rate_window`` seconds; an upload counts once its body has
    #: arrived, or at its answer (``rate_counted_at``).
    rate_limit: int = protocol.DEFAULT_RATE_LIMIT_IMAGES
    rate_window: float = protocol.DEFAULT_RATE_LIMIT_WINDOW
    #: When an upload enters the rate window: ``"arrival"``, once its body has arrived (refused at
    #: once when the window is full), or ``"answer"``, when its answer is given, after the answer
    #: wait (``answer_seconds``; refused then), as a server that counts late would. Doc2X does not
    #: say which it does.
    rate_counted_at: str = "arrival"
    #: Seconds an upload's answer takes after its body arrived (the server's own work on it), plus up
    #: to ``answer_jitter`` seconds more, drawn at random (seeded), so that answer times vary.
    answer_seconds: float = 0.0
    answer_jitter: float = 0.0
    #: Seconds a job's result is kept (Doc2X: 24 h).
    result_ttl: float = protocol.RESULT_LIFETIME_SECONDS
    #: Pages the account may still bill, images and PDF pages together; None is unlimited.
    quota: int | None = None
    seed: int = 0
    #: Seconds each upload's body takes to arrive (0: at once). The server reads the body in step:
    #: uvicorn stops reading the socket once 64 KiB wait unread, the kernel's buffers fill, and a
    #: client with more to send than they hold is held back. A small body fits in the buffers: its
    #: client is done sending and waits for the answer. Either way the upload is in flight
    #: (``uploads_in_flight``) until it is answered, and it enters the rate window (and is billed)
    #: once its body has arrived. Uploads on the way follow a change of this knob or the next.
    upload_seconds: float = 0.0
    #: Bytes per second at which each upload's body is read (0: unlimited). With ``upload_seconds``
    #: too, the slower of the two paces the body.
    upload_bandwidth: float = 0.0
    #: The next N uploads are cut off: once ``reset_after_bytes`` of the body have arrived (or the
    #: whole body, if it is shorter), the server resets the TCP connection (RST) and sends no answer.
    #: A cut upload is neither billed nor counted in the rate window; ``uploads_reset`` counts it.
    #: A client still sending (its body is bigger than the socket buffers hold; on loopback the
    #: client's send buffer alone grows to a few MiB unless it sets ``SO_SNDBUF``) gets ECONNRESET or
    #: EPIPE from its send; one already waiting for the answer gets ECONNRESET from its read. httpx
    #: reports the first as ``RemoteProtocolError`` (httpcore swallows the write error and finds the
    #: connection closed), the second as ``ReadError``.
    reset_next_uploads: int = 0
    reset_after_bytes: int = 65536
    #: Content sha256s whose status answers stay malformed, for as long as they are listed: an image
    #: job's status (its ``status`` is not a string), and the result of a PDF task holding a page of
    #: one of them (that page answers the ``page_idx`` of its neighbour, so one ``page_idx`` comes
    #: twice; a one-page PDF's page answers none). A PDF page's hash is its image's (a JPEG is
    #: embedded as it is). What a misbehaving service or proxy does to some jobs and not others.
    malformed_status: list[str] = field(default_factory=list)
    #: Quote the ``Authorization`` header a request carried in every error answer, as a careless
    #: server might: the ``msg`` of every API error envelope (HTTP 4xx/5xx or 200), a PDF task's
    #: ``failed`` status ``detail``, a gateway's HTML error page, and the object store's and FastAPI's
    #: own errors. A request without the header gets the usual answer. For tests that the key a
    #: server echoes never reaches logs, XCom or files.
    echo_key: bool = False

    # The PDF API (preupload, PUT to a presigned url, status, export). The slow-link knobs above
    # (upload_seconds, upload_bandwidth, reset_next_uploads, reset_after_bytes) pace and cut the
    # PUTs too, which count in uploads_in_flight and uploads_reset. latency, error_rate and
    # fail_next apply to the PDF API's calls (preupload, status, export) as to the image API's, not
    # to the object store's (PUT, export download, CDN); images and PDF pages share the quota.
    # result_ttl bounds a PDF task's life from its upload (status, export and CDN answer
    # parse_status_not_found or 404 after it).

    #: Seconds a presigned PUT url stays valid from its preupload (Doc2X: 5 min). The url keeps the
    #: value it was issued with; a PUT after it is refused with HTTP 403.
    upload_url_ttl: float = 300.0
    #: Largest PDF (bytes) a task parses. The PUT takes a bigger body (the store does not know the
    #: limit) without keeping it, and the task fails with ``parse_file_too_large``. Doc2X's error
    #: table says 300 MB, its preupload page 1 GB: the stricter is the default.
    pdf_max_bytes: int = 300 * 1024 * 1024
    #: Seconds between a PUT's 200 and the service picking the task up (Doc2X: under 20 s).
    pickup_delay: float = 1.0
    #: What status answers before pickup: ``"processing"`` (progress 0) or ``"not_found"`` (the
    #: envelope error ``parse_status_not_found``); Doc2X's answer is not documented.
    pickup_status: str = "processing"
    #: Pages parsed at once, over all PDF tasks (first come, first served; a queued page waits).
    pdf_page_workers: int = 2
    #: Seconds each PDF page takes at least (the engine's own time included).
    pdf_page_seconds: float = 0.2
    #: Most pages a PDF may have; more fail the task with ``parse_page_limit_exceeded`` (Doc2X: 2000).
    max_pages: int = 2000
    #: Most PDF tasks in progress (picked up, not finished) per server; a task picked up beyond it
    #: fails with ``parse_task_limit_exceeded``. None: no limit (Doc2X's cap is not published).
    max_tasks_in_progress: int | None = None
    #: Most pages in progress (all pages of the tasks in progress); a task that would go beyond it
    #: fails with ``parse_concurrency_limit``. None: no limit (Doc2X's cap is not published).
    max_pages_in_progress: int | None = None
    #: Preuploads a key may make per ``rate_window`` seconds; more get HTTP 429
    #: ``request_limit_exceeded`` with ``Retry-After``. None: no limit.
    preupload_rate_limit: int | None = None
    #: The next N PDF tasks that pass pickup fail with ``pdf_fail_reason`` once their pages are parsed.
    pdf_fail_next: int = 0
    #: The code (or free text) those tasks fail with, e.g. ``"parse_error"`` or ``"parse_timeout"``.
    pdf_fail_reason: str = "parse_error"
    #: How a PDF task's failure shows in status (every failure: injected, a page's
    #: ``<!-- doc2x-fail: CODE -->``, size, type, limits, quota): ``"status"`` is
    #: ``{"status": "failed", "detail": CODE}`` in a success envelope, ``"envelope"`` the error
    #: ``{"code": CODE, "msg": ...}``. Doc2X shows both; its choice is not documented.
    pdf_failure_shape: str = "status"
    #: The next N PUTs are read, then answered HTTP 503 (an XML error); the url may be used again.
    put_fail_next: int = 0
    #: Seconds a task's figure links (``/local/cdn/...``) work after the task finished; then 403.
    cdn_ttl: float = protocol.RESULT_LIFETIME_SECONDS
    #: Seconds an export stays ``processing``.
    export_seconds: float = 0.5
    #: Write the export url's ``&`` as a literal ``\u0026``, as Doc2X sometimes does.
    export_url_escaped: bool = False
    #: Whether a failed PDF task bills its pages (every page of a PDF that could be read, whatever
    #: the failure, but a quota failure). Doc2X does not say: False bills only tasks that succeed.
    bill_failed_pdfs: bool = False

    def __post_init__(self) -> None:
        """Check the knobs that take one of a few values.

        Raises:
            ValueError: ``rate_counted_at``, ``pickup_status`` or ``pdf_failure_shape`` is none of its values.
        """
        if self.rate_counted_at not in RATE_COUNTED_AT:
            raise ValueError(
                f"rate_counted_at must be one of {RATE_COUNTED_AT}, not {self.rate_counted_at!r}"
            )
        if self.pickup_status not in PICKUP_STATUSES:
            raise ValueError(f"pickup_status must be one of {PICKUP_STATUSES}, not {self.pickup_status!r}")
        if self.pdf_failure_shape not in FAILURE_SHAPES:
            raise ValueError(
                f"pdf_failure_shape must be one of {FAILURE_SHAPES}, not {self.pdf_failure_shape!r}"
            )

    def updated(self, changes: dict[str, Any]) -> ServerConfig:
        """Return a copy with ``changes`` applied.

        Raises:
            ValueError: a change names no knob.
        """
        known = {item.name for item in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"Unknown settings {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **changes)
