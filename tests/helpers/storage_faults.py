"""
``memory://`` (counted, see :mod:`tests.helpers.storage`) with storage faults switched on by path.

The faults are those an object store shows: GETs that keep failing (``503 SlowDown`` outlasting the
client's own retries), a listing that takes a while, a listing cache that answers from memory (as
s3fs keeps one per process) until it is invalidated, and DELETEs the bucket policy denies. Each is
off until a test names the paths it applies to; :meth:`FaultyFS.heal` switches all of them off.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from fsspec.implementations.memory import MemoryFileSystem

from tests.helpers.storage import CountingFS, use_for_memory


class FaultyFS(CountingFS):
    """``memory://`` counted, with faults by path (substrings of the path as the filesystem names it)."""

    #: Reads (opens for reading) of paths containing one of these fail with an OSError that is not an answer.
    failing_reads: ClassVar[set[str]] = set()
    #: Writes of paths containing one of these put a third of their bytes, then fail (a full disk).
    failing_writes: ClassVar[set[str]] = set()
    #: Listings of paths containing one of these fail the same way.
    failing_listings: ClassVar[set[str]] = set()
    #: Deletes of paths containing one of these are denied (PermissionError).
    denied_deletes: ClassVar[set[str]] = set()
    #: Seconds a listing of a path containing one of these takes.
    slow_listings: ClassVar[dict[str, float]] = {}
    #: Answer listings from a cache filled by the first listing of each path, until invalidated.
    cache_listings: ClassVar[bool] = False
    listing_cache: ClassVar[dict[str, Any]] = {}
    failed: ClassVar[list[str]] = []  # the paths whose calls failed, in order

    @classmethod
    def heal(cls) -> None:
        for faults in (cls.failing_reads, cls.failing_writes, cls.failing_listings, cls.denied_deletes):
            faults.clear()
        cls.slow_listings.clear()
        cls.cache_listings = False
        cls.listing_cache.clear()
        cls.failed.clear()

    @classmethod
    def clear(cls) -> None:
        super().clear()
        cls.heal()

    @staticmethod
    def _hit(path: str, faults: Any) -> bool:
        return any(fault in path for fault in faults)

    def _open(self, path, mode="rb", **kwargs):
        key = self._strip_protocol(path)
        if "r" in mode and self._hit(key, self.failing_reads):
            self.failed.append(key)
            raise OSError(f"503 SlowDown: please reduce your request rate ({key})")
        handle = super()._open(path, mode, **kwargs)
        if "w" in mode and self._hit(key, self.failing_writes):
            put = handle.write

            def write_a_third(data):
                put(data[: len(data) // 3])
                self.failed.append(key)
                raise OSError(28, "No space left on device", key)

            handle.write = write_a_third
        return handle

    def cat_file(self, path, start=None, end=None, **kwargs):
        key = self._strip_protocol(path)
        if self._hit(key, self.failing_reads):
            self.failed.append(key)
            raise OSError(f"503 SlowDown: please reduce your request rate ({key})")
        return super().cat_file(path, start, end, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        key = self._strip_protocol(path)
        if self._hit(key, self.failing_listings):
            self.failed.append(key)
            raise OSError(f"503 SlowDown: please reduce your request rate ({key})")
        for fault, seconds in self.slow_listings.items():
            if fault in key:
                time.sleep(seconds)  # the listing is slow: what is measured is who waits for it
        if self.cache_listings and not kwargs.get("refresh"):
            cached = self.listing_cache.get((key, detail))
            if cached is not None:
                return list(cached)
        listed = super().ls(path, detail=detail, **kwargs)
        if self.cache_listings:
            self.listing_cache[(key, detail)] = list(listed)
        return listed

    def invalidate_cache(self, path=None):
        if path is None:
            self.listing_cache.clear()
            return
        key = self._strip_protocol(path)
        for cached in [cached for cached in self.listing_cache if cached[0] == key]:
            del self.listing_cache[cached]

    def rm_file(self, path):
        self._deny(path)
        return super().rm_file(path)

    def rm(self, path, recursive=False, maxdepth=None):
        for one in [path] if isinstance(path, str) else path:
            self._deny(one)
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)

    def _deny(self, path: str) -> None:
        key = self._strip_protocol(path)
        if self._hit(key, self.denied_deletes):
            self.failed.append(key)
            raise PermissionError(13, "Access Denied", key)


@contextlib.contextmanager
def faulty_memory(monkeypatch: Any) -> Iterator[FaultyFS]:
    """``memory://`` counted, with faults a test switches on; storage retries without waiting."""
    from airflow_provider_doc2x.storage import objects as storage

    monkeypatch.setattr(storage, "STORAGE_WAIT_INITIAL", 0)
    fs = use_for_memory(FaultyFS)
    FaultyFS.clear()
    try:
        yield fs
    finally:
        FaultyFS.clear()
        use_for_memory(MemoryFileSystem)
