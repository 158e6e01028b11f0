"""
Checking and reading source images: the storage's answers about an image (missing, not a file,
denied) make a bad input, reported for every bad file at once and never retried; a storage failure
(a 5xx, ``503 SlowDown``, a reset) says nothing about the image, is retried, and then fails the task
retryably, naming the image.

Storage is ``memory://`` with faults injected per call and path (:class:`FlakyFS`), through
``ImageSource`` and ``check_all`` as the operator calls them.
"""

from __future__ import annotations

import errno
from collections import Counter
from typing import ClassVar

import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from airflow_provider_doc2x.exceptions import Doc2XInputError, Doc2XStorageError, is_permanent
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.storage import objects as storage
from airflow_provider_doc2x.storage.sources import ImageSource, check_all
from tests.helpers.storage import use_for_memory

FOREVER = 10**6


def slow_down() -> OSError:
    """What s3fs raises for a ``503 SlowDown`` that outlasts its own retries."""
    return OSError(errno.EBUSY, "Please reduce your request rate (SlowDown)")


class FlakyFile(MemoryFile):
    """A reader of a memory file whose reads (an object store's GET) may fail."""

    def read(self, size=-1):
        FlakyFS.happen("read", self.path)
        return super().read(size)


class FlakyFS(MemoryFileSystem):
    """``memory://`` with a store of its own, whose ``info``, ``open`` and reads fail as told, by path."""

    store: ClassVar[dict] = {}
    pseudo_dirs: ClassVar[list] = [""]
    faults: ClassVar[dict[tuple[str, str], list]] = {}  # (call, path) -> [failures left, error]
    calls: ClassVar[Counter[tuple[str, str]]] = Counter()

    @classmethod
    def clear(cls) -> None:
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.faults.clear()
        cls.calls.clear()

    @classmethod
    def fail(cls, call: str, uri: str, error: OSError, times: int = FOREVER) -> None:
        cls.faults[(call, cls._strip_protocol(uri))] = [times, error]

    @classmethod
    def count(cls, call: str, uri: str) -> int:
        return cls.calls[(call, cls._strip_protocol(uri))]

    @classmethod
    def happen(cls, call: str, path: str) -> None:
        cls.calls[(call, path)] += 1
        fault = cls.faults.get((call, path))
        if fault and fault[0] > 0:
            fault[0] -= 1
            raise fault[1]

    def info(self, path, **kwargs):
        self.happen("info", self._strip_protocol(path))
        return super().info(path, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if "r" not in mode:
            return super()._open(path, mode, **kwargs)
        self.happen("open", path)
        handle = super()._open(path, mode, **kwargs)
        return FlakyFile(self, path, handle.getvalue())  # a reader of its own: no shared position


@pytest.fixture
def flaky(monkeypatch):
    """``memory://`` that fails as told (a plain ``memory://`` put back afterwards)."""
    monkeypatch.setattr(storage, "STORAGE_WAIT_INITIAL", 0.0)
    FlakyFS.clear()
    fs = use_for_memory(FlakyFS)
    yield fs
    FlakyFS.clear()
    use_for_memory(MemoryFileSystem)


def put_image(fs, name: str, data: bytes | None = None) -> str:
    uri = f"memory://src/scans/{name}"
    fs.pipe_file(uri, render(Page(title=name), size=(200, 150)) if data is None else data)
    return uri


def sources(*uris: str) -> list[ImageSource]:
    return [ImageSource.of(uri) for uri in uris]


@pytest.mark.parametrize("call", ["info", "open", "read"])
def test_a_storage_failure_that_passes_is_retried_and_the_image_checked(flaky, call):
    good = put_image(flaky, "f000.png")
    flaky_one = put_image(flaky, "f001.png")
    FlakyFS.fail(call, flaky_one, slow_down(), times=2)
    check_all(sources(good, flaky_one))  # no error: the image was checked once the storage answered
    assert FlakyFS.count(call, flaky_one) >= 3
    assert FlakyFS.faults[(call, FlakyFS._strip_protocol(flaky_one))][0] == 0


@pytest.mark.parametrize("call", ["info", "open", "read"])
def test_a_storage_failure_that_lasts_is_retryable_and_names_the_image(flaky, call):
    good = put_image(flaky, "f000.png")
    flaky_one = put_image(flaky, "f001.png")
    FlakyFS.fail(call, flaky_one, slow_down())
    with pytest.raises(Doc2XStorageError) as caught:
        check_all(sources(good, flaky_one))
    error = caught.value
    assert not isinstance(error, Doc2XInputError)
    assert not is_permanent(error)  # Airflow retries the task
    assert flaky_one in str(error) and "SlowDown" in str(error)
    assert error.source == flaky_one
    assert FlakyFS.count(call, flaky_one) == storage.STORAGE_TRIES


def test_a_storage_failure_is_not_listed_among_the_bad_images(flaky):
    missing = "memory://src/scans/missing.png"
    not_an_image = put_image(flaky, "notes.png", b"just some text\n")
    flaky_one = put_image(flaky, "f001.png")
    FlakyFS.fail("read", flaky_one, slow_down())
    with pytest.raises(Doc2XStorageError) as caught:
        check_all(sources(missing, not_an_image, flaky_one))
    assert flaky_one in str(caught.value)


def test_a_storage_failure_reading_the_whole_image_is_retryable(flaky):
    flaky_one = put_image(flaky, "f001.png")
    source = ImageSource.of(flaky_one)
    source.check()
    FlakyFS.fail("read", flaky_one, slow_down())
    with pytest.raises(Doc2XStorageError, match=r"f001\.png"):
        source.read()


def test_a_missing_file_is_still_an_input_error(flaky):
    good = put_image(flaky, "f000.png")
    missing = "memory://src/scans/missing.png"
    folder = "memory://src/scans"
    with pytest.raises(Doc2XInputError) as caught:
        check_all(sources(good, missing, folder))
    message = str(caught.value)
    assert "2 of 3 images cannot be sent" in message
    assert f"Image {missing} does not exist or is not a file" in message
    assert f"Image {folder} does not exist or is not a file" in message
    assert FlakyFS.count("info", missing) == 1  # an answer: asked once


@pytest.mark.parametrize("call", ["info", "open"])
def test_denied_access_is_an_input_error_asked_once(flaky, call):
    denied = put_image(flaky, "f001.png")
    FlakyFS.fail(call, denied, PermissionError(errno.EACCES, "Access Denied"))
    with pytest.raises(Doc2XInputError) as caught:
        check_all(sources(denied))
    assert f"Image {denied} cannot be read (PermissionError: Access Denied)" in str(caught.value)
    assert FlakyFS.count(call, denied) == 1


def test_bad_images_are_still_reported_together(flaky):
    empty = put_image(flaky, "empty.png", b"")
    text = put_image(flaky, "notes.png", b"just some text\n")
    big = put_image(flaky, "big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (7 * 1024 * 1024 + 1))
    with pytest.raises(Doc2XInputError) as caught:
        check_all(sources(empty, text, big, put_image(flaky, "ok.png")))
    message = str(caught.value)
    assert "3 of 4 images cannot be sent" in message
    assert "is empty" in message and "not a JPEG or PNG" in message and "over Doc2X's limit" in message


def test_an_image_larger_than_its_metadata_says_is_refused_without_being_read_whole():
    """A file that grew after its stat (or a store whose metadata lies): the read stops past the limit."""
    from airflow_provider_doc2x.protocol import MAX_IMAGE_BYTES
    from tests.helpers.storage import CountingFS

    class Lying(CountingFS):
        def info(self, path, **kwargs):
            return {**super().info(path, **kwargs), "size": 1000}

    fs = use_for_memory(Lying)
    try:
        Lying.clear()
        head = render(Page(title="Grown"), fmt="PNG", size=(64, 64))
        fs.pipe_file("/inbox/grown.png", head + b"\0" * (2 * MAX_IMAGE_BYTES))
        with pytest.raises(Doc2XInputError, match="over Doc2X's limit"):
            ImageSource.of("memory://inbox/grown.png").read()
        assert 0 < Lying.bytes_read["/inbox/grown.png"] <= MAX_IMAGE_BYTES + 1
    finally:
        use_for_memory(MemoryFileSystem)
