"""One way to name storage, and one way to call it.

A local path or any ``ObjectStoragePath`` URI becomes an ``ObjectStoragePath``: inputs (images) and
outputs (results) both go through here, so that a local path means the same ``file://`` location
everywhere, on the filesystem (and connection) that Airflow gives the path. Bytes are read and
written on that filesystem (:func:`open_object`); the task's lineage is the operator's own
OpenLineage facets, which name every image read and every file written.

A storage call fails in two ways that mean different things. An *answer* (the object does not
exist, access is denied, it is a folder) says something about the object. A *failure* (a 5xx, a
``503 SlowDown``, a reset, a timeout: any other ``OSError``, which is how fsspec's filesystems
report them) says nothing about it. :func:`storage_call` retries a failure a few times with
back-off, then raises :class:`~airflow_provider_doc2x.exceptions.Doc2XStorageError` naming the
object, so that a throttled read is never taken for "no result", "corrupt" or a bad image.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import tenacity

from airflow_provider_doc2x.exceptions import Doc2XStorageError

T = TypeVar("T")

#: Tries of one storage call that keeps failing transiently, and the back-off between them (the
#: filesystems retry on their own first: s3fs five times for throttling and 5xx).
STORAGE_TRIES = 4
STORAGE_WAIT_INITIAL = 0.5
STORAGE_WAIT_MAX = 8.0
#: Errors that are the storage's answer about the object, not a failure to answer.
ANSWERS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)

#: Errors the system gives about a path itself (no class of their own): a symlink loop, a name too
#: long. Answers too, not storage failures.
PATH_ANSWERS = frozenset({errno.ELOOP, errno.ENAMETOOLONG})


def storage_path(value: Any) -> Any:
    """``value`` (a local path, a URI, or already an ``ObjectStoragePath``) as an ``ObjectStoragePath``."""
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    if isinstance(value, ObjectStoragePath):
        if value.protocol == "file":
            attach_local_filesystem()
        return value
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if "://" not in text or text.lower().startswith("file://"):
        attach_local_filesystem()
    return ObjectStoragePath(text if "://" in text else f"file://{os.path.abspath(text)}")


@functools.cache
def attach_local_filesystem() -> None:
    """Give ``file://`` paths their filesystem without loading every provider's filesystems first.

    Why: Airflow makes the filesystem of a path at its first use by importing the filesystem module
    of every installed provider (with the Amazon provider: s3fs, boto3 and botocore, about 0.4 s of
    CPU), in every task process that touches a path. A local file needs none of them: Airflow's own
    filesystem for ``file`` is fsspec's ``LocalFileSystem`` without options, which is attached here
    before a local path is used, as :func:`ensure_filesystem` attaches one for ``memory``. A store
    attached for ``file`` already (by Airflow, or by the user) is kept as it is.
    """
    from fsspec.implementations.local import LocalFileSystem

    try:
        from airflow.sdk.io import attach
    except ImportError:  # Airflow 2.11
        from airflow.io.store import attach  # type: ignore[no-redef]
    attach(protocol="file", fs=LocalFileSystem())


def ensure_filesystem(scheme: str) -> None:
    """Give Airflow fsspec's own filesystem for ``scheme`` when no provider registered one.

    Why: Airflow registers filesystems only for the schemes its providers serve (file, s3, gcs, ...),
    so a scheme a user opens on purpose (``allow_schemes=["https"]``) or ``memory://`` would fail
    with "No filesystem registered". It is attached before the first ``ObjectStoragePath`` of the
    scheme is made (Airflow 3 keeps the store it makes then); a provider's filesystem is never
    replaced.
    """
    try:
        from airflow.sdk.io.fs import has_fs
    except ImportError:  # Airflow 2.11 and 3.0
        from airflow.io import has_fs  # type: ignore[attr-defined,no-redef]
    if has_fs(scheme):
        return
    import fsspec

    try:
        from airflow.sdk.io import attach
    except ImportError:  # Airflow 2.11
        from airflow.io.store import attach  # type: ignore[no-redef]
    attach(protocol=scheme, fs=fsspec.filesystem(scheme))


def open_object(path: Any, mode: str = "rb", **options: Any) -> Any:
    """Open the object at ``path`` (an ``ObjectStoragePath``) on its filesystem: ``path.open`` without its lineage.

    Why: ``ObjectStoragePath.open`` also hands each file to Airflow's hook-level lineage collector,
    whose start in a task process imports every installed provider's asset factories (boto3 with
    the Amazon provider: about 0.4 s of CPU, again in every process a deferred task resumes in).
    The collector keeps 100 files a task, and OpenLineage, its one reader, reads it only for an
    operator that names no datasets of its own; this provider's operator names every image and
    every file it writes (``get_openlineage_facets_on_complete``). The call made on the storage is
    the same: ``fs.open(path, mode)``.
    """
    return path.fs.open(path.path, mode=mode, **options)


def scheme_of(value: Any) -> str:
    """The URI scheme of a path or URI, lower case; ``file`` for a local path."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if "://" not in text:
        return "file"
    return urlsplit(text).scheme.lower()


#: Failures to reach the storage that its client libraries raise outside ``OSError``: botocore's
#: connection errors (a reset, a refused or timed-out connection, through s3fs) and aiohttp's
#: (gcsfs, adlfs), named by module and class so that neither library is imported here.
NETWORK_FAILURES = frozenset(
    {
        ("botocore.exceptions", "HTTPClientError"),
        ("botocore.exceptions", "ConnectionError"),
        ("aiohttp.client_exceptions", "ClientConnectionError"),
        ("aiohttp.client_exceptions", "ClientPayloadError"),
    }
)


def is_storage_failure(error: BaseException) -> bool:
    """Whether a storage call failed without answering (retry it), rather than answered with an error.

    fsspec's HTTP filesystem raises "not found" for any failure (a 503, a refused connection): an
    answer is taken as one only when nothing in its causes says the server failed to answer.
    """
    if isinstance(error, OSError) and error.errno in PATH_ANSWERS:
        return False  # the system's answer about the path itself: no retry changes it
    if isinstance(error, OSError) and not isinstance(error, ANSWERS):
        return True
    if any((kind.__module__, kind.__name__) in NETWORK_FAILURES for kind in type(error).__mro__):
        return True
    cause = error.__cause__ or error.__context__
    if isinstance(error, FileNotFoundError) and cause is not None and cause is not error:
        status = getattr(cause, "status", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True  # aiohttp's ClientResponseError: the server answered 5xx or 429, not "missing"
        return is_storage_failure(cause)
    return False


def storage_call(call: Callable[[], T], *, what: str, uri: str, tries: int | None = None) -> T:
    """``call()``, tried again on a storage failure; then :class:`Doc2XStorageError` naming ``uri``.

    ``what`` says what the call does, for the message ("reading the sidecar of"). Answers
    (:data:`ANSWERS`) and every other exception are raised unchanged at once.
    """
    tries = tries or STORAGE_TRIES
    try:
        return call()  # the first try alone: tenacity's machinery costs more than a local stat
    except Exception as error:
        if not is_storage_failure(error):
            raise
        failed: list[BaseException] = [error]
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(tries),
        wait=tenacity.wait_exponential(multiplier=STORAGE_WAIT_INITIAL, max=STORAGE_WAIT_MAX)
        + tenacity.wait_random(0, STORAGE_WAIT_INITIAL),
        retry=tenacity.retry_if_exception(is_storage_failure),
        reraise=True,
    )

    def again() -> T:
        if failed:  # tenacity's first attempt is the try that already failed: its back-off follows
            raise failed.pop()
        return call()

    try:
        return retrying(again)
    except Exception as error:
        if not is_storage_failure(error):
            raise
        raise storage_error(error, what=what, uri=uri, tries=tries) from error


def remove_object(path: Any, *, what: str) -> None:
    """Delete one object, gone already or not; a storage failure is retried, then named.

    One DELETE: ``unlink`` would first ask whether the object exists (a HEAD on S3).

    Raises:
        PermissionError: the storage refused the delete (an answer).
        Doc2XStorageError: the storage kept failing to answer.
    """
    with contextlib.suppress(FileNotFoundError):
        storage_call(functools.partial(path.fs.rm_file, path.path), what=what, uri=str(path))


def storage_error(error: BaseException, *, what: str, uri: str, tries: int = 1) -> Doc2XStorageError:
    """The error for a storage failure of ``what`` on ``uri``: retryable, naming the object."""
    detail = getattr(error, "strerror", None) or str(error) or "no detail"
    return Doc2XStorageError(
        f"Storage failed {what} {uri} ({type(error).__name__}: {detail}), "
        f"{tries} {'try' if tries == 1 else 'tries'}: the storage may be throttling or down; "
        "the task fails and Airflow's retries try again",
        source=uri,
    )
