"""The local Doc2X server's knobs: :class:`ServerConfig`, every one settable at run time.

Kept apart from :mod:`~airflow_provider_doc2x.local.server` so that the server's parts (the image
endpoints there, the PDF API in :mod:`~airflow_provider_doc2x.local.pdf`) all read one config
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from airflow_provider_doc2x import protocol


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
    #: The next N uploads are accepted and billed, then their answer stalls for ``stall_seconds``.
    stall_next: int = 0
    stall_seconds: float = 30.0
    #: Images a key may upload per ``rate_window`` seconds; an upload counts once its body has arrived.
    rate_limit: int = protocol.DEFAULT_RATE_LIMIT_IMAGES
    rate_window: float = protocol.DEFAULT_RATE_LIMIT_WINDOW
    #: Seconds a job's result is kept (Doc2X: 24 h).
    result_ttl: float = protocol.RESULT_LIFETIME_SECONDS
    #: Pages the account may still bill; None is unlimited.
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
