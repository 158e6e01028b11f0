"""What the local server's APIs need of the server around them: :class:`Host`.

The image API (:mod:`~airflow_provider_doc2x.local.image_service`) and the PDF API
(:mod:`~airflow_provider_doc2x.local.pdf_service`, :mod:`~airflow_provider_doc2x.local.pdf_tasks`)
share the knobs, the key check, the upload link and the account's quota. They reach them through
this protocol, which :class:`~airflow_provider_doc2x.local.server.LocalServer` is, so that neither
API imports the server that holds them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from fastapi import Request

from airflow_provider_doc2x.local.config import ServerConfig
from airflow_provider_doc2x.local.engines import Engine


class Host(Protocol):
    """What an API needs of the server around it (:class:`~airflow_provider_doc2x.local.server.LocalServer`)."""

    #: The knobs now; an API replaces them to count down a one-shot knob (``put_fail_next``, ...).
    config: ServerConfig
    engine: Engine
    #: Requests per endpoint.
    requests: Counter[str]

    def authorize(self, request: Request) -> None:
        """Check the Bearer key, or raise the 401 refusal."""
        ...

    def count_keyless(self, request: Request, route: str) -> None:
        """Count a request to a route a client reaches without the key, and whether it carried the key."""
        ...

    def upload_in_flight(self) -> AbstractContextManager[None]:
        """Count an upload in flight while it lasts."""
        ...

    async def receive_body(
        self, request: Request, declared: int | None = None, *, keep: int | None = None
    ) -> tuple[bytes, int]:
        """Read a body at the link's pace: its first ``keep`` bytes, and its size."""
        ...

    async def sleep_until(self, due: Callable[[], float]) -> None:
        """Sleep until the monotonic time ``due()`` returns, read again whenever the knobs change."""
        ...

    def quota_left(self) -> int | None:
        """Pages the account may still bill (None: no quota), pages reserved by tasks in progress deducted."""
        ...
