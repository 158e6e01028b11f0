"""Where images come from: a local path or an object-storage URI (``s3://``, ``gs://``, ``abfs://``, ...).

Every image is checked (a scheme we read from, exists, not empty, JPEG/PNG by its magic bytes, at
most 7 MB) from its metadata and first bytes before any image of the batch is uploaded, so a bad
file in a list costs nothing and is named in the error. The first bytes are read with the
filesystem's read-ahead turned down (a small block, no cache): s3fs would otherwise fetch a 50 MiB
block, which is the whole image, to answer a 16-byte read. The full bytes are read only when the
image's turn to be uploaded comes.

Only the storage's answers about an image (missing, not a file, access denied) make it a bad input,
which no retry fixes. A storage failure (any other ``OSError``: a 5xx, ``503 SlowDown``; or a
client library's connection error: a reset, a refused connection) says nothing about the image: it
is retried by :func:`~airflow_provider_doc2x.storage.objects.storage_call`, then raised as a retryable
:class:`~airflow_provider_doc2x.exceptions.Doc2XStorageError` naming the image.

``image_path`` can come from a DAG run's params, which a REST call sets: a URL scheme that fetches
from any address (``http://``, ``https://``, ``ftp://``, ...) would let whoever triggers a run make
the worker send requests to the addresses it chooses. Such schemes are refused unless the operator
names them in ``allow_schemes``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import Doc2XInputError
from airflow_provider_doc2x.storage.objects import (
    ensure_filesystem,
    open_object,
    scheme_of,
    storage_call,
    storage_path,
)

T = TypeVar("T")

_HEAD_BYTES = 16
#: How the first bytes are opened: a block no larger than what is read, and no read-ahead cache, so
#: an object store's first GET asks for a small range. Every fsspec ``open`` takes ``block_size``;
#: ``cache_type`` reaches the file of the buffered filesystems (s3fs, gcsfs, adlfs, ...), and the
#: others (local, memory) ignore it.
_HEAD_OPEN_OPTIONS: dict[str, Any] = {"block_size": _HEAD_BYTES, "cache_type": "none"}
#: Local files and object stores whose access Airflow connections govern; no fetch-anything scheme.
STORAGE_SCHEMES = frozenset(
    {
        "file",
        "local",
        "s3",
        "s3a",
        "gs",
        "gcs",
        "abfs",
        "abfss",
        "az",
        "adl",
        "oss",
        "hdfs",
        "webhdfs",
        "memory",
    }
)


@dataclass(frozen=True)
class ImageSource:
    """One image to parse; ``uri`` is how it is named in logs, errors, XCom and lineage."""

    uri: str
    path: Any  # ObjectStoragePath (file:// for a local path)

    @classmethod
    def of(cls, value: str | Path | Any, *, allow_schemes: Collection[str] = ()) -> ImageSource:
        """A local path or a storage URI; refuse a scheme that is neither storage nor allowed explicitly."""
        uri = str(value)
        scheme = scheme_of(value)
        allowed = scheme in {name.lower() for name in allow_schemes}
        if scheme not in STORAGE_SCHEMES and not allowed:
            raise Doc2XInputError(
                f"Image {protocol.quote(uri)} uses the scheme {scheme!r}, which this operator does not read "
                f"from: give a local path or an object-storage URI ({', '.join(sorted(STORAGE_SCHEMES))}), "
                f"or name the scheme in the operator's allow_schemes",
                source=uri,
            )
        if allowed or scheme == "memory":
            try:
                ensure_filesystem(scheme)
            except (ValueError, ImportError, TypeError, OSError) as error:  # none, or not without options
                raise Doc2XInputError(
                    f"Image {protocol.quote(uri)} uses the scheme {scheme!r}, which allow_schemes names, but "
                    f"no filesystem reads it without options ({type(error).__name__}: {error}): install what "
                    "it needs, or read the image through an Airflow connection's object storage",
                    source=uri,
                ) from error
        if isinstance(value, str) and "://" in value and not value.startswith(scheme):
            value = scheme + value[value.index("://") :]  # HTTP://... as http://...
        return cls(uri, storage_path(value))

    def check(self) -> None:
        """Raise :class:`Doc2XInputError` if Doc2X would refuse this image; reads only its first bytes.

        Raises:
            Doc2XInputError: the storage answered that the image is missing, not a file, denied, or
                the image is empty, too large or not a JPEG/PNG (no retry fixes it).
            Doc2XStorageError: the storage kept failing to answer (retryable).
        """
        self._check_file()
        protocol.check_image_head(self.head(_HEAD_BYTES), source=self.uri)

    def size(self) -> int:
        """The file's size from its metadata (one ``stat``); refuses a missing, empty or non-file source."""
        return self._file_size()

    def head(self, size: int) -> bytes:
        """The file's first ``size`` bytes, read with the read-ahead turned down (one small ranged GET)."""
        return self._read(size, **{**_HEAD_OPEN_OPTIONS, "block_size": size})

    def copy_to(self, target: Path, *, limit: int, chunk: int = 1024 * 1024) -> str:
        """Copy the file into ``target`` (a private file of the caller's) and return the sha256 of its bytes.

        Streamed a chunk at a time, never held whole; a copy that passes ``limit`` bytes (a file
        that grew, metadata that lies) stops there with :class:`Doc2XInputError`. A storage failure
        is tried again from the start, then named.
        """

        def copy() -> str:
            digest, copied = hashlib.sha256(), 0
            with open_object(self.path) as handle, open(target, "wb") as out:
                while block := handle.read(chunk):
                    copied += len(block)
                    if copied > limit:
                        raise Doc2XInputError(
                            f"{self.uri} is over {limit} bytes, the most this provider sends of one file: "
                            "split or compress it, or raise the connection's document_max_bytes",
                            source=self.uri,
                            code="parse_file_too_large",
                        )
                    digest.update(block)
                    out.write(block)
            return digest.hexdigest()

        return self._answered(copy, what="reading the file", named=self.uri)

    def read(self) -> bytes:
        """The image's bytes, checked (size first: a 2 GB file is never loaded to learn it is too large).

        The read itself stops one byte past Doc2X's limit too: a file that grew after its metadata was
        read, or a server whose metadata lies, is refused as too large without being held whole.
        """
        self._check_file()
        data = self._read(protocol.MAX_IMAGE_BYTES + 1)
        protocol.check_image(data, source=self.uri)
        return data

    def read_with_digest(self) -> tuple[bytes, str]:
        """What is sent for this source, and the sha256 that keys it (the cache, the journal, duplicates)."""
        data = self.read()
        return data, sha256_of(data)

    @property
    def job_keys(self) -> dict[str, Any]:
        """What a job and a record say of how this source travelled: nothing for a JPEG/PNG sent as it is."""
        return {}

    def _read(self, size: int = -1, **options: Any) -> bytes:
        def read() -> bytes:
            with open_object(self.path, **options) as handle:
                return handle.read(size)

        return self._answered(read, what="reading the image", named=f"Image {self.uri}")

    def _answered(self, call: Callable[[], T], *, what: str, named: str) -> T:
        """``call()`` through :func:`storage_call`; the storage's answer about the file is a bad input.

        Missing, denied, a folder, a symlink loop: no retry changes it, so it is a
        :class:`Doc2XInputError` naming the file (``named`` is how the message starts).
        """
        try:
            return storage_call(call, what=what, uri=self.uri)
        except OSError as error:
            raise Doc2XInputError(
                f"{named} cannot be read ({type(error).__name__}: {error.strerror or 'no detail'}): "
                "check that the worker may read it",
                source=self.uri,
            ) from error

    def _check_file(self) -> None:
        """It exists, is a file, and its size is one Doc2X's image API takes (from its metadata alone)."""
        protocol.check_image_size(self._file_size(), source=self.uri)

    def _file_size(self) -> int:
        """It exists and is a file: its size, from one ``stat``.

        One ``stat``: fsspec's ``isfile`` answers False for any error, so a throttled metadata call
        would read as "no such file".
        """
        try:
            info = storage_call(self.path.stat, what="checking the image", uri=self.uri)
        except FileNotFoundError:
            info = None
        except OSError as error:  # an answer about the image other than "missing": denied, ...
            raise Doc2XInputError(
                f"Image {self.uri} cannot be read ({type(error).__name__}: {error.strerror or 'no detail'})",
                source=self.uri,
            ) from error
        if info is None or info.get("type") != "file":
            raise Doc2XInputError(
                f"Image {self.uri} does not exist or is not a file: give a path or URI of a JPEG/PNG file",
                source=self.uri,
            )
        size = int(info.st_size)
        if size == 0:
            raise Doc2XInputError(f"Image {self.uri} is empty: nothing to parse", source=self.uri)
        return size


def resolve_images(
    value: str | Path | Sequence[str | Path], *, allow_schemes: Collection[str] = ()
) -> list[ImageSource]:
    """The operator's ``image_path`` (one path/URI or a list of them) as sources, in order."""
    values = [value] if isinstance(value, (str, Path)) else list(value or [])
    if not values:
        raise Doc2XInputError("No image given: image_path is empty")
    sources, problems = [], []
    for item in values:
        try:
            sources.append(ImageSource.of(item, allow_schemes=allow_schemes))
        except Doc2XInputError as error:
            problems.append(error.message)
    _refuse(problems, len(values))
    return sources


def check_all(sources: Sequence[ImageSource]) -> None:
    """Check every image; report all the bad ones at once, before anything is sent.

    A storage failure is not a bad image: its :class:`Doc2XStorageError` ends the check at once
    (retryable), rather than being listed among the bad files (permanent).
    """
    problems = []
    for source in sources:
        try:
            source.check()
        except Doc2XInputError as error:
            problems.append(error.message)
    _refuse(problems, len(sources))


def _refuse(problems: list[str], total: int) -> None:
    if problems:
        raise Doc2XInputError(
            f"{len(problems)} of {total} images cannot be sent to Doc2X; nothing was submitted:\n- "
            + "\n- ".join(problems)
        )


def sha256_of(data: bytes) -> str:
    """The content's hash: what duplicates, the task state store and the result cache are keyed by."""
    return hashlib.sha256(data).hexdigest()
