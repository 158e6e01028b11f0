"""What the provider takes from ``apache-airflow-providers-common-compat`` releases its floor predates.

Why: a user on an older Airflow line has the common-compat release that line's constraints file
pinned (Airflow 2.11 and 3.1: 1.14.3; 3.2: 1.15.0). The provider asks for no newer one, so adding
it changes as little of their environment as possible. Two names it uses came later:
``mask_secret`` in ``common.compat.sdk`` (1.22) and ``get_async_extra_dejson`` (1.21). Each is
taken from common-compat when it has it, and otherwise from where Airflow itself keeps it, the
same places and order common-compat looks in.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:
    from airflow.providers.common.compat.sdk import mask_secret
except ImportError:  # common-compat before 1.22
    try:
        from airflow.sdk.log import mask_secret  # type: ignore[no-redef]
    except ImportError:  # Airflow 3.0, then Airflow 2
        try:
            from airflow.sdk.execution_time.secrets_masker import mask_secret  # type: ignore[no-redef]
        except ImportError:
            from airflow.utils.log.secrets_masker import mask_secret  # type: ignore[no-redef]

try:
    from airflow.providers.common.compat.connection import get_async_extra_dejson  # type: ignore[attr-defined]
except ImportError:  # common-compat before 1.21

    async def get_async_extra_dejson(conn: Any) -> dict[str, Any]:  # type: ignore[misc]
        """The connection's extra, its secrets masked, without blocking the event loop.

        ``extra_dejson`` registers the extra's secrets with the masker, a synchronous call to the
        supervisor on Airflow 3: it runs in a worker thread, as common-compat's own does.
        """
        if hasattr(conn, "aextra_dejson"):
            return await conn.aextra_dejson()
        return await asyncio.to_thread(lambda: conn.extra_dejson)


__all__ = ["get_async_extra_dejson", "mask_secret"]
