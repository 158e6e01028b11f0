"""Entries the manifest has lost, rebuilt from the sidecars: a missing or damaged manifest costs reads, not bills.

Entries that are missing (no manifest at all, or a shard with an unusable or unreadable object)
are rebuilt from the sidecars, which carry the fingerprint of the source that produced them
(``source_fingerprint``); a sidecar without one (written before the manifest existed) rebuilds
nothing, and its image is read. A sidecar counts only as far as it goes: another source's, a
fingerprint that does not match, or another model's result means a read.
"""

from __future__ import annotations

from collections.abc import Mapping

from airflow_provider_doc2x.storage.manifest.format import (
    RESULT_FOLDER,
    SHA256,
    Result,
    Unusable,
    log,
    source_key,
)
from airflow_provider_doc2x.storage.results import ResultStore, folder_name
from airflow_provider_doc2x.storage.sources import ImageSource


class SidecarRecovery:
    """Finds the results of sources whose entries are missing, in their sidecars (one listing of the root).

    A result folder is named after its source (``<stem>-<sha12>``, or ``<stem>.<model>-<sha12>``
    beside another model's), so only the folders of each source's own name are read.

    :param results: the task's result store, whose root is listed and whose sidecars are read.
    """

    def __init__(self, results: ResultStore) -> None:
        self.results = results
        self._warned = False

    def recover(
        self, sources: list[ImageSource], fingerprints: Mapping[str, str], state: str
    ) -> dict[str, tuple[str, Result]]:
        """Each source's content and result (source -> (sha256, result)) whose sidecar names it and its fingerprint now.

        ``state`` says, in the warning given once, why entries are being rebuilt (the manifest is
        ``missing``, ``partly unusable`` or ``partly unreadable``).
        """
        by_stem: dict[str, list[str]] = {}
        for child in self.results.folder_names():
            if RESULT_FOLDER.fullmatch(child):
                by_stem.setdefault(child.rsplit("-", 1)[0], []).append(child)
        if not by_stem:
            return {}  # nothing parsed here yet: a first run, nothing to rebuild
        if not self._warned:
            self._warned = True
            log.warning(
                "Manifest under %s is %s: rebuilding the entries of %d images from the sidecars",
                self.results.root,
                state,
                len(sources),
            )
        found: dict[str, tuple[str, Result]] = {}
        for source in sources:
            stem = folder_name(source.uri, "0" * 64).rsplit("-", 1)[0]
            by_model = folder_name(source.uri, "0" * 64, model=self.results.model).rsplit("-", 1)[0]
            for candidate in [*by_stem.get(stem, []), *by_stem.get(by_model, [])]:
                result = self._result_in(candidate, source.uri, fingerprints[source.uri])
                if result is not None:
                    found[source.uri] = result
                    break
        log.info("Manifest: %d of %d entries rebuilt from the sidecars", len(found), len(sources))
        return found

    def _result_in(self, candidate: str, source: str, fp: str) -> tuple[str, Result] | None:
        """The content and result the sidecar of the folder ``candidate`` gives for this source and fingerprint, if any."""
        meta = self.results.sidecar_named(candidate)
        if (
            not meta
            or not isinstance(meta.get("source"), str)
            or source_key(meta["source"]) != source_key(source)
            or meta.get("source_fingerprint") != fp
        ):
            return None
        sha256 = meta.get("sha256")
        if not isinstance(sha256, str) or not self.results.holds(meta, sha256):
            return None  # another model's result: the image is read, and parsed by this one
        try:
            if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
                raise Unusable("no sha256")
            result = Result.from_json(
                {
                    "folder": candidate,
                    "uid": meta.get("uid"),
                    "markdown": meta.get("markdown"),
                    "figures": meta.get("figures", []),
                },
                sha256,
            )
        except Unusable:
            return None
        return sha256, result
