"""Deprecated home of :mod:`airflow_provider_doc2x.storage.listing`, kept so that DAGs written for earlier releases import.

``from airflow_provider_doc2x.listing import list_new_images`` (what the incremental example of
earlier releases showed) still works and warns once; import from
``airflow_provider_doc2x.storage.listing`` instead.
"""

from __future__ import annotations

import warnings

from airflow.exceptions import AirflowProviderDeprecationWarning

from airflow_provider_doc2x.storage.listing import (
    DEFAULT_LOOKBACK,
    IMAGE_SUFFIXES,
    list_images,
    list_new_images,
    run_window,
    stored_at,
)

__all__ = ["DEFAULT_LOOKBACK", "IMAGE_SUFFIXES", "list_images", "list_new_images", "run_window", "stored_at"]

warnings.warn(
    "airflow_provider_doc2x.listing moved to airflow_provider_doc2x.storage.listing; import from there",
    AirflowProviderDeprecationWarning,
    stacklevel=2,
)
