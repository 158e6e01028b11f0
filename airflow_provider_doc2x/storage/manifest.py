"""The manifest: which source is which content and which result, by what its storage tells cheaply.

A DAG that runs every day over a folder or bucket prefix that only grows would otherwise read and
hash every image to learn that it is parsed already: the whole corpus downloaded to find the few
new files. The manifest remembers, for each source URI, its *fingerprint* as the storage describes
it without reading it (the size plus the version tokens it lists: ETag, generation, modification
time, change time), taken **before** the file was read, with the sha256 of what was read and the
result folder. A source whose fingerprint is unchanged is not opened at all and its record comes
from the manifest; a new or changed one is read, hashed and looked up in the content cache as
before, so identical content under a new name is still not billed.

It lives under ``output_path``, one flat folder that one listing shows whole::

    <output_path>/_manifest/v1/
        3f.base.20260102T030405123456Z.<id>.json     # shard 3f: entries folded by a compaction
        3f.delta.20260102T031122000001Z.<id>.json    # shard 3f: the new entries of one task
        ...

Each object is JSON: ``{"format", "version": 2, "shard", "writer", "entries"}``, an entry per
source: ``{"fingerprint": "size=...;etag=...;mtime=...", "sha256", "at", "status", "model",
"result": {"folder", "uid", "markdown", "figures"}}``.

- ``status`` is ``parsed`` (``result`` says where) or ``read`` (``result`` is null: read and hashed
  by a task that deferred and has not recorded its result yet). Room is left for entries that are
  neither (a failure recorded without a result, as a later release may write): this release keeps
  them exactly as they were written, whatever their other keys hold, answers nothing from them (so
  their images are read), and never deletes an object that holds one.
- An entry of a known status that is not valid is dropped alone (with a warning; its image is
  rebuilt from its sidecar or read again): the other entries of its object are used, and carried
  into the object that folds it.
- ``model`` is the Doc2X model that made the result; an entry of another model than the task's
  answers nothing. Version 1 (the first release) had neither key: its entries count as ``v2``, the
  only model then, and their result folder's sidecar is checked once before it is trusted (that
  release could record another image's folder for a content), after which they are recorded anew.
- Keys: the source URI without its connection id (``s3://aws_default@bucket/key`` and
  ``s3://bucket/key`` are one object; a host and port the URI carries stay, so two endpoints
  stay apart). Entries written under the spelling with the connection id are still found.
- A later release adds keys without changing the meaning of these; a change of meaning raises
  ``version``. An entry or result with keys this release does not know is used by the keys it
  knows, and those keys are kept when this release folds it into a new object. An object with
  top-level keys this release does not know is read but never deleted or folded away; an object of
  a higher version is left alone, not read, never deleted.

Why this shape, for object stores that have neither locks nor an atomic rename (S3, GCS):

- **Immutable, uniquely named objects.** A writer only ever adds objects under names of its own
  (a timestamp and a random writer id), so concurrent tasks writing one ``output_path`` (mapped
  tasks) cannot overwrite, and so cannot lose, each other's entries.
- **The manifest is the merge of every object present.** For each source the newest entry wins
  (by the time it was recorded, ties broken by a total order), so objects can be merged in any
  order and an object read twice changes nothing.
- **Compaction deletes only what it read.** A writer that finds many objects in a shard writes
  one new base holding everything it read plus its own entries, then deletes exactly the objects
  it read, never one it did not. Whatever another writer added meanwhile survives; two compactions
  at once leave two bases, merged on read and by the next compaction. A reader that finds an
  object gone lists again once (its entries are in a newer base).
- **256 shards by the hash of the source URI.** A mapped task reads the shards of its own
  images (one image: 1/256 of the manifest; a batch of 50: about a sixth), not the whole
  manifest; a task over the whole prefix reads all of it, a few objects at a time.
- **Atomic objects.** On object stores (and ``memory://``) one PUT is atomic; elsewhere (a local
  or mounted filesystem, HDFS) an object is written under a temporary name, then renamed.

Every byte read back is treated as hostile. An object that was read and is not the JSON this
module writes (types, hashes, shard, folder names that stay inside ``output_path``, figure paths
that are plain relative paths) is ignored as a whole with a warning, and deleted when the task that
rebuilds its entries writes the shard again. An object that could not be read (a 5xx, throttling,
a timeout, after :func:`~airflow_provider_doc2x.storage.objects.storage_call`'s retries) is not corrupt:
it is left alone for this run, named in a warning, never deleted. A delete the storage denies
leaves a folded object behind with a warning: harmless, since its entries are in the new base. Entries that are missing (no manifest at all, or a
shard with a corrupt object) are rebuilt from the sidecars, which carry the fingerprint of the
source that produced them; a sidecar without one (written before the manifest existed) rebuilds
nothing, and its image is read. An entry is trusted only as far as it goes: a fingerprint that
does not match means a read.

A deferrable task reads the shards of its images in both halves (the second runs in another
process, with nothing of the first in memory but what it saved): with scans of megabytes against
entries of about 300 bytes that is little, but it is twice the manifest's share of the reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import job
from airflow_provider_doc2x.exceptions import Doc2XStorageError
from airflow_provider_doc2x.storage.archives import MAX_ZIP_ENTRIES, safe_member_path
from airflow_provider_doc2x.storage.objects import remove_object, storage_call
from airflow_provider_doc2x.storage.results import (
    LEGACY_MODEL,
    OBJECT_STORE_SCHEMES,
    ResultStore,
    folder_name,
    write,
)
from airflow_provider_doc2x.storage.sources import ImageSource

log = logging.getLogger(__name__)

#: What the objects say they are; an object of a later version is left alone, not trusted.
FORMAT = "airflow-provider-doc2x manifest"
VERSION = 2
#: The versions this release reads (and folds into objects of :data:`VERSION`).
READABLE_VERSIONS = frozenset({1, 2})
#: The keys of an object this release knows; an object with another is read but never deleted.
OBJECT_KEYS = frozenset({"format", "version", "shard", "writer", "entries"})
#: Entry states: a recorded result, or a content read whose result is not recorded yet.
PARSED, READ = "parsed", "read"
#: The manifest's folder under ``output_path``, and the folder of its layout there (the objects'
#: ``version`` is that of their content: objects of every version share the folder).
MANIFEST_DIR = "_manifest"
LAYOUT_DIR = "v1"
#: Shards (the first two hex digits of the sha256 of the source URI).
SHARDS = 256
#: Manifest objects read at once (object stores answer each read in tens of milliseconds).
READS_IN_FLIGHT = 8
#: Objects in a shard at which a writer folds them into one base.
COMPACT_AT = 16
#: Images of one task in one folder at which that folder is listed once (its sizes and version
#: tokens come with the listing) instead of one metadata call per image.
LIST_FOLDER_AT = 64
#: Larger than any manifest object this module writes for a realistic corpus; anything larger is refused.
MAX_OBJECT_BYTES = 256 * 1024 * 1024
#: Schemes whose single write is atomic (a reader sees the whole object or nothing).
ATOMIC_PUT_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "memory"})

_OBJECT_NAME = re.compile(
    r"^(?P<shard>[0-9a-f]{2})\.(?P<kind>base|delta)\.\d{8}T\d{12}Z\.[0-9a-f]{32}\.json$"
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FOLDER = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,79}-(?:[0-9a-f]{12}|[0-9a-f]{64})$")
_MAX_URI = 4096
_MAX_TEXT = 1024
#: Fingerprint fields, each the first of its keys that the storage's ``info`` gives (fsspec names
#: them per backend: s3fs, gcsfs, adlfs, the local and memory filesystems).
_FINGERPRINT_FIELDS = (
    ("etag", ("ETag", "etag", "e_tag")),
    ("generation", ("generation",)),
    ("mtime", ("mtime", "LastModified", "last_modified", "updated", "modified")),
    ("ctime", ("created",)),
)


class _Unusable(ValueError):
    """What was read back is not what this module writes."""


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


def shard_of(source: str) -> str:
    """The shard of a source URI: the first two hex digits of its sha256."""
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:2]


def source_key(uri: str) -> str:
    """A source's key in the manifest: its URI without the connection id (``user@``) it may carry.

    ``s3://aws_default@bucket/key`` and ``s3://bucket/key`` name one object; a host and port in the
    URI stay, so two endpoints with the same bucket name stay apart. (Two connections to different
    endpoints spelled with one bucket and key share an entry, which answers only while the
    fingerprint, ETag and time included, matches the object listed.)
    """
    scheme, separator, rest = uri.partition("://")
    if not separator:
        return uri
    netloc, slash, path = rest.partition("/")
    _, at, host = netloc.rpartition("@")
    return f"{scheme}://{host}{slash}{path}" if at else uri


def _extra(data: Mapping[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """The keys of a stored object that this release does not know: kept as they are."""
    known = set(known)
    return {key: value for key, value in data.items() if key not in known}


@dataclass(frozen=True)
class Result:
    """Where a content's result is, relative to ``output_path``: what its record is built from."""

    folder: str
    uid: str | None
    markdown: str
    figures: tuple[str, ...]
    #: Keys a later release added, kept as they were read.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    KEYS = ("folder", "uid", "markdown", "figures")

    def to_json(self) -> dict[str, Any]:
        """As stored in a manifest object."""
        return {
            **self.extra,
            "folder": self.folder,
            "uid": self.uid,
            "markdown": self.markdown,
            "figures": list(self.figures),
        }

    @classmethod
    def from_json(cls, data: Any, sha256: str) -> Result:
        """Validated: a folder directly under ``output_path`` named for this content, plain relative figures.

        The name only says the folder *may* be this content's: the sidecar there records whose it
        is (checked when the result was recorded, and once for entries of version 1).
        """
        if not isinstance(data, dict) or not set(cls.KEYS) <= set(data):
            raise _Unusable("a result is not an object with folder, uid, markdown and figures")
        folder, uid, markdown, figures = data["folder"], data["uid"], data["markdown"], data["figures"]
        if (
            not isinstance(folder, str)
            or not _FOLDER.fullmatch(folder)
            or folder.rsplit("-", 1)[1] not in (sha256[:12], sha256)
        ):
            raise _Unusable("a result folder is not <name>-<12 or 64 hex of its sha256>")
        if markdown != folder.rsplit("-", 1)[0] + ".md":
            raise _Unusable("a result's Markdown is not named after its folder")
        if uid is not None and (not isinstance(uid, str) or not 0 < len(uid) <= 200):
            raise _Unusable("a result's uid is not a short string")
        if not isinstance(figures, list) or len(figures) > MAX_ZIP_ENTRIES:
            raise _Unusable("a result's figures are not a list")
        for figure in figures:
            if not isinstance(figure, str) or safe_member_path(figure) != figure:
                raise _Unusable("a figure path is not a plain relative path")
        return cls(folder, uid, markdown, tuple(figures), _extra(data, cls.KEYS))


@dataclass(frozen=True)
class Entry:
    """What the manifest knows of one source: fingerprint, content, and (once written) its result."""

    fingerprint: str
    sha256: str
    at: float
    result: Result | None = None
    #: The model that made the result (:data:`~airflow_provider_doc2x.storage.results.LEGACY_MODEL` for an
    #: entry of version 1, which recorded none).
    model: str = LEGACY_MODEL
    #: None for an entry of version 1 (no ``status``, no ``model``); else its ``status``.
    status: str | None = PARSED
    #: Keys a later release added, kept as they were read.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    KEYS = ("fingerprint", "sha256", "at", "result")

    @property
    def legacy(self) -> bool:
        """Written by the first release: no model recorded, and its folder not checked against its sidecar."""
        return self.status is None

    @property
    def usable(self) -> bool:
        """Whether this release may answer from it (a state it knows)."""
        return self.status in (None, PARSED, READ)

    def order(self) -> tuple[Any, ...]:
        """A total order: the newest wins, and among equals the one with a result (merging is commutative)."""
        return (self.at, self.result is not None, json.dumps(self.to_json(), sort_keys=True))

    def to_json(self) -> dict[str, Any]:
        """As stored in a manifest object (an entry of version 1 keeps that shape)."""
        if not self.usable:
            return dict(self.extra)  # a later release's entry: exactly as it was read
        data = {
            **self.extra,
            "fingerprint": self.fingerprint,
            "sha256": self.sha256,
            "at": self.at,
            "result": self.result.to_json() if self.result else None,
        }
        if self.status is not None:
            data["status"] = self.status
            data["model"] = self.model
        return data

    @classmethod
    def from_json(cls, data: Any) -> Entry:
        """Validated field by field; keys it does not know are kept.

        An entry whose ``status`` this release does not know is a later release's: it is kept whole,
        as it was written (its other keys may mean something else there), and answers nothing.
        """
        status = data.get("status") if isinstance(data, dict) else None
        if isinstance(status, str) and 0 < len(status) <= 64 and status not in (PARSED, READ):
            at = data.get("at")
            when = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else 0.0
            fingerprint, sha256 = data.get("fingerprint"), data.get("sha256")
            return cls(
                fingerprint if isinstance(fingerprint, str) else "",
                sha256 if isinstance(sha256, str) else "",
                when if math.isfinite(when) else 0.0,
                status=status,
                extra=dict(data),
            )
        if not isinstance(data, dict) or not set(cls.KEYS) <= set(data):
            raise _Unusable("an entry is not an object with fingerprint, sha256, at and result")
        fp, sha256, at = data["fingerprint"], data["sha256"], data["at"]
        if not isinstance(fp, str) or not 0 < len(fp) <= _MAX_TEXT:
            raise _Unusable("an entry's fingerprint is not a short string")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise _Unusable("an entry's sha256 is not 64 lower-case hex digits")
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
            raise _Unusable("an entry's time is not a number")
        status, model = data.get("status"), data.get("model", LEGACY_MODEL)
        if status is not None and (not isinstance(status, str) or not 0 < len(status) <= 64):
            raise _Unusable("an entry's status is not a short string")
        if not isinstance(model, str) or not 0 < len(model) <= 64:
            raise _Unusable("an entry's model is not a short string")
        if status is None and "model" in data:
            status = PARSED if data["result"] is not None else READ
        result = None if data["result"] is None else Result.from_json(data["result"], sha256)
        if status in (PARSED, READ) and (status == PARSED) != (result is not None):
            raise _Unusable(f"an entry's status {status!r} does not match its result")
        extra = _extra(data, (*cls.KEYS, "status", "model"))
        return cls(fp, sha256, float(at), result, model, status, extra)


@dataclass(frozen=True)
class Parsed:
    """One manifest object as read: its valid entries, whether a compaction may fold it, what was dropped."""

    entries: dict[str, Entry]
    #: False when it holds what this release does not understand (top-level keys, an entry of a later
    #: status): such an object is never deleted.
    foldable: bool
    #: The entries of a known status that were not valid, each with why (dropped alone).
    rejected: list[str]


def _newer(entry: Entry, other: Entry | None) -> bool:
    return other is None or entry.order() > other.order()


class Manifest:
    """The manifest of one ``output_path``, as one task sees it: loaded shard by shard when needed.

    :param results: the task's result store (the manifest lives under its root, and seeds it with
        the results it knows, so that the content cache answers them from memory).
    :param overwrite: the task parses everything again: nothing is skipped, but the fingerprints
        are still taken and recorded.
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
        overwrite: bool = False,
        deferrable: bool = True,
        compact_at: int = COMPACT_AT,
        list_folder_at: int = LIST_FOLDER_AT,
    ) -> None:
        self.results = results
        self.folder = results.root / MANIFEST_DIR / LAYOUT_DIR
        self.overwrite = overwrite
        self.deferrable = deferrable
        self.compact_at = max(2, compact_at)
        self.list_folder_at = max(1, list_folder_at)
        self._writer = uuid.uuid4().hex
        self._listing: dict[str, int] | None = None  # object name -> size, from one listing
        self._entries: dict[str, dict[str, Entry]] = {}  # shard -> source -> merged entry
        self._read: dict[str, set[str]] = {}  # shard -> objects read (what a compaction may delete)
        self._corrupt: dict[str, set[str]] = {}  # shard -> objects read and found unusable
        self._kept: dict[str, set[str]] = {}  # shard -> objects read that are never deleted (newer keys)
        self._left: dict[str, set[str]] = {}  # shard -> objects not read: unreadable now, or a newer version
        self._unreadable: set[str] = set()  # shards with an object that could not be read this run
        self._stored: dict[str, int] = {}  # shard -> entries in the objects read, superseded or not
        self._fingerprints: dict[str, str] = {}  # source -> fingerprint taken before this task read it
        self._pending: dict[str, Entry] = {}  # source key -> entry to write at the next save
        self._answered: dict[str, str] = {}  # source -> sha256 of the record answered from its entry
        self._warned_missing = False

    # -- what the operator calls ---------------------------------------------------------------

    def partition(self, sources: Sequence[ImageSource]) -> Split:
        """Split a task's sources into those the manifest answers (never opened) and those to read.

        Each source's fingerprint is taken first (from a listing of its folder, or one metadata
        call); a source whose fingerprint matches its entry, and whose result is complete, is known.
        """
        fingerprints = self.take_fingerprints(sources)
        known: dict[str, dict[str, Any]] = {}
        if not self.overwrite:
            self._load(_shards(fingerprints))
            to_recover = []
            for source in sources:
                fp = fingerprints.get(source.uri)
                if fp is None or source.uri in known:
                    continue
                entry = self._entry(source.uri)
                if entry is None or not entry.usable:
                    shard = shard_of(source_key(source.uri))
                    if entry is None and (
                        not self.exists or self._corrupt.get(shard) or shard in self._unreadable
                    ):
                        to_recover.append(source)
                elif entry.fingerprint == fp and (record := self._known_record(source.uri, entry)):
                    known[source.uri] = record
            if to_recover:
                known.update(self._recover(to_recover))
        split = Split(self, list(sources), known)
        log.info(
            "Manifest: %d of %d images unchanged since they were parsed (not read); %d to read",
            len(sources) - len(split.to_read),
            len(sources),
            len(split.to_read),
        )
        return split

    def take_fingerprints(self, sources: Sequence[ImageSource]) -> dict[str, str]:
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
        self._fingerprints.update(taken)
        self.results.fingerprints.update(taken)
        return taken

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
        self._load(_shards(wanted))
        for uri, sha256 in wanted.items():
            entry = self._entry(uri)
            if entry is None or entry.sha256 != sha256 or not entry.usable:
                continue
            if uri not in self._fingerprints:
                self._fingerprints[uri] = self.results.fingerprints[uri] = entry.fingerprint
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
        fp = self._fingerprints.get(source)
        if fp is None or not sha256 or not _SHA256.fullmatch(sha256):
            return
        current = self._pending.get(source_key(source)) or self._entry(source)
        if current is not None and current.fingerprint == fp and current.sha256 == sha256 and current.usable:
            return
        self._stage(source, Entry(fp, sha256, self._after(current), model=self.results.model, status=READ))

    def record(self, records: Iterable[dict[str, Any]]) -> None:
        """After a task's results are written: each source's complete entry, saved."""
        for record in records:
            source, sha256 = record.get("source"), record.get("sha256")
            if not isinstance(source, str) or not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
                continue
            fp = self._fingerprints.get(source)
            if fp is None or self._answered.get(source) == sha256:
                continue  # no fingerprint, or answered from its entry: nothing new to record
            result = self._result_of(record, sha256)
            if result is None:
                continue
            self._load(_shards([source]))
            current = self._current(source)
            entry = Entry(fp, sha256, self._after(current), result, self.results.model)
            if current is not None and current.to_json() | {"at": 0} == entry.to_json() | {"at": 0}:
                self._pending.pop(source_key(source), None)
                continue
            self._stage(source, entry)
        self.save()

    def save(self) -> None:
        """Write the staged entries: one new object per shard touched; compact a shard grown large."""
        if not self._pending:
            return
        by_shard: dict[str, dict[str, Entry]] = {}
        for key, entry in self._pending.items():
            by_shard.setdefault(shard_of(key), {})[key] = entry
        self._load(set(by_shard))
        for shard, entries in sorted(by_shard.items()):
            merged = self._entries[shard]
            for key, entry in entries.items():
                if _newer(entry, merged.get(key)):
                    merged[key] = entry
            stored = self._stored[shard] + len(entries)
            superseded = stored - len(merged)
            # A shard with an unusable object is healed at once: folded, and that object deleted.
            # A compaction's base holds the new entries too, so no delta is written before it.
            if (
                self._corrupt[shard]
                or len(self._read[shard]) + 1 >= self.compact_at
                or superseded > len(merged) // 2
            ):
                self._compact(shard)
                continue
            name = self._put(shard, "delta", entries)
            self._read[shard].add(name)  # ours, and folded like the others at a compaction
            self._stored[shard] = stored
        self._pending.clear()

    @property
    def exists(self) -> bool:
        """Whether any manifest object is under ``output_path`` (from the one listing)."""
        return any(_OBJECT_NAME.fullmatch(name) for name in self._list())

    def entries(self) -> dict[str, Entry]:
        """Every entry of every shard, merged (for inspection and tests: reads the whole manifest)."""
        self._load({f"{shard:02x}" for shard in range(SHARDS)})
        return {source: entry for shard in self._entries.values() for source, entry in shard.items()}

    # -- known results ----------------------------------------------------------------------------

    def _known_record(self, source: str, entry: Entry) -> dict[str, Any] | None:
        """The record of an unchanged source: from the entry, or (no result recorded) the content cache.

        An entry of another model answers nothing. An entry of version 1 is trusted only once the
        sidecar in its folder says it is this content's (by ``v2``), and is then recorded anew; so
        is an entry found under the spelling of its source with a connection id.
        """
        if entry.result is not None and entry.model == self.results.model:
            if entry.legacy:
                meta = self.results.sidecar(self.results.root / entry.result.folder)
                if meta is None or not self.results.holds(meta, entry.sha256):
                    return None
            record = self._record_of(source, entry.sha256, entry.result)
            self.results.remember(record)
            self._answered[source] = entry.sha256
            if entry.legacy or self._current(source) is None:
                self._stage(
                    source,
                    replace(entry, at=self._after(entry), model=self.results.model, status=PARSED),
                )
            return record
        # Read and hashed by an earlier task that did not record its result: one sidecar probe.
        cached = self.results.cached(entry.sha256, source)
        if cached is None:
            return None
        record = {**cached, "source": source}
        result = self._result_of(record, entry.sha256)
        if result is not None:
            self._stage(
                source, Entry(entry.fingerprint, entry.sha256, self._after(entry), result, self.results.model)
            )
        return record

    def _record_of(self, source: str, sha256: str, result: Result) -> dict[str, Any]:
        meta = {
            "source": source,
            "uid": result.uid,
            "sha256": sha256,
            "markdown": result.markdown,
            "figures": list(result.figures),
        }
        return self.results.record_of(result.folder, meta)

    def _result_of(self, record: dict[str, Any], sha256: str) -> Result | None:
        """A written record's result, relative to the root; None if it is not a result folder there."""
        markdown_path, figure_paths = record.get("markdown_path"), record.get("figure_paths") or []
        if not isinstance(markdown_path, str) or not isinstance(figure_paths, list):
            return None
        prefix, _, markdown = markdown_path.rpartition("/")
        folder = prefix.rpartition("/")[2]
        if str(self.results.root / folder) != prefix:
            return None
        figures = []
        for path in figure_paths:
            if not isinstance(path, str) or not path.startswith(prefix + "/"):
                return None
            figures.append(path[len(prefix) + 1 :])
        uid = record.get("uid")
        try:
            return Result.from_json(
                {"folder": folder, "uid": uid, "markdown": markdown, "figures": figures}, sha256
            )
        except _Unusable:
            return None

    def _recover(self, sources: list[ImageSource]) -> dict[str, dict[str, Any]]:
        """Rebuild the missing entries of these sources from the sidecars (one listing of the root).

        A result folder is named after its source (``<stem>-<sha12>``, or ``<stem>.<model>-<sha12>``
        beside another model's), so only the folders of each source's own name are read; a sidecar
        counts only if it names this source and the fingerprint the source has now.
        """
        by_stem: dict[str, list[Any]] = {}
        for child in self.results.folders():
            if _FOLDER.fullmatch(child.name):
                by_stem.setdefault(child.name.rsplit("-", 1)[0], []).append(child)
        if not by_stem:
            return {}  # nothing parsed here yet: a first run, nothing to rebuild
        if not self._warned_missing:
            self._warned_missing = True
            log.warning(
                "Manifest under %s is %s: rebuilding the entries of %d images from the sidecars",
                self.results.root,
                "missing"
                if not self.exists
                else "partly unusable"
                if any(self._corrupt.values())
                else "partly unreadable",
                len(sources),
            )
        known: dict[str, dict[str, Any]] = {}
        for source in sources:
            fp = self._fingerprints[source.uri]
            stem = folder_name(source.uri, "0" * 64).rsplit("-", 1)[0]
            by_model = folder_name(source.uri, "0" * 64, model=self.results.model).rsplit("-", 1)[0]
            for candidate in [*by_stem.get(stem, []), *by_stem.get(by_model, [])]:
                meta = self.results.sidecar(candidate)
                if (
                    not meta
                    or not isinstance(meta.get("source"), str)
                    or source_key(meta["source"]) != source_key(source.uri)
                    or meta.get("source_fingerprint") != fp
                ):
                    continue
                sha256 = meta.get("sha256")
                if not isinstance(sha256, str) or not self.results.holds(meta, sha256):
                    continue  # another model's result: the image is read, and parsed by this one
                try:
                    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
                        raise _Unusable("no sha256")
                    result = Result.from_json(
                        {
                            "folder": candidate.name,
                            "uid": meta.get("uid"),
                            "markdown": meta.get("markdown"),
                            "figures": meta.get("figures", []),
                        },
                        sha256,
                    )
                except _Unusable:
                    continue
                record = self._record_of(source.uri, sha256, result)
                self.results.remember(record)
                self._stage(source.uri, Entry(fp, sha256, time.time(), result, self.results.model))
                known[source.uri] = record
                break
        log.info("Manifest: %d of %d entries rebuilt from the sidecars", len(known), len(sources))
        return known

    # -- storage ------------------------------------------------------------------------------

    def _current(self, source: str) -> Entry | None:
        """The entry of a source under its key (its URI without a connection id)."""
        key = source_key(source)
        return self._entries.get(shard_of(key), {}).get(key)

    def _entry(self, source: str) -> Entry | None:
        """The entry of a source: under its key, or (written before keys dropped the connection id) its URI."""
        entry = self._current(source)
        if source_key(source) != source:
            spelled = self._entries.get(shard_of(source), {}).get(source)
            if spelled is not None and _newer(spelled, entry):
                entry = spelled
        return entry

    def _stage(self, source: str, entry: Entry) -> None:
        key = source_key(source)
        if _newer(entry, self._pending.get(key)):
            self._pending[key] = entry

    @staticmethod
    def _after(current: Entry | None) -> float:
        """Now, but after the entry it replaces (a worker's clock may lag another's)."""
        now = time.time()
        return max(now, current.at + 0.001) if current is not None else now

    def _list(self, *, refresh: bool = False) -> dict[str, int]:
        """The manifest's objects (name -> size), from one fresh listing (and a new one on ``refresh``)."""
        if self._listing is None or refresh:
            listed = storage_call(self._ls, what="listing the manifest", uri=str(self.folder))
            self._listing = {}
            for item in listed:
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    size = item.get("size")
                    self._listing[posixpath.basename(item["name"].rstrip("/"))] = (
                        size if isinstance(size, int) else 0
                    )
        return self._listing

    def _ls(self) -> list[Any]:
        fs = self.folder.fs
        # fsspec filesystems may answer a listing from their own cache (s3fs keeps one per process):
        # another task's objects, or its compaction, would not be seen.
        fs.invalidate_cache(self.folder.path)
        try:
            return fs.ls(self.folder.path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _load(self, shards: set[str]) -> None:
        """Read every object of these shards (once per task), merged; list again once if one vanished."""
        shards = {shard for shard in shards if shard not in self._entries}
        if not shards:
            return
        for shard in shards:
            self._entries[shard], self._read[shard], self._corrupt[shard] = {}, set(), set()
            self._kept[shard], self._left[shard] = set(), set()
            self._stored[shard] = 0
        if self._read_objects(self._list(), shards):
            # A compaction deleted what we listed: its entries are in a base we have not seen.
            self._read_objects(self._list(refresh=True), shards)

    def _read_objects(self, listing: dict[str, int], shards: set[str]) -> bool:
        """Read and merge the listed objects of these shards not read yet; True if one had vanished."""
        wanted = []
        for name, size in sorted(listing.items()):
            match = _OBJECT_NAME.fullmatch(name)
            if match and match["shard"] in shards:
                shard = match["shard"]
                seen = self._read[shard] | self._corrupt[shard] | self._kept[shard] | self._left[shard]
                if name not in seen:
                    wanted.append((name, size, shard))
        vanished = False
        with ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="doc2x-manifest") as pool:
            for (name, _, shard), (data, error) in zip(
                wanted, pool.map(lambda item: self._get(item[0], item[1]), wanted), strict=True
            ):
                if isinstance(error, FileNotFoundError):
                    vanished = True
                    continue
                if isinstance(error, Doc2XStorageError):
                    cause = error.__cause__ or error
                    log.warning(
                        "Manifest object %s could not be read (%s: %s): left alone for this run, not "
                        "deleted; the entries of its images are rebuilt from the sidecars, or the "
                        "images are read again",
                        self.folder / name,
                        type(cause).__name__,
                        cause,
                    )
                    self._left[shard].add(name)
                    self._unreadable.add(shard)
                    continue
                try:
                    if error is not None:
                        raise error
                    parsed = self._parse(data, shard)
                except _Unusable as unusable:
                    log.warning(
                        "Manifest object %s is unusable (%s): ignored; the entries of its images are "
                        "rebuilt from the sidecars, and it is deleted when its shard is next written",
                        self.folder / name,
                        unusable,
                    )
                    self._corrupt[shard].add(name)
                    continue
                if parsed is None:
                    self._left[shard].add(name)  # a later format: left alone
                    continue
                merged = self._entries[shard]
                for source, entry in parsed.entries.items():
                    if _newer(entry, merged.get(source)):
                        merged[source] = entry
                if not parsed.foldable:
                    self._kept[shard].add(name)  # holds what a later release wrote: never deleted
                    continue
                if parsed.rejected:
                    log.warning(
                        "Manifest object %s has %d entries that are not valid, dropped (their images are "
                        "rebuilt from the sidecars, or read again); its other entries are used: %s",
                        self.folder / name,
                        len(parsed.rejected),
                        "; ".join(parsed.rejected[:5]),
                    )
                    self._corrupt[shard].add(name)
                else:
                    self._read[shard].add(name)
                self._stored[shard] += len(parsed.entries)
        return vanished

    def _get(self, name: str, size: int) -> tuple[bytes, Exception | None]:
        """An object's bytes, at most :data:`MAX_OBJECT_BYTES`; or why not (vanished, unreadable, too large).

        Unreadable (a storage failure, after retries) is :class:`Doc2XStorageError`, never unusable.
        """
        if size > MAX_OBJECT_BYTES:
            return b"", _Unusable(f"{size} bytes, more than {MAX_OBJECT_BYTES}")
        path = self.folder / name

        def read() -> bytes:
            with path.open("rb") as handle:
                return handle.read(MAX_OBJECT_BYTES + 1)

        try:
            data = storage_call(read, what="reading the manifest object", uri=str(path))
        except FileNotFoundError as error:
            return b"", error
        except Doc2XStorageError as error:
            return b"", error
        except OSError as error:  # an answer about the object (denied, a folder): not this run's to read
            refused = storage_error_of(error, path)
            refused.__cause__ = error
            return b"", refused
        if len(data) > MAX_OBJECT_BYTES:
            return b"", _Unusable(f"more than {MAX_OBJECT_BYTES} bytes")
        return data, None

    @staticmethod
    def _parse(data: bytes, shard: str) -> Parsed | None:
        """An object's entries, validated one by one; None for a later version."""
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise _Unusable("not JSON") from error
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise _Unusable("not a manifest object")
        version = document.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
            log.warning(
                "A manifest object of format version %s is left alone (this provider reads %s)",
                version,
                VERSION,
            )
            return None
        if (
            version not in READABLE_VERSIONS
            or isinstance(version, bool)
            or document.get("shard") != shard
            or not isinstance(document.get("entries"), dict)
        ):
            raise _Unusable("wrong version, shard or entries")
        entries, rejected = {}, []
        for source, value in document["entries"].items():
            if not 0 < len(source) <= _MAX_URI or shard_of(source) != shard:
                rejected.append(f"{source[:200]!r}: its source does not belong in this shard")
                continue
            try:
                entries[source] = Entry.from_json(value)
            except _Unusable as unusable:
                rejected.append(f"{source}: {unusable}")
        foldable = set(document) <= OBJECT_KEYS and all(entry.usable for entry in entries.values())
        return Parsed(entries, foldable, rejected)

    def _put(self, shard: str, kind: str, entries: Mapping[str, Entry]) -> str:
        """Write one new object (never over another); atomic: a single PUT, or a write then a rename."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{shard}.{kind}.{stamp}.{uuid.uuid4().hex}.json"
        data = json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "shard": shard,
                "writer": self._writer,
                "entries": {source: entry.to_json() for source, entry in sorted(entries.items())},
            },
            separators=(",", ":"),
        ).encode()
        target = self.folder / name

        def put() -> None:
            if self.folder.protocol not in OBJECT_STORE_SCHEMES:  # a folder there is only a prefix
                self.folder.mkdir(parents=True, exist_ok=True)
            if self.folder.protocol in ATOMIC_PUT_SCHEMES:
                target.fs.pipe_file(target.path, data)  # one PUT: the whole object or nothing
            else:
                temporary = self.folder / f".tmp-{uuid.uuid4().hex}"
                write(temporary, data)
                temporary.rename(target)

        storage_call(put, what="writing the manifest object", uri=str(target))  # a new name: safe to retry
        if self._listing is not None:
            self._listing[name] = len(data)
        return name

    def _compact(self, shard: str) -> None:
        """Fold every object this task read of a shard (and its staged entries) into one base, then delete them.

        Objects it kept (keys of a later release) or left alone are never deleted. A delete the
        storage denies, or that keeps failing, leaves the object behind with a warning: the work
        is done and the entries are right (the leftover is merged again on read, changing nothing).
        """
        folded = self._read[shard] | self._corrupt[shard]
        base = self._put(shard, "base", self._entries[shard])
        left: list[str] = []
        for name in sorted(folded):
            path = self.folder / name
            try:
                # Gone already (even between a check and the delete) is fine: another compaction folded it.
                remove_object(path, what="deleting the manifest object")
            except (PermissionError, Doc2XStorageError):
                left.append(name)
                continue
            if self._listing is not None:
                self._listing.pop(name, None)
        if left:
            log.warning(
                "Manifest shard %s: %d objects folded into %s could not be deleted (%s): the results "
                "and entries are complete, but each costs a read until it is deleted; grant this "
                "task's connection Delete on %s/ (s3:DeleteObject on S3)",
                shard,
                len(left),
                base,
                ", ".join(str(self.folder / name) for name in left),
                self.folder,
            )
        self._read[shard], self._corrupt[shard] = {base}, set()
        self._kept[shard] |= set(left)  # not tried again by this task
        self._stored[shard] = len(self._entries[shard])
        log.info("Manifest shard %s: %d objects folded into %s", shard, len(folded) - len(left), base)


def storage_error_of(error: OSError, path: Any) -> Doc2XStorageError:
    """A manifest object the storage refuses to give (denied, a folder): left alone like an unreadable one."""
    return Doc2XStorageError(
        f"The manifest object {path} cannot be read ({type(error).__name__}: {error}): grant this "
        "task's connection Get on the manifest folder",
        source=str(path),
    )


def _shards(sources: Iterable[str]) -> set[str]:
    """The shards holding these sources' entries: under their key, and under a spelling with a connection id."""
    shards = set()
    for source in sources:
        key = source_key(source)
        shards.add(shard_of(key))
        if key != source:
            shards.add(shard_of(source))
    return shards


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
