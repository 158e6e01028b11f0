"""
The Doc2X hook: a ``doc2x`` connection, paced uploads, bounded retries, sync and async calls.

Requests are built and answers read by :mod:`airflow_provider_doc2x.protocol`; this module only
moves bytes (``httpx.Client`` for workers, ``httpx.AsyncClient`` for triggers) and decides when to
try again. The API key lives in the connection's password and leaves this module only as the
``Authorization`` header.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import weakref
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import httpx
import tenacity
from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson
from airflow.providers.common.compat.sdk import BaseHook, mask_secret

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XError,
    Doc2XInputError,
    Doc2XJobNotFoundError,
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
)
from airflow_provider_doc2x.pacing import RateLimiter, limiter_for
from airflow_provider_doc2x.sources import ImageSource

ImageInput = bytes | str | os.PathLike

#: Requests in flight at once through the shared async client of an event loop (the triggerer's).
#: Requests past it wait on a semaphore rather than in httpcore's pool, whose queue handling costs
#: time proportional to the queue on every request: a thousand queued polls would stall the loop.
ASYNC_MAX_IN_FLIGHT = 16


@dataclass
class _SharedAsyncClient:
    client: httpx.AsyncClient
    gate: asyncio.Semaphore


#: Seconds the hooks of one event loop share a connection lookup.
ASYNC_SETTINGS_TTL = 60.0
_async_settings: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[str, tuple[float, asyncio.Future[Doc2XSettings]]]
] = weakref.WeakKeyDictionary()
_async_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple, asyncio.Future[_SharedAsyncClient]]
] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Doc2XSettings:
    """Everything a call needs from the connection; the key is kept out of ``repr``."""

    base_url: str
    api_key: str = field(repr=False)
    connect_timeout: float = 10.0
    timeout: float = 120.0
    max_retries: int = 5
    retry_wait: float = 1.0
    retry_wait_max: float = 30.0
    rate_limit_images: int = protocol.DEFAULT_RATE_LIMIT_IMAGES
    rate_limit_window: float = protocol.DEFAULT_RATE_LIMIT_WINDOW

    #: Connection extra fields, with their types; the form shows them and the docs list them.
    EXTRA_FIELDS = {
        "connect_timeout": float,
        "timeout": float,
        "max_retries": int,
        "retry_wait": float,
        "retry_wait_max": float,
        "rate_limit_images": int,
        "rate_limit_window": float,
    }

    @classmethod
    def from_connection(cls, conn: Any, extra: Mapping[str, Any]) -> Doc2XSettings:
        api_key = (conn.password or "").strip()
        if api_key.lower().startswith("bearer "):
            api_key = api_key[len("bearer ") :].strip()
        if not api_key:
            raise Doc2XAuthError(
                f"The Doc2X connection {conn.conn_id!r} has no API key: put the key (sk-...) in its password"
            )
        options: dict[str, Any] = {}
        for name, kind in cls.EXTRA_FIELDS.items():
            value = extra.get(name, extra.get(f"extra__doc2x__{name}"))
            if value in (None, ""):
                continue
            try:
                options[name] = kind(value)
            except (TypeError, ValueError):
                raise Doc2XInputError(
                    f"The Doc2X connection {conn.conn_id!r} has extra {name}={value!r}, "
                    f"which is not a {kind.__name__}"
                ) from None
        return cls(base_url=base_url_of(conn), api_key=api_key, **options)

    @property
    def http_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, connect=self.connect_timeout)

    @property
    def limiter(self) -> RateLimiter:
        return limiter_for(self.base_url, self.api_key, self.rate_limit_images, self.rate_limit_window)


def base_url_of(conn: Any) -> str:
    """The API root from the connection's host: a full URL, or a bare host name taken as https."""
    host = (conn.host or "").strip().rstrip("/")
    if not host:
        return protocol.DEFAULT_BASE_URL
    if "://" not in host:
        host = f"https://{host}"
    parts = urlsplit(host)
    if conn.port and not parts.port:
        host = f"{parts.scheme}://{parts.hostname}:{conn.port}{parts.path}"
    return host


def read_image(image: ImageInput, *, source: str | None = None) -> tuple[bytes, str]:
    """Load and check an image given as bytes, a local path or a storage URI; return bytes and name."""
    if isinstance(image, bytes):
        name = source or "<bytes>"
        protocol.check_image(image, source=name)
        return image, name
    image_source = ImageSource.of(image)
    return image_source.read(), source or image_source.uri


class _Backoff:
    """Exponential back-off with full jitter, never shorter than the server's Retry-After."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** (retry_state.attempt_number - 1))
        wait = random.uniform(ceiling / 2, ceiling)
        error = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(error, "retry_after", None)
        if retry_after:
            wait = max(wait, min(retry_after, 300.0))
        return wait


class Doc2XHook(BaseHook):
    """
    Talk to Doc2X's image API with the key and URL of a ``doc2x`` connection.

    :param doc2x_conn_id: the connection: API key in the password, base URL in the host (default
        ``https://v2.doc2x.noedgeai.com``); timeouts, retries and pacing in the extra.
    """

    conn_name_attr = "doc2x_conn_id"
    default_conn_name = "doc2x_default"
    conn_type = "doc2x"
    hook_name = "Doc2X"

    def __init__(self, doc2x_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.doc2x_conn_id = doc2x_conn_id
        self._client: httpx.Client | None = None
        self._async_client: _SharedAsyncClient | None = None
        self._async_settings: Doc2XSettings | None = None

    # -- the connection form (Airflow 2.11; Airflow 3 reads the same from the provider info) ----

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        from airflow_provider_doc2x.get_provider_info import UI_FIELD_BEHAVIOUR

        return {
            "hidden_fields": UI_FIELD_BEHAVIOUR["hidden-fields"],
            "relabeling": UI_FIELD_BEHAVIOUR["relabeling"],
            "placeholders": UI_FIELD_BEHAVIOUR["placeholders"],
        }

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        from flask_babel import lazy_gettext
        from wtforms import IntegerField, StringField

        from airflow_provider_doc2x.get_provider_info import CONN_FIELDS

        try:
            from airflow.www.fields import BS3TextFieldWidget
        except ImportError:  # pragma: no cover - only the Airflow 2 UI calls this
            BS3TextFieldWidget = None
        widgets = {}
        for name, spec in CONN_FIELDS.items():
            field_class = IntegerField if "integer" in spec["schema"]["type"] else StringField
            widget_kwargs = {"widget": BS3TextFieldWidget()} if BS3TextFieldWidget else {}
            widgets[name] = field_class(
                lazy_gettext(spec["label"]), description=spec.get("description"), **widget_kwargs
            )
        return widgets

    # -- settings ----------------------------------------------------------------------------

    @cached_property
    def settings(self) -> Doc2XSettings:
        """The connection, fetched once, the synchronous way (workers only)."""
        conn = self.get_connection(self.doc2x_conn_id)
        settings = Doc2XSettings.from_connection(conn, conn.extra_dejson)
        if settings.api_key != conn.password:
            mask_secret(settings.api_key)  # a pasted "Bearer sk-..." is masked whole, not the key alone
        return settings

    async def aget_settings(self) -> Doc2XSettings:
        """
        The connection, fetched without blocking the event loop (triggers).

        Hooks on one event loop share one lookup per connection for ``ASYNC_SETTINGS_TTL`` seconds:
        a triggerer that starts a thousand Doc2X triggers fetches the connection once, not a
        thousand times in one tick of the loop. A rotated key is picked up after the TTL.
        """
        if self._async_settings is None:
            lookups = _async_settings.setdefault(asyncio.get_running_loop(), {})
            cached = lookups.get(self.doc2x_conn_id)
            if cached is None or cached[0] < time.monotonic() or (cached[1].done() and cached[1].exception()):
                cached = (
                    time.monotonic() + ASYNC_SETTINGS_TTL,
                    asyncio.ensure_future(self._fetch_settings()),
                )
                lookups[self.doc2x_conn_id] = cached
            self._async_settings = await asyncio.shield(cached[1])
        return self._async_settings

    async def _fetch_settings(self) -> Doc2XSettings:
        conn = await get_async_connection(self.doc2x_conn_id, hook=self)
        extra = await get_async_extra_dejson(conn)
        return Doc2XSettings.from_connection(conn, extra)

    # -- transports ----------------------------------------------------------------------------

    def get_conn(self) -> httpx.Client:
        if self._client is None:
            settings = self.settings
            self._client = httpx.Client(base_url=settings.base_url, timeout=settings.http_timeout)
        return self._client

    async def _shared_async_client(self) -> _SharedAsyncClient:
        """
        The event loop's shared client for this URL: a thousand triggers share one connection pool
        (and one TLS context, which is slow to build and large) instead of each making their own.
        The key is not part of the client; each request carries its own. The client is built in a
        thread: building its TLS context reads the CA bundle from disk, which would stall the loop.
        """
        if self._async_client is None or self._async_client.client.is_closed:
            settings = await self.aget_settings()
            clients = _async_clients.setdefault(asyncio.get_running_loop(), {})
            key = (settings.base_url, settings.timeout, settings.connect_timeout)
            building = clients.get(key)
            if building is None or (
                building.done() and (building.exception() or building.result().client.is_closed)
            ):
                building = clients[key] = asyncio.ensure_future(
                    asyncio.to_thread(_new_shared_client, settings)
                )
            self._async_client = await asyncio.shield(building)
        return self._async_client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def aclose(self) -> None:
        """Let go of the shared client; it stays open for the other hooks on this event loop."""
        self._async_client = None

    def _call(self, request: protocol.Doc2XRequest) -> dict[str, Any]:
        settings = self.settings
        for attempt in tenacity.Retrying(**self._retry_options(settings, request)):
            with attempt, settings.limiter.upload() if request.bills else nullcontext():
                try:
                    response = self.get_conn().request(
                        request.method,
                        request.path,
                        params=request.params,
                        content=request.content,
                        headers={**request.headers, **_auth_headers(settings)},
                    )
                except httpx.TransportError as error:
                    raise _transport_error(request, error) from error
                return protocol.read_answer(request, _answer(response))
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _acall(self, request: protocol.Doc2XRequest) -> dict[str, Any]:
        settings = await self.aget_settings()
        async for attempt in tenacity.AsyncRetrying(**self._retry_options(settings, request)):
            with attempt:
                shared = await self._shared_async_client()
                async with settings.limiter.aupload() if request.bills else nullcontext(), shared.gate:
                    try:
                        response = await shared.client.request(
                            request.method,
                            request.path,
                            params=request.params,
                            content=request.content,
                            headers={**request.headers, **_auth_headers(settings)},
                        )
                    except httpx.TransportError as error:
                        raise _transport_error(request, error) from error
                return protocol.read_answer(request, _answer(response))
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _retry_options(self, settings: Doc2XSettings, request: protocol.Doc2XRequest) -> dict[str, Any]:
        def log_retry(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            self.log.warning(
                "Doc2X %s %s failed (%s); try %d of %d again in %.1fs",
                request.method,
                request.path,
                error,
                state.attempt_number + 1,
                settings.max_retries + 1,
                state.upcoming_sleep,
            )

        return {
            "retry": tenacity.retry_if_exception(protocol.is_retryable),
            "stop": tenacity.stop_after_attempt(settings.max_retries + 1),
            "wait": _Backoff(settings.retry_wait, settings.retry_wait_max),
            "before_sleep": log_retry,
            "reraise": True,
        }

    # -- the API -------------------------------------------------------------------------------

    def parse_image(self, image: ImageInput, *, source: str | None = None) -> protocol.Doc2XResult:
        """Parse one image with the synchronous endpoint (one page of quota); wait for the result."""
        data, name = read_image(image, source=source)
        request = protocol.parse_request(data, source=name)
        return protocol.read_result(self._call(request))

    def submit_image(self, image: ImageInput, *, source: str | None = None) -> str:
        """Submit one image to the asynchronous endpoint (one page of quota); return its uid."""
        data, name = read_image(image, source=source)
        request = protocol.submit_request(data, source=name)
        uid = protocol.read_uid(request, self._call(request))
        self.log.info("Submitted %s to Doc2X as uid %s", name, uid)
        return uid

    async def asubmit_image(self, image: bytes, *, source: str | None = None) -> str:
        """:meth:`submit_image` for an event loop; takes bytes so that no file is read on the loop."""
        data, name = read_image(image, source=source)
        request = protocol.submit_request(data, source=name)
        return protocol.read_uid(request, await self._acall(request))

    def get_job_status(self, uid: str) -> protocol.Doc2XJobStatus:
        return protocol.read_status(uid, self._call(protocol.status_request(uid)))

    async def aget_job_status(self, uid: str) -> protocol.Doc2XJobStatus:
        """The job's status, for triggers: async connection lookup, async HTTP, nothing blocking."""
        return protocol.read_status(uid, await self._acall(protocol.status_request(uid)))

    def test_connection(self) -> tuple[bool, str]:
        """Check the URL and the key without billing: ask for the status of a uid that does not exist."""
        try:
            self._call(protocol.status_request("airflow-connection-test"))
        except Doc2XJobNotFoundError:
            pass  # the expected answer: the key was accepted
        except Doc2XError as error:
            return False, str(error)
        except Exception as error:
            return False, f"Could not reach Doc2X: {type(error).__name__}: {error}"
        finally:
            self.close()
        return True, f"Doc2X at {self.settings.base_url} accepted the API key"


def _new_shared_client(settings: Doc2XSettings) -> _SharedAsyncClient:
    limits = httpx.Limits(max_connections=ASYNC_MAX_IN_FLIGHT, max_keepalive_connections=ASYNC_MAX_IN_FLIGHT)
    client = httpx.AsyncClient(base_url=settings.base_url, timeout=settings.http_timeout, limits=limits)
    return _SharedAsyncClient(client, asyncio.Semaphore(ASYNC_MAX_IN_FLIGHT))


def _auth_headers(settings: Doc2XSettings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.api_key}"}


def _answer(response: httpx.Response) -> protocol.Doc2XAnswer:
    return protocol.Doc2XAnswer(response.status_code, response.content, response.headers)


#: Errors raised before the request left us: the server cannot have seen (or billed) it.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.WriteError,
    httpx.WriteTimeout,
)


def _transport_error(request: protocol.Doc2XRequest, error: httpx.TransportError) -> Doc2XError:
    """
    Classify a transport failure. The one that matters: an upload whose body was sent whole but
    whose answer never came may have been billed, so it is not retried (see the exception's doc).
    """
    what = f"{request.method} {request.path}"
    if request.bills and not isinstance(error, _NOT_SENT):
        return Doc2XSubmitUncertainError(
            f"The upload of {request.source} was sent but its answer was lost ({type(error).__name__}: "
            f"{error}); Doc2X may have billed it, so it is not resent automatically. A new try of the "
            "task submits it again",
            source=request.source,
        )
    return Doc2XTransientError(
        f"Doc2X {what} failed: {type(error).__name__}: {error or 'no detail'}",
        uid=request.uid,
        source=request.source,
    )
