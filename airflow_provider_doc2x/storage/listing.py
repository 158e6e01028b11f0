"""Listing a prefix's images: all of them, or only those that arrived in a time window.

A scheduled DAG over a folder or bucket prefix that only grows wants the images that are new since
its last successful run. :func:`list_images` lists the prefix once through its ``ObjectStoragePath``
(one ``find``, which the object stores page through themselves; the connection of the path applies)
and keeps the JPEG/PNG files whose storage time falls in ``[since, until)``. The storage time is
what the listing gives: ``LastModified`` on S3, ``updated`` on GCS, ``last_modified`` on Azure, the
modification time on a local disk. :func:`list_new_images` takes the window from a task's context:
from the end of the last successful run's data interval (less a look-back) to the end of this run's.

The window is cheap but not airtight, so pair it with ``incremental=True`` on the operator (the
manifest makes a file listed twice cost nothing):

- An object store stamps an object with the start of its upload, which can be visible only after a
  run listed; the look-back (one hour by default) lists such a file again in the next run.
- A local copy that keeps the original modification time (``cp -p``, ``rsync -t``) lands in the
  past and is never in a window: on such storage list the whole prefix (``since=None``) and let the
  manifest skip what it knows.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow_provider_doc2x.storage.objects import storage_path

log = logging.getLogger(__name__)

#: What Doc2X's image endpoints take, by file name.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Every file the operator reads, by file name: images, and documents (PDFs, TIFFs) and rasters it
#: converts. Not the default, so that a listing never starts sending a bucket's PDFs on its own: a
#: DAG asks for them with ``suffixes=DOCUMENT_SUFFIXES``.
DOCUMENT_SUFFIXES = (*IMAGE_SUFFIXES, ".pdf", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".heic", ".heif")
#: How far before the last successful run's end a window starts (see the module's docstring).
DEFAULT_LOOKBACK = timedelta(hours=1)
#: Storage-time fields, by fsspec backend (local and memory, s3fs, adlfs, gcsfs).
_TIME_FIELDS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


def list_images(
    prefix: Any,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    recursive: bool = True,
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
) -> list[str]:
    """The URIs of the images under ``prefix`` whose storage time is in ``[since, until)``, sorted.

    :param prefix: a local directory or an ``ObjectStoragePath`` URI (``s3://bucket/scans/``, ...).
    :param since: keep files stored at or after this time (None: no lower bound).
    :param until: keep files stored before this time (None: no upper bound). Half-open, like
        Airflow's data intervals, so consecutive windows never list a file twice.
    :param recursive: descend into sub-folders.
    :param suffixes: file name endings to keep, compared in lower case.

    A file whose listing carries no time is kept (with a warning): missing it would be worse.
    Naive datetimes are taken as UTC.
    """
    root = storage_path(prefix)
    base = root.path.rstrip("/")
    try:
        found = root.fs.find(base, detail=True, maxdepth=None if recursive else 1)
    except FileNotFoundError:
        return []
    since, until = _aware(since), _aware(until)
    prefix_uri = str(root).rstrip("/")
    untimed = 0
    uris = []
    for name, info in sorted(found.items()):
        if not isinstance(info, dict) or info.get("type") != "file" or not name.startswith(base + "/"):
            continue
        if not name.lower().endswith(suffixes):
            continue
        if since is not None or until is not None:
            stored = stored_at(info)
            if stored is None:
                untimed += 1
            elif (since is not None and stored < since) or (until is not None and stored >= until):
                continue
        uris.append(f"{prefix_uri}/{name[len(base) + 1 :]}")  # as str(root / name), without a path per file
    if untimed:
        log.warning("%d images under %s have no storage time in their listing: kept", untimed, root)
    log.info(
        "%d images under %s%s",
        len(uris),
        root,
        f" stored in [{since or '-'}, {until or '-'})" if since or until else "",
    )
    return uris


def list_new_images(
    prefix: Any,
    context: Any,
    *,
    lookback: timedelta = DEFAULT_LOOKBACK,
    recursive: bool = True,
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
) -> list[str]:
    """The images under ``prefix`` that arrived since the last successful run, for a task of a scheduled DAG.

    ``suffixes``: the file name endings kept (``DOCUMENT_SUFFIXES`` for documents too).

    The window is :func:`run_window` of the task's context: every image on the first run, then from
    the end of the last successful run's data interval less ``lookback`` to the end of this run's.
    A failed or skipped run leaves nothing behind: the next successful one covers its interval too.
    """
    since, until = run_window(context, lookback=lookback)
    return list_images(prefix, since=since, until=until, recursive=recursive, suffixes=suffixes)


def run_window(
    context: Any, *, lookback: timedelta = DEFAULT_LOOKBACK
) -> tuple[datetime | None, datetime | None]:
    """``(since, until)`` for this run.

    Since the last successful run's data interval end less ``lookback`` (None on the first run),
    until this run's data interval end (None for a run without one, such as a manual run on
    Airflow 3: up to now).
    """
    previous = _moment(context.get("prev_data_interval_end_success"))
    return (previous - lookback if previous is not None else None), _moment(context.get("data_interval_end"))


def _moment(value: Any) -> datetime | None:
    """A context value as a plain datetime or None (Airflow 3 hands some as lazy proxies, even of None)."""
    if not value:
        return None
    return value + timedelta(0)


def stored_at(info: dict[str, Any]) -> datetime | None:
    """When the storage says a file was last written, from its listing entry; None if it does not say."""
    for key in _TIME_FIELDS:
        value = info.get(key)
        if isinstance(value, datetime):
            return _aware(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, tz=timezone.utc)
        if isinstance(value, str) and value:
            try:
                return _aware(datetime.fromisoformat(value.replace("Z", "+00:00")))
            except ValueError:
                continue
    return None


def _aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)
