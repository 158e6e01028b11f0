"""Where images come from and results go: object storage through ``ObjectStoragePath``.

The one way to name and call storage (:mod:`~airflow_provider_doc2x.storage.objects`) is offered
here by name too, as the single ``storage`` module of earlier releases offered it.
"""

from __future__ import annotations

from airflow_provider_doc2x.exceptions import Doc2XStorageError
from airflow_provider_doc2x.storage.objects import (
    ensure_filesystem,
    is_storage_failure,
    remove_object,
    scheme_of,
    storage_call,
    storage_error,
    storage_path,
)

__all__ = [
    "Doc2XStorageError",
    "ensure_filesystem",
    "is_storage_failure",
    "remove_object",
    "scheme_of",
    "storage_call",
    "storage_error",
    "storage_path",
]
