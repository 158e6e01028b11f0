"""The manifest: which source is which content and which result, by what its storage tells cheaply.

A DAG that runs every day over a folder or bucket prefix that only grows would otherwise read and
hash every image to learn that it is parsed already: the whole corpus downloaded to find the few
new files. The manifest remembers each source's fingerprint (what its storage lists without
reading it), its content's sha256 and its result folder, in objects under
``<output_path>/_manifest/v1/``; an unchanged source is not opened at all.

- :mod:`~airflow_provider_doc2x.storage.manifest.format`: the versioned format on storage, read
  by other releases (objects, entries, results; what a later release wrote is kept as it was).
- :mod:`~airflow_provider_doc2x.storage.manifest.shards`: the merge of concurrent writers without
  locks (unique objects, newest entry wins, compaction deletes only what it read).
- :mod:`~airflow_provider_doc2x.storage.manifest.policy`: which images are skipped and what is
  recorded (:class:`Manifest`, the fingerprints, the split of a task's sources).
- :mod:`~airflow_provider_doc2x.storage.manifest.recovery`: lost entries rebuilt from the sidecars.

This package re-exports the names the operator, the tests and the benches use.
"""

from __future__ import annotations

from airflow_provider_doc2x.storage.manifest.format import (
    FORMAT,
    LAYOUT_DIR,
    MANIFEST_DIR,
    MAX_OBJECT_BYTES,
    OBJECT_KEYS,
    PARSED,
    READ,
    READABLE_VERSIONS,
    SHARDS,
    VERSION,
    Entry,
    Parsed,
    Result,
    shard_of,
    source_key,
)
from airflow_provider_doc2x.storage.manifest.policy import (
    LIST_FOLDER_AT,
    Fingerprints,
    Manifest,
    Split,
    fingerprint,
)
from airflow_provider_doc2x.storage.manifest.shards import (
    ATOMIC_PUT_SCHEMES,
    COMPACT_AT,
    READS_IN_FLIGHT,
    storage_error_of,
)

__all__ = [
    "ATOMIC_PUT_SCHEMES",
    "COMPACT_AT",
    "FORMAT",
    "LAYOUT_DIR",
    "LIST_FOLDER_AT",
    "MANIFEST_DIR",
    "MAX_OBJECT_BYTES",
    "OBJECT_KEYS",
    "PARSED",
    "READ",
    "READABLE_VERSIONS",
    "READS_IN_FLIGHT",
    "SHARDS",
    "VERSION",
    "Entry",
    "Fingerprints",
    "Manifest",
    "Parsed",
    "Result",
    "Split",
    "fingerprint",
    "shard_of",
    "source_key",
    "storage_error_of",
]
