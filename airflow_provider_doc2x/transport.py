"""Moving bytes to and from Doc2X: one implementation for the worker and the triggerer.

Every call runs as a coroutine through one ``httpx.AsyncClient`` shared by everything on an event
loop: a triggerer's thousand triggers share one connection pool and one TLS context. A worker's
synchronous calls run on a private event loop in a background thread of its process
(:func:`run_sync`), so the worker and the triggerer share this code, its deadlines, its caps and
its retries, instead of keeping two copies that drift apart.

What the network sends is treated as hostile:

- **An overall deadline per request.** httpx's timeouts apply to each read, so a server that
  drips one byte a second is never cut off by them; here the whole exchange (connect, send, the
  answer's headers and body) runs under one deadline, the connection's ``timeout``.
- **A cap on the answer's size, after decompression.** The body is read as a stream and
  decompressed here, a bounded piece at a time (httpx inflates each chunk without a bound on its
  output, so a gzip bomb would land in memory whole); past ``max_answer_bytes`` the answer is
  refused with :class:`Doc2XProtocolError`.
- **What was sent decides what may be retried.** httpx reports, through its trace extension, when
  a request's body has been sent whole. A failure before that point reached nobody and is retried;
  after it, an upload may have been billed, so it is never resent on its own
  (:class:`Doc2XSubmitUncertainError`). A body goes out in pieces of :data:`BODY_PIECE_BYTES`, so
  that a connection reset part-way through is seen by the next piece's send with every anyio
  release: before anyio 4.16, a send whose connection was lost while it waited returned as if its
  bytes had gone, and the whole body then looked sent.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import random
import sys
import threading
import weakref
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import tenacity

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import (
    Doc2XError,
    Doc2XProtocolError,
    Doc2XRateLimitError,
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
)
from airflow_provider_doc2x.pacing.window import paced_upload
from airflow_provider_doc2x.settings import Doc2XSettings

T = TypeVar("T")

#: Requests in flight at once through the shared client of an event loop. Requests past it wait
#: on a semaphore rather than in httpcore's pool, whose queue handling costs time proportional to
#: the queue on every request: a thousand queued polls would stall the loop.
MAX_IN_FLIGHT_PER_LOOP = 16
#: An upload's body is handed to the connection this many bytes at a time (see the module's doc).
BODY_PIECE_BYTES = 64 * 1024
#: Longest wait a server's ``Retry-After`` may impose between two tries.
MAX_RETRY_AFTER = 300.0
#: Encodings the transport decodes itself, with a bound (see the module's doc).
ACCEPT_ENCODING = "gzip, deflate"
#: Uploads never reuse a kept-alive connection. A server or a middlebox closes an idle connection
#: on its own clock (uvicorn, Node and Apache after 5 s, gunicorn after 2 s, a load balancer when
#: it drains): a request sent on it just as it closes is lost after its body went out, which for
#: an upload means "Doc2X may have billed it". A new connection per upload (one handshake, small
#: beside the key's pace) never meets that race; polls and downloads, retried safely, keep theirs.
UPLOAD_KEEPALIVE_CONNECTIONS = 0


@dataclass
class SharedClient:
    """The event loop's clients for one base URL, and the gate that bounds their requests in flight.

    ``uploads`` carries what may bill (uploads, a PDF's PUT), each on a new connection
    (:data:`UPLOAD_KEEPALIVE_CONNECTIONS`). ``client`` carries the rest.
    """

    client: httpx.AsyncClient
    uploads: httpx.AsyncClient
    gate: asyncio.Semaphore
    lifetime: Any = field(default=None, repr=False)

    @property
    def closed(self) -> bool:
        """Either client was closed (the loop shut them down): the pair is built again."""
        return self.client.is_closed or self.uploads.is_closed

    def for_request(self, bills: bool) -> httpx.AsyncClient:
        """The client for a request that may bill (``bills``), or for any other."""
        return self.uploads if bills else self.client


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Future[SharedClient]]] = (
    weakref.WeakKeyDictionary()
)


async def shared_client(base_url: str) -> SharedClient:
    """The running loop's client for ``base_url``, built once and closed when the loop shuts down.

    The client is built in a thread: building its TLS context reads the CA bundle from disk, which
    would stall the loop. It closes with the loop: it is held by an async generator, which
    ``asyncio.run`` (and the triggerer) finalize before closing their loop.
    """
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    building = clients.get(base_url)
    if building is None or (building.done() and (building.exception() or building.result().closed)):
        building = clients[base_url] = asyncio.ensure_future(_open_client(base_url))
    return await asyncio.shield(building)


async def _open_client(base_url: str) -> SharedClient:
    def clients() -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
        tls = httpx.create_ssl_context()  # one TLS context (one read of the CA bundle) for both
        kept = httpx.Limits(
            max_connections=MAX_IN_FLIGHT_PER_LOOP, max_keepalive_connections=MAX_IN_FLIGHT_PER_LOOP
        )
        fresh = httpx.Limits(
            max_connections=MAX_IN_FLIGHT_PER_LOOP, max_keepalive_connections=UPLOAD_KEEPALIVE_CONNECTIONS
        )
        return (
            httpx.AsyncClient(base_url=base_url, verify=tls, limits=kept),
            httpx.AsyncClient(base_url=base_url, verify=tls, limits=fresh),
        )

    client, uploads = await asyncio.to_thread(clients)
    lifetime = _closed_with_the_loop(client, uploads)
    await lifetime.__anext__()  # the loop now knows the generator: it finalizes it at shutdown
    return SharedClient(client, uploads, asyncio.Semaphore(MAX_IN_FLIGHT_PER_LOOP), lifetime)


async def _closed_with_the_loop(client: httpx.AsyncClient, uploads: httpx.AsyncClient) -> AsyncIterator[None]:
    try:
        yield
    finally:
        try:
            await client.aclose()
        finally:
            await uploads.aclose()


class _BackgroundLoop:
    """An event loop in a daemon thread of this process: where a worker's synchronous calls run."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="doc2x-http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Close the loop's clients, then the loop (at the process's exit)."""
        if self.pid != os.getpid() or not self.thread.is_alive():
            return
        # At exit, a client that does not close politely is still closed by the OS.
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.loop.shutdown_asyncgens(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


_background: _BackgroundLoop | None = None
_background_lock = threading.Lock()


def _background_loop() -> _BackgroundLoop:
    global _background
    with _background_lock:
        # A forked child inherits the variable but not the thread: it starts its own.
        if _background is None or _background.pid != os.getpid():
            _background = _BackgroundLoop()
            atexit.register(_background.close)
        return _background


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine of this module on the process's background loop and wait for its outcome.

    If the waiting thread is interrupted (Airflow's task timeout, a signal), the coroutine is
    cancelled, so an upload in flight lets go of its pacing slot.
    """
    background = _background_loop()
    if threading.get_ident() == background.thread.ident:
        coroutine.close()
        raise RuntimeError("run_sync was called from the Doc2X transport's own loop: await the call instead")
    future = asyncio.run_coroutine_threadsafe(coroutine, background.loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


async def within(seconds: float, coroutine: Coroutine[Any, Any, T]) -> T:
    """Await ``coroutine`` for at most ``seconds``; raise ``TimeoutError`` (and cancel it) past that.

    On Python 3.11+ this is ``asyncio.timeout``, which runs the coroutine in the caller's task: a
    thousand triggers polling at once then make no extra task per request, which keeps the garbage
    collector's work, and so the event loop's pauses, small. Older Pythons use ``asyncio.wait_for``.
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await coroutine
    return await asyncio.wait_for(coroutine, timeout=seconds)


async def call(
    settings: Doc2XSettings,
    request: protocol.Doc2XRequest,
    read: Callable[[dict[str, Any]], T],
    *,
    log: logging.Logger | Any,
    pacer: Any = None,
    retry: Callable[[BaseException], bool] = protocol.is_retryable,
) -> T:
    """Send ``request`` until it succeeds or fails for good, and ``read`` the answer's data.

    Transient failures are retried (bounded, with back-off; ``retry`` narrows which, for a call
    whose errors mean something else than the image API's); an upload goes through ``pacer`` (an
    object with an ``aupload()`` async context manager holding one of the key's slots; when that is
    a :class:`~airflow_provider_doc2x.pacing.RateLimiter`'s, even through a wrapper, the slot is
    confirmed right before the send, and booked again if its lease ran out meanwhile). For an
    upload whose body was sent whole, an answer that is lost or cannot be read (including a
    success whose data ``read`` refuses) means Doc2X may have billed it: that is
    :class:`Doc2XSubmitUncertainError`, which is never retried here.
    """
    async for attempt in tenacity.AsyncRetrying(**_retry_options(settings, request, log, retry)):
        with attempt:
            shared = await shared_client(settings.base_url)
            paced = pacer.aupload() if request.bills and pacer is not None else nullcontext()
            async with paced:
                slot = paced_upload() if request.bills and pacer is not None else None
                while True:
                    async with shared.gate:
                        # The wait for the gate is unbounded: the slot may have expired meanwhile.
                        if slot is None or await slot.confirm():
                            sent = slot.body_sent if slot is not None else None
                            answer = await exchange(
                                shared.for_request(request.bills), settings, request, on_body_sent=sent
                            )
                            break
                    await slot.book_again()  # outside the gate: polls are not held behind the window
                if slot is not None:
                    await slot.answered(answer.http_status)  # a 429 may teach the window the server's rule
            try:
                return read(protocol.read_answer(request, answer, secrets=settings.secrets))
            except Doc2XProtocolError as error:
                if request.bills and 200 <= answer.http_status < 300:
                    raise _uncertain(request, f"its answer could not be read ({error.message})") from error
                raise
    raise AssertionError("unreachable: tenacity re-raises the last error")


async def exchange(
    client: httpx.AsyncClient,
    settings: Doc2XSettings,
    request: protocol.Doc2XRequest,
    *,
    on_body_sent: Callable[[], None] | None = None,
) -> protocol.Doc2XAnswer:
    """One HTTP exchange under the request's overall deadline, its answer read up to the size cap.

    ``on_body_sent`` is called when an upload's body was sent whole: the pacing slot dates itself
    from it (:meth:`~airflow_provider_doc2x.pacing.PacedUpload.body_sent`).
    """
    body_sent = request.content is None
    trace = None
    if not body_sent:  # only an upload needs to know when its body was sent whole

        async def trace(event: str, info: dict[str, Any]) -> None:
            nonlocal body_sent
            if event.endswith("send_request_body.complete"):
                body_sent = True
                if on_body_sent is not None:
                    on_body_sent()

    try:
        return await within(settings.timeout, _exchange(client, settings, request, trace))
    except asyncio.TimeoutError as error:
        raise _lost(
            request, settings, f"no complete answer within {settings.timeout:g}s", body_sent
        ) from error
    except httpx.TransportError as error:
        reason = protocol.redact(f"{type(error).__name__}: {error or 'no detail'}", settings.secrets)
        raise _lost(request, settings, reason, body_sent) from error


async def _exchange(
    client: httpx.AsyncClient, settings: Doc2XSettings, request: protocol.Doc2XRequest, trace: Any
) -> protocol.Doc2XAnswer:
    headers = {
        **request.headers,
        "Authorization": f"Bearer {settings.api_key}",
        "Accept-Encoding": ACCEPT_ENCODING,
    }
    content: bytes | AsyncIterator[bytes] | None = request.content
    if request.content is not None and len(request.content) > BODY_PIECE_BYTES:
        headers["Content-Length"] = str(len(request.content))  # pieces, not chunked encoding
        content = _pieces(request.content)
    async with client.stream(
        request.method,
        request.path,
        params=request.params,
        content=content,
        headers=headers,
        timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
        extensions={"trace": trace} if trace is not None else None,
    ) as response:
        body = await read_capped(
            response,
            settings.max_answer_bytes,
            what=f"Doc2X's answer to {request.what}",
            hint=" (the connection's max_answer_bytes)",
            uid=request.uid,
            source=request.source,
        )
        return protocol.Doc2XAnswer(response.status_code, body, response.headers)


async def _pieces(content: bytes) -> AsyncIterator[bytes]:
    """``content`` in pieces of :data:`BODY_PIECE_BYTES`, without copying it."""
    view = memoryview(content)
    for start in range(0, len(view), BODY_PIECE_BYTES):
        yield view[start : start + BODY_PIECE_BYTES]  # type: ignore[misc]


async def read_capped(
    response: httpx.Response,
    cap: int,
    *,
    what: str,
    hint: str = "",
    uid: str | None = None,
    source: str | None = None,
) -> bytes:
    """The body of ``response``, decoded up to ``cap`` bytes; past it, or undecodable, a protocol error.

    ``what`` names the answer in the error (``Doc2X's answer to GET ...``, ``The download of ...``),
    ``hint`` says which setting sets the cap.
    """

    def refused(reason: str) -> Doc2XProtocolError:
        return Doc2XProtocolError(
            f"{what} {reason}", http_status=response.status_code, uid=uid, source=source
        )

    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise refused(f"is {int(declared)} bytes, over the cap of {cap} bytes{hint}; it was not read")
    try:
        body = CappedBody(response.headers.get("content-encoding", ""), cap)
        async for chunk in response.aiter_raw():
            body.feed(chunk)
        return body.finish()
    except CappedBody.TooLarge:
        raise refused(f"is larger, over the cap of {cap} bytes{hint}; it was not read") from None
    except (zlib.error, ValueError) as error:
        raise refused(f"cannot be decoded: {error}") from None


class CappedBody:
    """An answer's body, decoded as it arrives and never past ``cap`` bytes.

    httpx inflates each received chunk whole (a 64 KB chunk of a gzip bomb becomes some 64 MB at
    once), so the transport reads the raw bytes and inflates them here, at most up to the cap.
    Only the encodings it asks for (``gzip``, ``deflate``) are accepted.
    """

    class TooLarge(Exception):
        """The decoded body went past the cap."""

    def __init__(self, content_encoding: str, cap: int) -> None:
        encodings = [part.strip().lower() for part in content_encoding.split(",")]
        encodings = [name for name in encodings if name and name != "identity"]
        if len(encodings) > 1 or (encodings and encodings[0] not in ("gzip", "x-gzip", "deflate")):
            raise ValueError(f"the answer's content encoding {content_encoding!r} was not asked for")
        # wbits 32+: a gzip or zlib header, detected; a raw deflate stream (no header) is tried on failure.
        self._inflate = zlib.decompressobj(32 + zlib.MAX_WBITS) if encodings else None
        self._may_be_raw_deflate = encodings == ["deflate"]
        self._parts: list[bytes] = []
        self._size = 0
        self._cap = cap

    def feed(self, data: bytes) -> None:
        """Take the next raw chunk."""
        if self._inflate is None:
            self._keep(data)
            return
        try:
            self._inflate_bounded(data)
        except zlib.error:
            if not (self._may_be_raw_deflate and self._size == 0):
                raise
            self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            self._may_be_raw_deflate = False
            self._inflate_bounded(data)

    def _inflate_bounded(self, data: bytes) -> None:
        assert self._inflate is not None
        while data:
            self._keep(self._inflate.decompress(data, self._cap - self._size + 1))
            data = self._inflate.unconsumed_tail

    def _keep(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._cap:
            raise self.TooLarge
        if chunk:
            self._parts.append(chunk)

    def finish(self) -> bytes:
        """The whole decoded body."""
        if self._inflate is not None:
            self._keep(self._inflate.flush())
        return b"".join(self._parts)


def _lost(
    request: protocol.Doc2XRequest, settings: Doc2XSettings, reason: str, body_sent: bool
) -> Doc2XError:
    """A request that got no answer: an upload sent whole may have been billed; anything else may be retried."""
    if request.bills and body_sent:
        return _uncertain(request, f"its answer was lost ({reason})")
    hint = ""
    # A plain-HTTP server reached over an assumed https:// fails the TLS handshake: an SSL error, or
    # a connection that times out while the server waits for a request that never comes.
    if settings.scheme_assumed and any(word in reason.lower() for word in ("ssl", "connect")):
        hint = (
            "; the connection's Base URL has no scheme, so https:// was assumed: if the server speaks "
            "plain HTTP (a local server), write http:// before the host"
        )
    return Doc2XTransientError(
        f"Doc2X {request.what} failed: {reason}{hint}", uid=request.uid, source=request.source
    )


def _uncertain(request: protocol.Doc2XRequest, what_happened: str) -> Doc2XSubmitUncertainError:
    return Doc2XSubmitUncertainError(
        f"The upload of {request.source} was sent but {what_happened}; Doc2X may have billed it, so it "
        "is not resent automatically. A new try of the task submits it again",
        source=request.source,
    )


class Backoff:
    """Exponential back-off with full jitter, never shorter than the server's Retry-After (within reason)."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        """Seconds to wait before the next try."""
        ceiling = min(self.maximum, self.initial * 2 ** (retry_state.attempt_number - 1))
        wait = random.uniform(ceiling / 2, ceiling)
        error = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(error, "retry_after", None)
        if retry_after:
            wait = max(wait, min(retry_after, MAX_RETRY_AFTER))
        return wait


class _Count:
    """A count shared by the threads of a process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self) -> None:
        with self._lock:
            self.value += 1


#: Answers 429 (or a limit code) that a retry of this process absorbed: a task reads it before and
#: after its uploads (a worker process runs one task at a time) for its usage's ``rate_limited``.
RATE_LIMITED = _Count()


def retry_options(
    settings: Doc2XSettings,
    *,
    retry: Callable[[BaseException], bool],
    on_retry: Callable[[BaseException | None, float, int], None],
) -> dict[str, Any]:
    """``tenacity.AsyncRetrying``'s options for one Doc2X call or one PDF's PUTs: the connection's policy.

    At most ``max_retries + 1`` tries in all, the failures ``retry`` accepts retried after a
    :class:`Backoff` (the server's Retry-After as a floor); ``on_retry(error, pause, next_try)``
    says so before each pause (a warning naming what is tried again). The last error is re-raised.
    """

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, Doc2XRateLimitError):
            RATE_LIMITED.add()
        on_retry(error, state.upcoming_sleep, state.attempt_number + 1)

    return {
        "retry": tenacity.retry_if_exception(retry),
        "stop": tenacity.stop_after_attempt(settings.max_retries + 1),
        "wait": Backoff(settings.retry_wait, settings.retry_wait_max),
        "before_sleep": before_sleep,
        "reraise": True,
    }


def _retry_options(
    settings: Doc2XSettings,
    request: protocol.Doc2XRequest,
    log: Any,
    retry: Callable[[BaseException], bool] = protocol.is_retryable,
) -> dict[str, Any]:
    def log_retry(error: BaseException | None, pause: float, next_try: int) -> None:
        log.warning(
            "Doc2X %s failed (%s); try %d of %d again in %.1fs",
            request.what,
            error,
            next_try,
            settings.max_retries + 1,
            pause,
        )

    return retry_options(settings, retry=retry, on_retry=log_retry)


# -- Object storage: the PDF API's downloads ----------------------------------------------------
#
# These calls go to presigned urls (Aliyun OSS, S3, the CDN), never to the API: no Authorization
# header is sent, no redirect is followed, and a url is named in messages only redacted
# (``scheme://host/path``): its query is a credential for its lifetime. A PDF's PUT to its
# presigned url is part of its submission (:mod:`airflow_provider_doc2x.pdf.presigned`), on the
# same shared client (:data:`OUTSIDE_CLIENT`) and by the same rules.

#: The key of the loop's shared client for absolute urls (no base url, no key).
OUTSIDE_CLIENT = ""


async def download(
    settings: Doc2XSettings, url: str, *, cap: int, log: logging.Logger | Any, uid: str | None = None
) -> bytes:
    """GET a file the PDF API points to (an export zip, a page image, a figure crop), up to ``cap`` bytes.

    Only https urls on the hosts the vendor's files live on, or the connection's own host, are
    fetched (:func:`~airflow_provider_doc2x.protocol.check_download_url`); no ``Authorization``
    header, no redirect. The body is decoded and capped as the API's answers are. Transient
    failures (reset, timeout, 408, 429, 5xx) are retried with back-off; any other answer but 200 is
    a :class:`Doc2XProtocolError`.
    """
    checked = protocol.check_download_url(url, own_base_url=settings.base_url)
    redacted = protocol.redact_url(checked)
    named = protocol.Doc2XRequest("GET", redacted, uid=uid)
    async for attempt in tenacity.AsyncRetrying(**_retry_options(settings, named, log)):
        with attempt:
            try:
                return await asyncio.wait_for(
                    _download_once(settings, checked, redacted, cap, uid), timeout=settings.timeout
                )
            except asyncio.TimeoutError as error:
                raise Doc2XTransientError(
                    f"The download of {redacted} got no complete answer within {settings.timeout:g}s", uid=uid
                ) from error
            except httpx.TransportError as error:
                reason = protocol.redact(f"{type(error).__name__}: {error or 'no detail'}", settings.secrets)
                raise Doc2XTransientError(
                    f"The download of {redacted} failed: {reason.replace(checked, redacted)}", uid=uid
                ) from None
    raise AssertionError("unreachable: tenacity re-raises the last error")


async def _download_once(
    settings: Doc2XSettings, url: str, redacted: str, cap: int, uid: str | None
) -> bytes:
    shared = await shared_client(OUTSIDE_CLIENT)
    async with (
        shared.gate,
        shared.client.stream(
            "GET",
            url,
            headers={"Accept-Encoding": ACCEPT_ENCODING},
            timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
        ) as response,
    ):
        status = response.status_code
        if status != 200:
            error_class = Doc2XTransientError if status in (408, 429) or status >= 500 else Doc2XProtocolError
            raise error_class(
                f"The download of {redacted} answered HTTP {status}", http_status=status, uid=uid
            )
        return await read_capped(response, cap, what=f"The download of {redacted}", uid=uid)
