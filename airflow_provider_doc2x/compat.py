"""What the provider takes from ``apache-airflow-providers-common-compat`` releases its floor predates.

Why: a user on an older Airflow line has the common-compat release that line's constraints file
pinned (Airflow 3.1: 1.14.0; 2.11: 1.14.3; 3.2: 1.15.0). The provider asks for no newer one, so
adding it changes as little of their environment as possible. What it uses that came later:

- ``mask_secret`` in ``common.compat.sdk`` (1.22) and ``get_async_extra_dejson`` (1.21): taken
  from common-compat when it has them, and otherwise from where Airflow itself keeps them, the
  same places and order common-compat looks in;
- the safe ``get_async_connection`` (1.23): before Airflow 3.3.2, ``BaseHook.aget_connection``
  masks the connection's secrets with a synchronous call to the supervisor, which raises
  ``DeadlockImminentError`` when another async call is in flight on the same loop (a triggerer's
  thousand triggers). Earlier common-compat releases call it anyway; this module's own
  :func:`get_async_connection` does what 1.23 does, whatever release is installed.
"""

from __future__ import annotations

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
        supervisor on Airflow 3: it runs in the same worker thread as :func:`get_async_connection`'s
        lookups, one at a time, as common-compat's own does.
        """
        from asgiref.sync import sync_to_async

        if hasattr(conn, "aextra_dejson"):
            return await conn.aextra_dejson()
        return await sync_to_async(lambda: conn.extra_dejson)()


async def get_async_connection(conn_id: str, hook: Any) -> Any:
    """The connection ``conn_id``, read without blocking the event loop or calling the supervisor from it.

    ``hook`` (a hook class or instance) resolves it, so that a subclass's override is honoured.
    Its own ``aget_connection`` is awaited on Airflow 3.3.2 and later (which mask the secrets
    asynchronously: ``Connection.aextra_dejson`` came with it), or when the hook overrides it;
    otherwise the synchronous ``get_connection`` runs in a worker thread, one at a time, as
    common-compat 1.23 does.
    """
    from airflow.providers.common.compat.sdk import BaseHook, Connection
    from asgiref.sync import sync_to_async

    hook_class = hook if isinstance(hook, type) else type(hook)
    base = getattr(BaseHook, "aget_connection", None)
    own = getattr(hook_class, "aget_connection", None)
    overridden = own is not None and getattr(own, "__func__", own) is not getattr(base, "__func__", base)
    if own is not None and (hasattr(Connection, "aextra_dejson") or overridden):
        return await hook.aget_connection(conn_id=conn_id)
    return await sync_to_async(hook.get_connection)(conn_id=conn_id)


__all__ = ["get_async_connection", "get_async_extra_dejson", "mask_secret"]
