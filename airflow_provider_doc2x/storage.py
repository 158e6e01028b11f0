"""One way to name storage: a local path or any ``ObjectStoragePath`` URI becomes an ``ObjectStoragePath``.

Inputs (images) and outputs (results) both go through here, so that a local path means the same
``file://`` location everywhere, and every read and write passes through ``ObjectStoragePath``,
which feeds Airflow's hook-level lineage.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit


def storage_path(value: Any) -> Any:
    """``value`` (a local path, a URI, or already an ``ObjectStoragePath``) as an ``ObjectStoragePath``."""
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    if isinstance(value, ObjectStoragePath):
        return value
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    return ObjectStoragePath(text if "://" in text else f"file://{os.path.abspath(text)}")


def scheme_of(value: Any) -> str:
    """The URI scheme of a path or URI, lower case; ``file`` for a local path."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if "://" not in text:
        return "file"
    return urlsplit(text).scheme.lower()
