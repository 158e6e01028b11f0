"""Pacing uploads to the key's limit: at most N images in any rolling window of W seconds.

Doc2X allows 30 images per 30 s per key and answers 429 past that. Pacing on our side means a batch
never trips the limit, so no upload is wasted and the batch runs at the limit, not below it.

Where a key's window is kept (:func:`limiter_for`):

- By default, on the host: a small file under a lock (``fcntl.flock``), shared by every thread and
  process of the machine that runs as the same user. Mapped tasks on one host pace together instead
  of each bursting 30 uploads. The folder is private to the user (mode 0700, checked); it is
  ``DOC2X_PACING_DIR`` if set, else ``$XDG_RUNTIME_DIR/airflow-doc2x-pacing`` when that is a
  private folder of the user, else ``$AIRFLOW_HOME/doc2x-pacing`` (``~/airflow/doc2x-pacing``).
  A folder or file that is not the user's is refused (with a warning), and the process then paces
  on its own, in memory.
- With ``pacing_conn_id`` (an Airflow connection of type ``redis``), in Redis: every process of
  every worker host books and releases the key's slots there, by the same rules; the host-local
  window, which records this host's bookings in Redis too, stands in while Redis is down
  (:mod:`~airflow_provider_doc2x.pacing.redis_window`).

Both are named by a digest of the base URL and the key; the key itself is never written. Both hold
a versioned format that releases share: a reader keeps what it does not know (see
:mod:`~airflow_provider_doc2x.pacing.window`). A slot in flight expires after the longest its upload
may take, the connection's ``timeout`` plus a margin (:func:`lease_seconds`), so a worker killed with
uploads in flight holds the key for that long plus one window at most. A slot whose lease ran out
before its upload was sent (its holder stopped or starved) is never used: the transport confirms
the slot right before the send and books again if it was lost (:class:`PacedUpload`).

The PDF lane's per-key limit, PDFs and pages in flight, is here too (:class:`PdfBudget`,
:func:`pdf_budget_for`), and so is the key's daily page budget (:class:`DailyPageBudget`,
:func:`daily_budget_for`), kept in the same place as the key's window but failing closed
(:mod:`~airflow_provider_doc2x.pacing.daily`); the package re-exports the public names of its modules.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_provider_doc2x.pacing.budget import PdfBudget, pdf_budget_for
from airflow_provider_doc2x.pacing.daily import (
    BUDGET_FORMAT_VERSION,
    KEEP_DAYS,
    DailyPageBudget,
    PageBooking,
)
from airflow_provider_doc2x.pacing.private import is_private_dir
from airflow_provider_doc2x.pacing.redis_window import RedisRateLimiter
from airflow_provider_doc2x.pacing.window import (
    IN_FLIGHT_MARGIN_SECONDS,
    PacedUpload,
    RateLimiter,
    lease_seconds,
    paced_upload,
)
from airflow_provider_doc2x.pacing.window_file import (
    FORMAT_VERSION,
    LEGACY_IN_FLIGHT_SECONDS,
    MAX_LEASE_SECONDS,
)

if TYPE_CHECKING:
    from airflow_provider_doc2x.settings import Doc2XSettings

__all__ = [
    "BUDGET_FORMAT_VERSION",
    "FORMAT_VERSION",
    "IN_FLIGHT_MARGIN_SECONDS",
    "KEEP_DAYS",
    "LEGACY_IN_FLIGHT_SECONDS",
    "MAX_LEASE_SECONDS",
    "DailyPageBudget",
    "PacedUpload",
    "PageBooking",
    "PdfBudget",
    "RateLimiter",
    "RedisRateLimiter",
    "daily_budget_for",
    "key_digest",
    "lease_seconds",
    "limiter_for",
    "paced_upload",
    "pacing_dir",
    "pdf_budget_for",
    "reset_limiters",
]

#: The environment that decides where the host-local windows are kept.
_PLACE_VARIABLES = ("DOC2X_PACING_DIR", "XDG_RUNTIME_DIR", "AIRFLOW_HOME")

_limiters: dict[tuple[object, ...], RateLimiter] = {}
_limiters_lock = threading.Lock()
_daily_budgets: dict[tuple[object, ...], DailyPageBudget] = {}


def key_digest(base_url: str, api_key: str) -> str:
    """What names a key's window, in files and in Redis: a digest of the endpoint and the key."""
    return hashlib.sha256(f"{base_url}\n{api_key}".encode()).hexdigest()[:24]


def _pacing_dir_of(configured: str | None, runtime: str | None, airflow_home: str | None) -> Path:
    if configured:
        return Path(configured)
    if runtime and Path(runtime).is_absolute() and is_private_dir(Path(runtime)):
        return Path(runtime) / "airflow-doc2x-pacing"
    return Path(airflow_home or "~/airflow").expanduser() / "doc2x-pacing"


def pacing_dir() -> Path:
    """The folder of this host's window files, as the environment chooses it now (see the module doc)."""
    return _pacing_dir_of(*(os.environ.get(name) for name in _PLACE_VARIABLES))


def _window_file(place: tuple[str | None, ...], digest: str) -> Path:
    return _pacing_dir_of(*place) / f"{digest}.json"


def _budget_file(place: tuple[str | None, ...], digest: str) -> Path:
    return _pacing_dir_of(*place) / f"{digest}.budget.json"


def limiter_for(
    base_url: str,
    api_key: str,
    limit: int,
    window: float,
    *,
    pacing_conn_id: str | None = None,
    upload_timeout: float | None = None,
) -> RateLimiter:
    """The limiter of one key at one endpoint, shared by the threads of this process.

    Without ``pacing_conn_id`` it paces with the other processes of this host (a window file); with
    it, with every process of every host that uses the same Redis connection. ``upload_timeout``
    (the connection's ``timeout``, within which the transport ends each upload) bounds how long a
    slot stays in flight when its holder dies (:func:`lease_seconds`); without it, that is
    :data:`MAX_LEASE_SECONDS`. Cheap: no file, no connection and no network is touched until the
    first upload.
    """
    digest = key_digest(base_url, api_key)
    place = tuple(os.environ.get(name) for name in _PLACE_VARIABLES)
    lease = lease_seconds(upload_timeout)
    registry_key = (digest, limit, float(window), pacing_conn_id or None, place, lease)
    with _limiters_lock:
        limiter = _limiters.get(registry_key)
        if limiter is None:
            state_file = functools.partial(_window_file, place, digest)
            if pacing_conn_id:
                limiter = RedisRateLimiter(
                    limit,
                    window,
                    redis_conn_id=pacing_conn_id,
                    redis_key=f"doc2x:pacing:{digest}",
                    state_file=state_file,
                    upload_timeout=upload_timeout,
                    digest=digest,
                )
            else:
                limiter = RateLimiter(
                    limit, window, state_file=state_file, upload_timeout=upload_timeout, digest=digest
                )
            _limiters[registry_key] = limiter
        return limiter


def daily_budget_for(settings: Doc2XSettings) -> DailyPageBudget | None:
    """The key's daily page budget, kept where the key is paced; None when the connection sets none.

    With the connection's ``pacing_conn_id``, in Redis for every host; else in the host's pacing
    folder (:func:`pacing_dir`), next to the key's window file. Shared by the threads of this
    process. Cheap: nothing is opened or looked up until the first booking.
    """
    if not settings.daily_page_budget:
        return None
    digest = key_digest(settings.base_url, settings.api_key)
    place = tuple(os.environ.get(name) for name in _PLACE_VARIABLES)
    conn_id = settings.pacing_conn_id or None
    registry_key = (digest, settings.daily_page_budget, settings.budget_timezone, conn_id, place)
    with _limiters_lock:
        budget = _daily_budgets.get(registry_key)
        if budget is None:
            budget = _daily_budgets[registry_key] = DailyPageBudget(
                settings.daily_page_budget,
                digest=digest,
                timezone=settings.budget_timezone,
                redis_conn_id=conn_id,
                state_file=functools.partial(_budget_file, place, digest),
            )
        return budget


def reset_limiters() -> None:
    """Forget this process's limiters and daily budgets (tests): the next call reads the environment anew."""
    with _limiters_lock:
        limiters: list[RateLimiter | DailyPageBudget] = [*_limiters.values(), *_daily_budgets.values()]
        _limiters.clear()
        _daily_budgets.clear()
    for limiter in limiters:
        limiter.close()
