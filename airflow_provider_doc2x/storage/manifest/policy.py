"""The manifest's policy: which images are unchanged and never opened, and what a task records.

The manifest remembers, for each source URI, its *fingerprint* as the storage describes it without
reading it (the size plus the version tokens it lists: ETag, generation, modification time, change
time), taken **before** the file was read, with the sha256 of what was read and the result folder.
A source whose fingerprint is unchanged is not opened at all and its record comes from the
manifest; a new or changed one is read, hashed and looked up in the content cache as before, so
identical content under a new name is still not billed. An entry is trusted only as far as it
goes: a fingerprint that does not match, or an entry of another model, means a read.

A deferrable task reads the shards of its images in both halves (the second runs in another
process, with nothing of the first in memory but what it saved): with scans of megabytes against
entries of about 300 bytes that is little, but it is twice the manifest's share of the reads.
"""

from __future__ import annotations

import math
import posixpath
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import job
from airflow_provider_doc2x.storage.manifest.format import (
    LAYOUT_DIR,
    MANIFEST_DIR,
    PARSED,
    READ,
    SHA256,
    SHARDS,
    Entry,
    Result,
    Unusable,
    log,
    shard_of,
    shards_of,
    source_key,
)
from airflow_provider_doc2x.storage.manifest.recovery import SidecarRecovery
from airflow_provider_doc2x.storage.manifest.shards import COMPACT_AT, Shards
from airflow_provider_doc2x.storage.results import ResultStore
from airflow_provider_doc2x.storage.sources import ImageSource

#: Images of one task in one folder at which that folder is listed once (its sizes and version
#: tokens come with the listing) instead of one metadata call per image.
LIST_FOLDER_AT = 64
#: Fingerprint fields, each the first of its keys that the storage's ``info`` gives (fsspec names
#: them per backend: s3fs, gcsfs, adlfs, the local and memory filesystems).
_FINGERPRINT_FIELDS = (
    ("etag", ("ETag", "etag", "e_tag")),
    ("generation", ("generation",)),
    ("mtime", ("mtime", "LastModified", "last_modified", "updated", "modified")),
    ("ctime", ("created",)),
)


def fingerprint(info: Mapping[str, Any] | None) -> str | None:
    """A file's fingerprint from its storage metadata (one ``info`` or one listing entry), or None.

    The size plus every version token the storage gives: ETag, generation, modification time and,
    on a local disk, change time (a rewrite that keeps size and mtime still changes it). Datetimes
    and epoch numbers are written alike, so a listing and an ``info`` of one file agree. None when
    the storage gives no token beyond the size: such a file is never skipped, it is always read.
    """
    if not isinstance(info, Mapping) or info.get("type", "file") != "file":
        return None
    size = info.get("size")
    if type(size) is not int or size < 0:
        return None
    parts = [f"size={size}"]
    for label, keys in _FINGERPRINT_FIELDS:
        for key in keys:
            token = _token(info.get(key))
            if token:
                parts.append(f"{label}={token}")
                break
    return ";".join(parts) if len(parts) > 1 else None


def _token(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, datetime):
        value = (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, (int, float)):
        return f"{float(value):.6f}" if math.isfinite(value) else None
    text = str(value).strip().replace(";", ",")
    return text[:200] or None


def _listing_by_name(fs: Any, folder: str) -> dict[str, Any]:
    """A folder's entries (with their metadata) by base name, freshly listed; empty if it cannot be listed."""
    fs.invalidate_cache(folder)  # a cached listing would give a replaced file its old fingerprint
    try:
        listed = fs.ls(folder, detail=True)
    except (OSError, ValueError):
        return {}
    return {
        posixpath.basename(item["name"].rstrip("/")): item
        for item in listed
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    }


class Fingerprints:
    """A task's sources' fingerprints, taken before any is read, and handed to the sidecars.

    :param results: the task's result store: it writes each source's fingerprint into its sidecar,
        so that a lost manifest can be rebuilt without reading the images again.
    :param list_folder_at: images of one folder at which the folder is listed once instead of one
        metadata call per image.
    """

    def __init__(self, results: ResultStore, *, list_folder_at: int = LIST_FOLDER_AT) -> None:
        self.results = results
        self.list_folder_at = max(1, list_folder_at)
        self._taken: dict[str, str] = {}  # source -> fingerprint taken before this task read it

    def get(self, source: str) -> str | None:
        """The fingerprint this task took (or recalled) for a source."""
        return self._taken.get(source)

    def recall(self, source: str, fp: str) -> None:
        """A fingerprint the task's first half took (a resumed task finds it in the entry it saved)."""
        if source not in self._taken:
            self._taken[source] = self.results.fingerprints[source] = fp

    def take(self, sources: Sequence[ImageSource]) -> dict[str, str]:
        """Each source's fingerprint (sources with none are left out), remembered for the sidecars.

        A folder holding at least ``list_folder_at`` of the sources is listed once; any other source
        (or one the listing missed) costs one metadata call. Nothing is read. Both come from the
        storage, never from a listing the filesystem cached in this process (s3fs keeps one, and
        fills it with any listing of the folder, such as :func:`~airflow_provider_doc2x.storage.listing.list_images`'s):
        a file replaced since would keep its old fingerprint, and its old result.
        """
        groups: dict[tuple[int, str], list[ImageSource]] = {}
        for source in sources:
            groups.setdefault((id(source.path.fs), posixpath.dirname(source.path.path)), []).append(source)
        taken: dict[str, str] = {}
        for (_, parent), members in groups.items():
            fs = members[0].path.fs
            fs.invalidate_cache(parent)
            listed: dict[str, Any] = {}
            if len(members) >= self.list_folder_at:
                listed = _listing_by_name(fs, parent)
            for source in members:
                info = listed.get(posixpath.basename(source.path.path))
                if info is None:
                    try:
                        info = source.path.fs.info(source.path.path)
                    except (OSError, ValueError):
                        continue  # missing or unreadable: the image check names it
                fp = fingerprint(info)
                if fp is not None:
                    taken[source.uri] = fp
        self._taken.update(taken)
        self.results.fingerprints.update(taken)
        return taken


class Manifest:
    """The manifest of one ``output_path``, as one task sees it: loaded shard by shard when needed.

    It decides; :class:`Fingerprints` takes the fingerprints, :class:`Shards` reads, merges and
    writes the objects, and :class:`SidecarRecovery` rebuilds lost entries.

    :param results: the task's result store (the manifest lives under its root, and seeds it with
        the results it knows, so that the content cache answers them from memory).
    :param overwrite: the task parses everything again: nothing is skipped, but the fingerprints
        are still taken and recorded. By default, the result store's.
    :param deferrable: the task may defer, and resume in another process: what it read is saved
        before it defers, for its second half to record.
    :param compact_at: objects in a shard at which a writer folds them into one (a shard whose
        objects hold more superseded entries than half its live ones is folded too).
    :param list_folder_at: images of one folder at which the folder is listed once instead of one
        metadata call per image.
    """

    def __init__(
        self,
        results: ResultStore,
        *,
        overwrite: bool | None = None,
        deferrable: bool = True,
        compact_at: int = COMPACT_AT,
        list_folder_at: int = LIST_FOLDER_AT,
    ) -> None:
        self.results = results
        self.folder = results.root / MANIFEST_DIR / LAYOUT_DIR
        self.overwrite = results.overwrite if overwrite is None else overwrite
        self.deferrable = deferrable
        self.shards = Shards(self.folder, compact_at=compact_at)
        self.fingerprints = Fingerprints(results, list_folder_at=list_folder_at)
        self._recovery = SidecarRecovery(results)
        self._answered: dict[str, str] = {}  # source -> sha256 of the record answered from its entry

    def partition(self, sources: Sequence[ImageSource]) -> Split:
        """Split a task's sources into those the manifest answers (never opened) and those to read.

        Each source's fingerprint is taken first (from a listing of its folder, or one metadata
        call); a source whose fingerprint matches its entry, and whose result is complete, is known.
        """
        fingerprints = self.take_fingerprints(sources)
        known: dict[str, dict[str, Any]] = {}
        if not self.overwrite:
            self.shards.load(shards_of(fingerprints))
            to_recover = []
            for source in sources:
                fp = fingerprints.get(source.uri)
                if fp is None or source.uri in known:
                    continue
                entry = self.shards.entry(source.uri)
                if entry is None or not entry.usable:
                    shard = shard_of(source_key(source.uri))
                    if entry is None and (not self.shards.exists or self.shards.damaged(shard)):
                        to_recover.append(source)
                elif entry.fingerprint == fp and (record := self._known_record(source.uri, entry)):
                    known[source.uri] = record
            if to_recover:
                known.update(self._recover(to_recover, fingerprints))
        split = Split(self, list(sources), known)
        log.info(
            "Manifest: %d of %d images unchanged since they were parsed (not read); %d to read",
            len(sources) - len(split.to_read),
            len(sources),
            len(split.to_read),
        )
        return split

    def take_fingerprints(self, sources: Sequence[ImageSource]) -> dict[str, str]:
        """Each source's fingerprint (sources with none are left out): see :meth:`Fingerprints.take`."""
        return self.fingerprints.take(sources)

    def resume(self, event: Any) -> None:
        """Prepare a resumed task's records.

        Before a resumed task collects its records: answer the known results from memory, and
        recall the fingerprints this task's first half took (it saved them before deferring).
        """
        jobs = event.get("jobs") if isinstance(event, dict) else None
        if not isinstance(jobs, list):
            return  # the event is refused where it is validated
        wanted = {
            item["source"]: item["sha256"]
            for item in jobs
            if isinstance(item, dict)
            and item.get("status") == protocol.STATUS_SUCCESS
            and isinstance(item.get("source"), str)
            and isinstance(item.get("sha256"), str)
        }
        self.shards.load(shards_of(wanted))
        for uri, sha256 in wanted.items():
            entry = self.shards.entry(uri)
            if entry is None or entry.sha256 != sha256 or not entry.usable:
                continue
            self.fingerprints.recall(uri, entry.fingerprint)
            if (
                entry.result is not None
                and not entry.legacy
                and entry.model == self.results.model
                and not self.overwrite
            ):
                self.results.remember(self._record_of(uri, entry.sha256, entry.result))
                self._answered[uri] = entry.sha256

    def note(self, source: str, sha256: str | None) -> None:
        """A source was read and hashed: its fingerprint (taken before the read) is this content."""
        fp = self.fingerprints.get(source)
        if fp is None or not sha256 or not SHA256.fullmatch(sha256):
            return
        current = self.shards.pending(source) or self.shards.entry(source)
        if current is not None and current.fingerprint == fp and current.sha256 == sha256 and current.usable:
            return
        after = self.shards.after(current)
        self.shards.stage(source, Entry(fp, sha256, after, model=self.results.model, status=READ))

    def record(self, records: Iterable[dict[str, Any]]) -> None:
        """After a task's results are written: each source's complete entry, saved."""
        for record in records:
            source, sha256 = record.get("source"), record.get("sha256")
            if not isinstance(source, str) or not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
                continue
            fp = self.fingerprints.get(source)
            if fp is None or self._answered.get(source) == sha256:
                continue  # no fingerprint, or answered from its entry: nothing new to record
            result = self._result_of(record, sha256)
            if result is None:
                continue
            self.shards.load(shards_of([source]))
            current = self.shards.current(source)
            entry = Entry(fp, sha256, self.shards.after(current), result, self.results.model)
            if current is not None and current.to_json() | {"at": 0} == entry.to_json() | {"at": 0}:
                self.shards.unstage(source)
                continue
            self.shards.stage(source, entry)
        self.save()

    def save(self) -> None:
        """Write the staged entries: one new object per shard touched; compact a shard grown large."""
        self.shards.save()

    @property
    def exists(self) -> bool:
        """Whether any manifest object is under ``output_path`` (from the one listing)."""
        return self.shards.exists

    def entries(self) -> dict[str, Entry]:
        """Every entry of every shard, merged (for inspection and tests: reads the whole manifest)."""
        self.shards.load({f"{shard:02x}" for shard in range(SHARDS)})
        return self.shards.merged()

    def _known_record(self, source: str, entry: Entry) -> dict[str, Any] | None:
        """The record of an unchanged source: from the entry, or (no result recorded) the content cache.

        An entry of another model answers nothing. An entry of version 1 is trusted only once the
        sidecar in its folder says it is this content's (by ``v2``), and is then recorded anew; so
        is an entry found under the spelling of its source with a connection id.
        """
        if entry.result is not None and entry.model == self.results.model:
            if entry.legacy:
                meta = self.results.sidecar_named(entry.result.folder)
                if meta is None or not self.results.holds(meta, entry.sha256):
                    return None
            record = self._record_of(source, entry.sha256, entry.result)
            self.results.remember(record)
            self._answered[source] = entry.sha256
            if entry.legacy or self.shards.current(source) is None:
                renewed = replace(entry, at=self.shards.after(entry), model=self.results.model, status=PARSED)
                self.shards.stage(source, renewed)
            return record
        # Read and hashed by an earlier task that did not record its result: one sidecar probe.
        cached = self.results.cached(entry.sha256, source)
        if cached is None:
            return None
        record = {**cached, "source": source}
        result = self._result_of(record, entry.sha256)
        if result is not None:
            after = self.shards.after(entry)
            self.shards.stage(
                source, Entry(entry.fingerprint, entry.sha256, after, result, self.results.model)
            )
        return record

    def _recover(
        self, sources: list[ImageSource], fingerprints: Mapping[str, str]
    ) -> dict[str, dict[str, Any]]:
        """The records of these sources that the sidecars give, their entries staged anew."""
        state = (
            "missing"
            if not self.shards.exists
            else "partly unusable"
            if self.shards.corrupt
            else "partly unreadable"
        )
        known: dict[str, dict[str, Any]] = {}
        for uri, (sha256, result) in self._recovery.recover(sources, fingerprints, state).items():
            record = self._record_of(uri, sha256, result)
            self.results.remember(record)
            self.shards.stage(uri, Entry(fingerprints[uri], sha256, time.time(), result, self.results.model))
            known[uri] = record
        return known

    def _record_of(self, source: str, sha256: str, result: Result) -> dict[str, Any]:
        meta = {
            "source": source,
            "uid": result.uid,
            "sha256": sha256,
            "markdown": result.markdown,
            "figures": list(result.figures),
            **{
                key: result.extra[key]
                for key in ("source_format", "converted", "document")
                if key in result.extra
            },
        }
        pages = result.extra.get("document_pages")
        if (
            meta.get("document") is True
            and isinstance(pages, int)
            and not isinstance(pages, bool)
            and pages > 0
        ):
            meta["pages"] = [{"page": n + 1, "page_idx": n} for n in range(min(pages, 100_000))]
        return self.results.record_of(result.folder, meta)

    def _result_of(self, record: dict[str, Any], sha256: str) -> Result | None:
        """A written record's result, relative to the root; None if it is not a result folder there."""
        markdown_path, figure_paths = record.get("markdown_path"), record.get("figure_paths") or []
        if not isinstance(markdown_path, str) or not isinstance(figure_paths, list):
            return None
        prefix, _, markdown = markdown_path.rpartition("/")
        folder = prefix.rpartition("/")[2]
        if self.results.uri_of(folder) != prefix:
            return None
        figures = []
        for path in figure_paths:
            if not isinstance(path, str) or not path.startswith(prefix + "/"):
                return None
            figures.append(path[len(prefix) + 1 :])
        uid = record.get("uid")
        # How the source travelled, and a document's page count: its record is whole again from the
        # manifest alone (a document's page ``n`` is its PDF's page_idx ``n - 1``).
        travelled: dict[str, Any] = {
            key: record[key] for key in ("source_format", "converted", "document") if key in record
        }
        if record.get("document") is True and isinstance(record.get("pages"), list):
            travelled["document_pages"] = len(record["pages"])
        try:
            return Result.from_json(
                {"folder": folder, "uid": uid, "markdown": markdown, "figures": figures, **travelled}, sha256
            )
        except Unusable:
            return None


class Split:
    """A task's sources as the manifest splits them.

    ``known`` (source -> record, never opened) and ``to_read``; :meth:`jobs` and :meth:`records`
    put the two back together in input order.
    """

    def __init__(self, manifest: Manifest, sources: list[ImageSource], known: dict[str, dict[str, Any]]):
        self.manifest = manifest
        self.sources = sources
        self.known = known
        self.to_read = [source for source in sources if source.uri not in known]

    def jobs(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """All jobs in input order, from the jobs of ``to_read``.

        Each content read is noted, and saved if the task may defer (its second half may run in
        another process).
        """
        merged = self._merge(
            jobs,
            lambda record: job(record["uid"], record["source"], record["sha256"], protocol.STATUS_SUCCESS),
        )
        if self.manifest.deferrable and any(item.get("status") != protocol.STATUS_SUCCESS for item in merged):
            self.manifest.save()
        return merged

    def records(self, outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """All records (or failed jobs) in input order, from those of ``to_read``."""
        return self._merge(outcomes, dict)

    def _merge(self, outcomes: list[dict[str, Any]], known_as: Any) -> list[dict[str, Any]]:
        if len(outcomes) != len(self.to_read):
            raise ValueError(f"{len(outcomes)} outcomes for {len(self.to_read)} images read")
        read = iter(outcomes)
        merged = []
        for source in self.sources:
            if source.uri in self.known:
                merged.append(known_as(self.known[source.uri]))
                continue
            item = next(read)
            self.manifest.note(source.uri, item.get("sha256"))
            merged.append(item)
        return merged
