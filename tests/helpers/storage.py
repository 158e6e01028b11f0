"""
``memory://`` that counts: storage calls (the outermost fsspec call only) and bytes read, by path.

What the manifest's tests and ``bench/incremental.py`` measure "never opened" and "bytes read"
with. State is on the class, as ``MemoryFileSystem`` keeps its store: fsspec makes one instance
per thread, and every one must see the same files and counts.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from typing import Any, ClassVar

from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

#: The fsspec calls counted (a listing is one call, as an object store's paged LIST is one operation).
COUNTED_CALLS = (
    "info",
    "ls",
    "find",
    "open",
    "cat_file",
    "pipe_file",
    "rm_file",
    "rm",
    "mv",
    "copy",
    "cp_file",
    "mkdir",
    "makedirs",
    "exists",
    "isfile",
    "isdir",
    "walk",
    "glob",
)


class CountingFile(MemoryFile):
    """A read of a memory file, counted into its filesystem."""

    def read(self, size=-1):
        data = super().read(size)
        CountingFS.count_read(self.path, len(data))
        return data

    def read1(self, size=-1):
        data = super().read1(size)
        CountingFS.count_read(self.path, len(data))
        return data

    def readinto(self, buffer):
        count = super().readinto(buffer)
        CountingFS.count_read(self.path, count)
        return count


class CountingFS(MemoryFileSystem):
    """``memory://`` with a store of its own, counting storage calls and bytes read, by path."""

    store: ClassVar[dict] = {}
    pseudo_dirs: ClassVar[list] = [""]
    lock = threading.Lock()
    depth = threading.local()
    calls: ClassVar[Counter[str]] = Counter()
    opened: ClassVar[Counter[str]] = Counter()  # path -> times opened for reading
    bytes_read: ClassVar[Counter[str]] = Counter()  # path -> bytes read

    @classmethod
    def clear(cls) -> None:
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.reset()

    @classmethod
    def reset(cls) -> None:
        for counter in (cls.calls, cls.opened, cls.bytes_read):
            counter.clear()

    @classmethod
    def count_read(cls, path: str, count: int) -> None:
        with cls.lock:
            cls.bytes_read[path] += count

    def _open(self, path, mode="rb", **kwargs):
        handle = super()._open(path, mode, **kwargs)
        if "r" not in mode:
            return handle
        path = self._strip_protocol(path)
        with self.lock:
            self.opened[path] += 1
        return CountingFile(self, path, handle.getvalue())  # a reader of its own: no shared position

    # MemoryFileSystem answers info and isfile by scanning every key: with tens of thousands of
    # objects that scan, not the code measured, would be timed. A file is found by its key at once.
    def info(self, path, **kwargs):
        key = self._strip_protocol(path)
        handle = self.store.get(key)
        if handle is None:
            return super().info(path, **kwargs)
        return {"name": key, "size": handle.size, "type": "file", "created": handle.created}

    def isfile(self, path):
        return self._strip_protocol(path) in self.store

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start, end, **kwargs)
        self.count_read(self._strip_protocol(path), len(data))
        return data

    def read_of(self, prefix: str) -> int:
        """Bytes read under a path prefix."""
        return sum(count for path, count in self.bytes_read.items() if path.startswith(prefix))

    def opened_of(self, prefix: str) -> int:
        """Opens for reading under a path prefix."""
        return sum(count for path, count in self.opened.items() if path.startswith(prefix))


def _counted(name: str):
    method = getattr(CountingFS, name)  # its own fast info and isfile, or the memory one

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        depth = getattr(CountingFS.depth, "value", 0)
        if depth == 0:
            with CountingFS.lock:
                CountingFS.calls[name] += 1
        CountingFS.depth.value = depth + 1
        try:
            return method(self, *args, **kwargs)
        finally:
            CountingFS.depth.value = depth

    return call


for _name in COUNTED_CALLS:
    setattr(CountingFS, _name, _counted(_name))


def use_for_memory(implementation: type[MemoryFileSystem]) -> Any:
    """
    Make ``implementation`` what ``memory://`` means, for fsspec and for ``ObjectStoragePath`` alike.

    Airflow keeps the first filesystem attached for a scheme: this replaces that entry. Returns the
    filesystem.
    """
    import fsspec

    try:
        from airflow.sdk.io import store as stores
    except ImportError:  # Airflow 2
        from airflow.io import store as stores

    if implementation is CountingFS:
        CountingFS.clear()
    implementation.clear_instance_cache()
    fsspec.register_implementation("memory", implementation, clobber=True)
    stores._STORE_CACHE.pop("memory", None)
    fs = fsspec.filesystem("memory")
    stores.attach("memory", fs=fs)
    return fs
