"""A PDF's PUT to its presigned url: one streamed upload, and what its failure means.

The PUT goes to the object store, never to the API: no Authorization header, no redirect, and the
url named in messages only redacted (``scheme://host/path``): its query is a credential for its
lifetime. What was sent decides what may be sent again, as for the API's uploads (see
:mod:`~airflow_provider_doc2x.transport`): a PUT that failed before its body was sent whole left
nothing in the store; one whose body was sent whole may have landed, and may be parsed and billed.
Whether and where to send it again is the submission's choice
(:mod:`~airflow_provider_doc2x.pdf.submission`).
"""

from __future__ import annotations

import asyncio
import os
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from airflow_provider_doc2x import protocol, transport
from airflow_provider_doc2x.exceptions import Doc2XError, Doc2XSubmitUncertainError, Doc2XTransientError
from airflow_provider_doc2x.settings import Doc2XSettings

#: Slowest upload rate a PUT's deadline allows for: the connection's timeout, plus the file's size
#: at this rate. Conservative for links outside mainland China, which the vendor warns about.
MIN_UPLOAD_BYTES_PER_SECOND = 64 * 1024
#: Bytes read from the file (in a thread) and sent per step of a PUT.
UPLOAD_CHUNK_BYTES = 256 * 1024
#: Cap on an object store's answer to a PUT: its status line decides, the body only names an error.
MAX_PUT_ANSWER_BYTES = 64 * 1024


def put_deadline(settings: Doc2XSettings, size: int) -> float:
    """Seconds a PUT of ``size`` bytes may take in all: the connection's timeout plus the size at the slowest rate."""
    return settings.timeout + size / MIN_UPLOAD_BYTES_PER_SECOND


async def put_file(
    settings: Doc2XSettings,
    url: str,
    path: str | os.PathLike,
    *,
    uid: str | None = None,
    source: str,
    sources: tuple[str, ...] = (),
    content_type: str = "application/pdf",
) -> protocol.Doc2XAnswer:
    """PUT a file to a presigned url, streamed from disk, once; return the store's answer.

    The body is read in chunks in a thread and sent with its ``Content-Length`` (no chunked
    encoding, which object stores refuse) and no ``Authorization`` header, under an overall
    deadline of :func:`put_deadline`. The answer is not judged here
    (:func:`~airflow_provider_doc2x.protocol.read_put_answer` does). Raises:

    - :class:`Doc2XTransientError` (code ``upload_failed``) when the exchange failed before the
      body was sent whole: the store has nothing, the same url may be used again while young;
    - :class:`Doc2XSubmitUncertainError` when the body was sent whole but no answer came: the store
      may hold the PDF, and Doc2X may parse and bill it. It names the PDF and its images.
    """
    checked = protocol.check_presigned_url(url, uid=uid)
    redacted = protocol.redact_url(checked)
    size = await asyncio.to_thread(os.path.getsize, path)
    body_sent = False

    async def trace(event: str, info: dict[str, Any]) -> None:
        nonlocal body_sent
        if event.endswith("send_request_body.complete"):
            body_sent = True

    async def exchange() -> protocol.Doc2XAnswer:
        shared = await transport.shared_client(transport.OUTSIDE_CLIENT)
        headers = {"Content-Type": content_type, "Content-Length": str(size)}
        async with (
            shared.gate,
            shared.uploads.stream(
                "PUT",
                checked,
                content=_file_chunks(path, size),
                headers=headers,
                timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
                extensions={"trace": trace},
            ) as response,
        ):
            try:
                body = transport.CappedBody(
                    response.headers.get("content-encoding", ""), MAX_PUT_ANSWER_BYTES
                )
                async for chunk in response.aiter_raw():
                    body.feed(chunk)
                data = body.finish()
            except (transport.CappedBody.TooLarge, zlib.error, ValueError):
                data = b""  # the status line decides; the body only names an error
            return protocol.Doc2XAnswer(response.status_code, data, response.headers)

    deadline = put_deadline(settings, size)
    try:
        return await asyncio.wait_for(exchange(), timeout=deadline)
    except asyncio.TimeoutError as error:
        reason = f"no complete answer within {deadline:.0f}s"
        raise _put_lost(reason, body_sent, redacted, uid, source, sources) from error
    except (httpx.TransportError, ValueError) as error:
        # ValueError: the file changed size under the upload, or a bad Content-Encoding header.
        reason = protocol.redact(f"{type(error).__name__}: {error or 'no detail'}", settings.secrets)
        reason = reason.replace(checked, redacted)
        raise _put_lost(reason, body_sent, redacted, uid, source, sources) from None


async def _file_chunks(path: str | os.PathLike, size: int) -> AsyncIterator[bytes]:
    """The file's bytes, a chunk at a time, each read in a thread; exactly ``size`` bytes or an error."""
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        sent = 0
        while chunk := await asyncio.to_thread(handle.read, UPLOAD_CHUNK_BYTES):
            sent += len(chunk)
            if sent > size:
                break
            yield chunk
        if sent != size:
            raise ValueError(f"the file changed size while it was being uploaded ({size} bytes declared)")
    finally:
        handle.close()  # at once, even when cancelled: closing a read-only file does not wait on the disk


def _put_lost(
    reason: str, body_sent: bool, redacted: str, uid: str | None, source: str, sources: tuple[str, ...]
) -> Doc2XError:
    if body_sent:
        images = (
            f" (images: {', '.join(sources[:10])}{', ...' if len(sources) > 10 else ''})" if sources else ""
        )
        return Doc2XSubmitUncertainError(
            f"The upload of {source}{images} to {redacted} was sent whole but {reason}; the store may "
            "hold it and Doc2X may parse and bill it, so it is not sent again automatically",
            uid=uid,
            source=source,
        )
    return Doc2XTransientError(
        f"The upload of {source} to {redacted} failed before it was sent whole: {reason}",
        code="upload_failed",
        uid=uid,
        source=source,
    )
