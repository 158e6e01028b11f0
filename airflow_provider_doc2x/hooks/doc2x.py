"""The Doc2X hook: a ``doc2x`` connection and the API's calls, for workers and triggers.

Requests are built and answers read by :mod:`airflow_provider_doc2x.protocol`; bytes are moved by
:mod:`airflow_provider_doc2x.transport` (deadlines, size caps, retries), uploads are paced by
:mod:`airflow_provider_doc2x.pacing`, and what the connection holds is declared in
:mod:`airflow_provider_doc2x.settings`. This module reads the connection and ties them together
for the image API's calls; the PDF API's calls are made by
:mod:`airflow_provider_doc2x.pdf.submission` and offered as ``hook.pdf``, on the hook's own
connection, so that callers know one object. The API key lives in the connection's password and leaves the hook only
as the ``Authorization`` header.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import warnings
import weakref
from functools import cached_property
from typing import Any

from airflow.exceptions import AirflowProviderDeprecationWarning
from airflow.providers.common.compat.sdk import BaseHook

from airflow_provider_doc2x import protocol, transport
from airflow_provider_doc2x import settings as connection_settings
from airflow_provider_doc2x.compat import get_async_connection, get_async_extra_dejson, mask_secret
from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XError,
    Doc2XJobNotFoundError,
    Doc2XTransientError,
)
from airflow_provider_doc2x.pacing import limiter_for
from airflow_provider_doc2x.pdf.submission import (
    PdfCalls,
)
from airflow_provider_doc2x.settings import Doc2XSettings
from airflow_provider_doc2x.storage.sources import ImageSource

ImageInput = bytes | str | os.PathLike

#: Seconds the hooks of one event loop share a connection lookup.
ASYNC_SETTINGS_TTL = 60.0
#: The uid the connection test asks about: Doc2X answers "not found" to a good key, and bills nothing.
CONNECTION_TEST_UID = "airflow-connection-test"

_async_settings: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[str, tuple[float, asyncio.Future[Doc2XSettings]]]
] = weakref.WeakKeyDictionary()


def read_image(image: ImageInput, *, source: str | None = None) -> tuple[bytes, str]:
    """Load and check an image given as bytes, a local path or a storage URI; return bytes and name."""
    if isinstance(image, bytes):
        name = source or "<bytes>"
        protocol.check_image(image, source=name)
        return image, name
    image_source = ImageSource.of(image)
    return image_source.read(), source or image_source.uri


class Doc2XHook(BaseHook):
    """Talk to Doc2X's image and PDF APIs with the key and URL of a ``doc2x`` connection.

    Synchronous methods are for workers; the ``a``-prefixed ones are for event loops (triggers,
    and a worker's batch of concurrent uploads). Both go through the same transport. The PDF
    methods hand over to :class:`~airflow_provider_doc2x.pdf.submission.PdfCalls`.

    :param doc2x_conn_id: the connection: API key in the password, base URL in the host (default
        ``https://v2.doc2x.noedgeai.com``); timeouts, retries and pacing in the extra.
    """

    conn_name_attr = "doc2x_conn_id"
    default_conn_name = "doc2x_default"
    conn_type = "doc2x"
    hook_name = "Doc2X"

    def __init__(self, doc2x_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        """Keep the connection's id; the connection is read when first needed."""
        super().__init__(**kwargs)
        self.doc2x_conn_id = doc2x_conn_id
        self._async_settings: Doc2XSettings | None = None

    # -- the connection form (Airflow 2.11; Airflow 3 reads the same from the provider info) ----

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """How Airflow 2.11's form shows the standard fields (hidden, relabelled, placeholders)."""
        behaviour = connection_settings.UI_FIELD_BEHAVIOUR
        return {
            "hidden_fields": behaviour["hidden-fields"],
            "relabeling": behaviour["relabeling"],
            "placeholders": behaviour["placeholders"],
        }

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """The extra fields as Airflow 2.11's form widgets, from the one declaration in settings."""
        return connection_settings.connection_form_widgets()

    # -- settings ----------------------------------------------------------------------------

    @cached_property
    def settings(self) -> Doc2XSettings:
        """The connection, fetched once, the synchronous way (workers only); its key is masked in logs."""
        conn = self.get_connection(self.doc2x_conn_id)
        settings = Doc2XSettings.from_connection(conn, conn.extra_dejson)
        mask_secret(settings.api_key)  # a pasted "Bearer sk-..." password is masked whole, not the key alone
        return settings

    def get_conn(self) -> Doc2XSettings:
        """The connection's settings, read and checked once.

        There is no client to hand out: HTTP clients are shared by everything on an event loop
        (see :mod:`airflow_provider_doc2x.transport`).
        """
        return self.settings

    async def aget_settings(self) -> Doc2XSettings:
        """The connection, fetched without blocking the event loop (triggers).

        Hooks on one event loop share one lookup per connection for ``ASYNC_SETTINGS_TTL`` seconds:
        a triggerer that starts a thousand Doc2X triggers fetches the connection once, not a
        thousand times in one tick of the loop. A rotated key is picked up after the TTL. A hook
        whose settings were already read the synchronous way (a worker) uses those.
        """
        if "settings" in self.__dict__:
            return self.settings
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
        settings = Doc2XSettings.from_connection(conn, extra)
        # Registering a secret talks to Airflow's supervisor synchronously: never on the loop's thread.
        await asyncio.to_thread(mask_secret, settings.api_key)
        return settings

    def close(self) -> None:
        """Nothing to close: the HTTP clients are shared per event loop and closed with it."""

    async def aclose(self) -> None:
        """Nothing to close: the loop's shared client stays open for the other hooks on it."""

    # -- calls ---------------------------------------------------------------------------------

    async def _acall(
        self,
        request: protocol.Doc2XRequest,
        read: Any,
        settings: Doc2XSettings | None = None,
        *,
        pacer: Any = None,
    ) -> Any:
        settings = settings or await self.aget_settings()
        if request.bills and pacer is None:
            pacer = self.pacer(settings)
        return await transport.call(
            settings, request, read, log=self.log, pacer=pacer if request.bills else None
        )

    @staticmethod
    def pacer(settings: Doc2XSettings) -> Any:
        """The key's upload window: on this host, or in Redis with the connection's ``pacing_conn_id``."""
        return limiter_for(
            settings.base_url,
            settings.api_key,
            settings.rate_limit_images,
            settings.rate_limit_window,
            pacing_conn_id=settings.pacing_conn_id,
            upload_timeout=settings.timeout,
        )

    def _call(self, request: protocol.Doc2XRequest, read: Any) -> Any:
        settings = self.settings  # looked up here, in the caller's thread (Airflow's lookups are synchronous)
        return transport.run_sync(self._acall(request, read, settings))

    # -- the API -------------------------------------------------------------------------------

    def parse_image(self, image: ImageInput, *, source: str | None = None) -> protocol.Doc2XResult:
        """Parse one image with the synchronous endpoint (one page of quota); wait for the result."""
        data, name = read_image(image, source=source)
        return self._call(protocol.parse_request(data, source=name), protocol.read_result)

    async def aparse_image(
        self, image: bytes, *, source: str | None = None, pacer: Any = None
    ) -> protocol.Doc2XResult:
        """:meth:`parse_image` for an event loop; takes bytes so that no file is read on the loop.

        ``pacer`` replaces the key's window around the upload (see :meth:`pacer`); the operator's
        batch wraps the window to stop queued uploads and record each start.
        """
        data, name = read_image(image, source=source)
        return await self._acall(protocol.parse_request(data, source=name), protocol.read_result, pacer=pacer)

    def submit_image(self, image: ImageInput, *, source: str | None = None) -> str:
        """Submit one image to the asynchronous endpoint (one page of quota); return its uid."""
        data, name = read_image(image, source=source)
        request = protocol.submit_request(data, source=name)
        uid = self._call(request, lambda answer: protocol.read_uid(request, answer))
        self.log.info("Submitted %s to Doc2X as uid %s", name, uid)
        return uid

    async def asubmit_image(self, image: bytes, *, source: str | None = None, pacer: Any = None) -> str:
        """:meth:`submit_image` for an event loop (bytes: no file is read on the loop); ``pacer`` as in :meth:`aparse_image`."""
        data, name = read_image(image, source=source)
        request = protocol.submit_request(data, source=name)
        return await self._acall(request, lambda answer: protocol.read_uid(request, answer), pacer=pacer)

    def get_job_status(self, uid: str) -> protocol.Doc2XJobStatus:
        """The job's status, and its result once it succeeded (a failed job is a status, not an error)."""
        return self._call(protocol.status_request(uid), self._status_reader(uid, self.settings))

    async def aget_job_status(self, uid: str) -> protocol.Doc2XJobStatus:
        """The job's status, for event loops: async connection lookup, async HTTP, nothing blocking."""
        settings = await self.aget_settings()
        return await self._acall(protocol.status_request(uid), self._status_reader(uid, settings), settings)

    @staticmethod
    def _status_reader(uid: str, settings: Doc2XSettings) -> Any:
        return lambda data: protocol.read_status(uid, data, secrets=settings.secrets)

    def test_connection(self) -> tuple[bool, str]:
        """Check the URL and the key without billing: ask for the status of a job that does not exist.

        It answers within seconds (one try, short timeouts), and in words a user can act on.
        """
        try:
            settings = self.settings
        except Doc2XError as error:
            return False, error.message
        probe = dataclasses.replace(
            settings,
            max_retries=0,
            timeout=min(settings.timeout, 10.0),
            connect_timeout=min(settings.connect_timeout, 5.0),
        )
        request = protocol.status_request(CONNECTION_TEST_UID)
        try:
            transport.run_sync(self._acall(request, lambda data: data, probe))
        except Doc2XJobNotFoundError:
            pass  # the expected answer: the key was accepted
        except Doc2XAuthError as error:
            return False, (
                f"Doc2X refused the API key (HTTP {error.http_status} from {settings.base_url}): "
                "check the connection's password"
            )
        except Doc2XTransientError as error:
            return False, f"Could not reach Doc2X at {settings.base_url}: {error.message}"
        except Doc2XError as error:
            status = f" (HTTP {error.http_status})" if error.http_status else ""
            return False, f"Doc2X at {settings.base_url} answered unexpectedly{status}: {error.message}"
        return True, f"Doc2X at {settings.base_url} accepted the API key"

    # -- the PDF API (the bulk lane): its calls live in pdf.submission ----------------------------

    @property
    def pdf(self) -> PdfCalls:
        """The PDF API's calls on this hook's connection: ``hook.pdf.asubmit_pdf(...)``, ``hook.pdf.aparse_pdf(...)``.

        Made at each use, so that no reference cycle keeps a hook alive on the triggerer. One PDF is
        PUT at most the connection's ``max_retries + 1`` times, whatever path it takes (see
        :mod:`airflow_provider_doc2x.pdf.submission`).
        """
        return PdfCalls(self.aget_settings, self.log)

    def __getattr__(self, name: str) -> Any:
        """``hook.asubmit_pdf`` and the other PDF calls of earlier releases: ``hook.pdf.asubmit_pdf`` now, with a warning."""
        if name in _PDF_CALLS:
            warnings.warn(
                f"Doc2XHook.{name} is Doc2XHook.pdf.{name} now; the hook's own name goes in a later release",
                AirflowProviderDeprecationWarning,
                stacklevel=2,
            )
            return getattr(self.pdf, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def get_pdf_status(self, uid: str, *, uploaded_at: float | None = None) -> protocol.Doc2XJobStatus:
        """A PDF job's status, for a worker's synchronous code (the connection is read in its thread)."""
        self.settings  # noqa: B018 - the connection is looked up here, in the caller's thread
        return transport.run_sync(self.pdf.aget_pdf_status(uid, uploaded_at=uploaded_at))


#: The PDF calls earlier releases offered on the hook itself (now on :attr:`Doc2XHook.pdf`).
_PDF_CALLS = frozenset(
    {
        "pdf_budget",
        "apdf_slot",
        "apreupload",
        "aput_pdf",
        "asubmit_pdf",
        "aget_pdf_status",
        "await_pdf",
        "aparse_pdf",
        "aexport_markdown",
        "adownload",
    }
)
