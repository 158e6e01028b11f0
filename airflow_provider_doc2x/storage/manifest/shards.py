"""The merge of concurrent writers: a manifest folder's objects, read shard by shard, merged, added to and compacted.

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

An object that is unusable (:class:`~airflow_provider_doc2x.storage.manifest.format.Unusable`) is
ignored as a whole with a warning, and deleted when the task that rebuilds its entries writes the
shard again. An object that could not be read (a 5xx, throttling, a timeout, after
:func:`~airflow_provider_doc2x.storage.objects.storage_call`'s retries) is not corrupt: it is left
alone for this run, named in a warning, never deleted. A delete the storage denies leaves a folded
object behind with a warning: harmless, since its entries are in the new base.
"""

from __future__ import annotations

import posixpath
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_doc2x.exceptions import Doc2XStorageError
from airflow_provider_doc2x.storage.manifest.format import (
    MAX_OBJECT_BYTES,
    OBJECT_NAME,
    Entry,
    Unusable,
    encode,
    log,
    newer,
    object_name,
    parse,
    shard_of,
    source_key,
)
from airflow_provider_doc2x.storage.objects import open_object, remove_object, storage_call
from airflow_provider_doc2x.storage.results import OBJECT_STORE_SCHEMES, write

#: Manifest objects read at once (object stores answer each read in tens of milliseconds).
READS_IN_FLIGHT = 8
#: Objects in a shard at which a writer folds them into one base.
COMPACT_AT = 16
#: Schemes whose single write is atomic (a reader sees the whole object or nothing).
ATOMIC_PUT_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "memory"})


def storage_error_of(error: OSError, path: Any) -> Doc2XStorageError:
    """A manifest object the storage refuses to give (denied, a folder): left alone like an unreadable one."""
    return Doc2XStorageError(
        f"The manifest object {path} cannot be read ({type(error).__name__}: {error}): grant this "
        "task's connection Get on the manifest folder",
        source=str(path),
    )


class ManifestFolder:
    """The folder of a manifest's objects on storage: listed once, read, written and deleted by name.

    Every call goes through :func:`~airflow_provider_doc2x.storage.objects.storage_call`, so a
    storage failure is retried and then named, never mistaken for an empty or a corrupt manifest.
    """

    def __init__(self, path: Any) -> None:
        self.path = path
        self._listing: dict[str, int] | None = None  # object name -> size, from one listing

    def listing(self, *, refresh: bool = False) -> dict[str, int]:
        """The manifest's objects (name -> size), from one fresh listing (and a new one on ``refresh``)."""
        if self._listing is None or refresh:
            listed = storage_call(self._ls, what="listing the manifest", uri=str(self.path))
            self._listing = {}
            for item in listed:
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    size = item.get("size")
                    self._listing[posixpath.basename(item["name"].rstrip("/"))] = (
                        size if isinstance(size, int) else 0
                    )
        return self._listing

    def _ls(self) -> list[Any]:
        fs = self.path.fs
        # fsspec filesystems may answer a listing from their own cache (s3fs keeps one per process):
        # another task's objects, or its compaction, would not be seen.
        fs.invalidate_cache(self.path.path)
        try:
            return fs.ls(self.path.path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def get(self, name: str, size: int) -> tuple[bytes, Exception | None]:
        """An object's bytes, at most :data:`MAX_OBJECT_BYTES`; or why not (vanished, unreadable, too large).

        Unreadable (a storage failure, after retries) is :class:`Doc2XStorageError`, never unusable.
        """
        if size > MAX_OBJECT_BYTES:
            return b"", Unusable(f"{size} bytes, more than {MAX_OBJECT_BYTES}")
        path = self.path / name

        def read() -> bytes:
            with open_object(path) as handle:
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
            return b"", Unusable(f"more than {MAX_OBJECT_BYTES} bytes")
        return data, None

    def put(self, shard: str, kind: str, writer: str, entries: Mapping[str, Entry]) -> str:
        """Write one new object (never over another); atomic: a single PUT, or a write then a rename."""
        name = object_name(shard, kind)
        data = encode(shard, writer, entries)
        target = self.path / name

        def put() -> None:
            if self.path.protocol not in OBJECT_STORE_SCHEMES:  # a folder there is only a prefix
                self.path.mkdir(parents=True, exist_ok=True)
            if self.path.protocol in ATOMIC_PUT_SCHEMES:
                target.fs.pipe_file(target.path, data)  # one PUT: the whole object or nothing
            else:
                temporary = self.path / f".tmp-{uuid.uuid4().hex}"
                write(temporary, data)
                temporary.rename(target)

        storage_call(put, what="writing the manifest object", uri=str(target))  # a new name: safe to retry
        if self._listing is not None:
            self._listing[name] = len(data)
        return name

    def remove(self, name: str) -> bool:
        """Delete an object; False when the storage denies it or keeps failing (it stays behind)."""
        try:
            # Gone already (even between a check and the delete) is fine: another compaction folded it.
            remove_object(self.path / name, what="deleting the manifest object")
        except (PermissionError, Doc2XStorageError):
            return False
        if self._listing is not None:
            self._listing.pop(name, None)
        return True


@dataclass
class Shard:
    """One shard as a task has read it: its entries merged, and what became of each of its objects."""

    #: Source key -> the newest entry of every object read.
    entries: dict[str, Entry] = field(default_factory=dict)
    #: Objects read (what a compaction may delete).
    read: set[str] = field(default_factory=set)
    #: Objects read and found unusable (deleted by the next write of the shard).
    corrupt: set[str] = field(default_factory=set)
    #: Objects read that are never deleted (they hold what a later release wrote).
    kept: set[str] = field(default_factory=set)
    #: Objects not read: unreadable now, or of a later version.
    left: set[str] = field(default_factory=set)
    #: Whether an object could not be read this run.
    unreadable: bool = False
    #: Entries in the objects read, superseded or not.
    stored: int = 0

    @property
    def seen(self) -> set[str]:
        """Every object of the shard this task has dealt with, one way or another."""
        return self.read | self.corrupt | self.kept | self.left

    def merge(self, entries: Mapping[str, Entry]) -> None:
        """Fold entries in: for each source the newest wins, whatever order objects come in."""
        for key, entry in entries.items():
            if newer(entry, self.entries.get(key)):
                self.entries[key] = entry


class Shards:
    """The manifest's entries as one writer sees them: the merge of every object of the shards it needs.

    Entries this writer adds are staged, then written by :meth:`save` as one new object per shard
    touched (a compaction, when the shard has grown large or holds an unusable object).

    :param path: the manifest's folder (``<output_path>/_manifest/v1``).
    :param compact_at: objects in a shard at which a writer folds them into one (a shard whose
        objects hold more superseded entries than half its live ones is folded too).
    """

    def __init__(self, path: Any, *, compact_at: int = COMPACT_AT) -> None:
        self.folder = ManifestFolder(path)
        self.compact_at = max(2, compact_at)
        self._writer = uuid.uuid4().hex
        self._shards: dict[str, Shard] = {}
        self._pending: dict[str, Entry] = {}  # source key -> entry to write at the next save

    # -- reading ----------------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        """Whether any manifest object is under ``output_path`` (from the one listing)."""
        return any(OBJECT_NAME.fullmatch(name) for name in self.folder.listing())

    def damaged(self, shard: str) -> bool:
        """Whether a shard holds an object that was unusable, or could not be read this run."""
        state = self._shards.get(shard)
        return state is not None and (bool(state.corrupt) or state.unreadable)

    @property
    def corrupt(self) -> bool:
        """Whether any shard read holds an unusable object not folded away yet."""
        return any(state.corrupt for state in self._shards.values())

    def current(self, source: str) -> Entry | None:
        """The stored entry of a source under its key (its URI without a connection id)."""
        key = source_key(source)
        state = self._shards.get(shard_of(key))
        return state.entries.get(key) if state else None

    def entry(self, source: str) -> Entry | None:
        """The entry of a source: under its key, or (written before keys dropped the connection id) its URI."""
        entry = self.current(source)
        if source_key(source) != source:
            state = self._shards.get(shard_of(source))
            spelled = state.entries.get(source) if state else None
            if spelled is not None and newer(spelled, entry):
                entry = spelled
        return entry

    def merged(self) -> dict[str, Entry]:
        """Every entry of the shards read, merged."""
        return {source: entry for state in self._shards.values() for source, entry in state.entries.items()}

    def load(self, shards: set[str]) -> None:
        """Read every object of these shards (once per task), merged; list again once if one vanished."""
        shards = {shard for shard in shards if shard not in self._shards}
        if not shards:
            return
        for shard in shards:
            self._shards[shard] = Shard()
        if self._read_objects(self.folder.listing(), shards):
            # A compaction deleted what we listed: its entries are in a base we have not seen.
            self._read_objects(self.folder.listing(refresh=True), shards)

    def _read_objects(self, listing: dict[str, int], shards: set[str]) -> bool:
        """Read and merge the listed objects of these shards not read yet; True if one had vanished."""
        wanted = []
        for name, size in sorted(listing.items()):
            match = OBJECT_NAME.fullmatch(name)
            if match and match["shard"] in shards and name not in self._shards[match["shard"]].seen:
                wanted.append((name, size, match["shard"]))
        vanished = False
        with ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="doc2x-manifest") as pool:
            for (name, _, shard), (data, error) in zip(
                wanted, pool.map(lambda item: self.folder.get(item[0], item[1]), wanted), strict=True
            ):
                if isinstance(error, FileNotFoundError):
                    vanished = True
                    continue
                self._take(self._shards[shard], name, shard, data, error)
        return vanished

    def _take(self, state: Shard, name: str, shard: str, data: bytes, error: Exception | None) -> None:
        """Merge one object read into its shard, or note why it is not (unreadable, unusable, later)."""
        if isinstance(error, Doc2XStorageError):
            cause = error.__cause__ or error
            log.warning(
                "Manifest object %s could not be read (%s: %s): left alone for this run, not "
                "deleted; the entries of its images are rebuilt from the sidecars, or the "
                "images are read again",
                self.folder.path / name,
                type(cause).__name__,
                cause,
            )
            state.left.add(name)
            state.unreadable = True
            return
        try:
            if error is not None:
                raise error
            parsed = parse(data, shard)
        except Unusable as unusable:
            log.warning(
                "Manifest object %s is unusable (%s): ignored; the entries of its images are "
                "rebuilt from the sidecars, and it is deleted when its shard is next written",
                self.folder.path / name,
                unusable,
            )
            state.corrupt.add(name)
            return
        if parsed is None:
            state.left.add(name)  # a later format: left alone
            return
        state.merge(parsed.entries)
        if not parsed.foldable:
            state.kept.add(name)  # holds what a later release wrote: never deleted
            return
        if parsed.rejected:
            log.warning(
                "Manifest object %s has %d entries that are not valid, dropped (their images are "
                "rebuilt from the sidecars, or read again); its other entries are used: %s",
                self.folder.path / name,
                len(parsed.rejected),
                "; ".join(parsed.rejected[:5]),
            )
            state.corrupt.add(name)
        else:
            state.read.add(name)
        state.stored += len(parsed.entries)

    # -- writing ----------------------------------------------------------------------------------

    def pending(self, source: str) -> Entry | None:
        """The entry staged for a source, not written yet."""
        return self._pending.get(source_key(source))

    def stage(self, source: str, entry: Entry) -> None:
        """Stage an entry for the next :meth:`save`, unless a newer one is staged already."""
        key = source_key(source)
        if newer(entry, self._pending.get(key)):
            self._pending[key] = entry

    def unstage(self, source: str) -> None:
        """Write nothing for a source after all (its stored entry says the same)."""
        self._pending.pop(source_key(source), None)

    @staticmethod
    def after(current: Entry | None) -> float:
        """Now, but after the entry it replaces (a worker's clock may lag another's)."""
        now = time.time()
        return max(now, current.at + 0.001) if current is not None else now

    def save(self) -> None:
        """Write the staged entries: one new object per shard touched; compact a shard grown large."""
        if not self._pending:
            return
        by_shard: dict[str, dict[str, Entry]] = {}
        for key, entry in self._pending.items():
            by_shard.setdefault(shard_of(key), {})[key] = entry
        self.load(set(by_shard))
        for shard, entries in sorted(by_shard.items()):
            state = self._shards[shard]
            state.merge(entries)
            stored = state.stored + len(entries)
            superseded = stored - len(state.entries)
            # A shard with an unusable object is healed at once: folded, and that object deleted.
            # A compaction's base holds the new entries too, so no delta is written before it.
            if (
                state.corrupt
                or len(state.read) + 1 >= self.compact_at
                or superseded > len(state.entries) // 2
            ):
                self._compact(shard, state)
                continue
            name = self.folder.put(shard, "delta", self._writer, entries)
            state.read.add(name)  # ours, and folded like the others at a compaction
            state.stored = stored
        self._pending.clear()

    def _compact(self, shard: str, state: Shard) -> None:
        """Fold every object this task read of a shard (and its staged entries) into one base, then delete them.

        Objects it kept (keys of a later release) or left alone are never deleted. A delete the
        storage denies, or that keeps failing, leaves the object behind with a warning: the work
        is done and the entries are right (the leftover is merged again on read, changing nothing).
        """
        folded = state.read | state.corrupt
        base = self.folder.put(shard, "base", self._writer, state.entries)
        left = [name for name in sorted(folded) if not self.folder.remove(name)]
        if left:
            log.warning(
                "Manifest shard %s: %d objects folded into %s could not be deleted (%s): the results "
                "and entries are complete, but each costs a read until it is deleted; grant this "
                "task's connection Delete on %s/ (s3:DeleteObject on S3)",
                shard,
                len(left),
                base,
                ", ".join(str(self.folder.path / name) for name in left),
                self.folder.path,
            )
        state.read, state.corrupt = {base}, set()
        state.kept |= set(left)  # not tried again by this task
        state.stored = len(state.entries)
        log.info("Manifest shard %s: %d objects folded into %s", shard, len(folded) - len(left), base)
