"""Listing a prefix's images, all or by storage time, in one listing call and without reading a file."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta, timezone

import pytest
from fsspec.implementations.local import LocalFileSystem

from airflow_provider_doc2x.storage.listing import (
    DEFAULT_LOOKBACK,
    DOCUMENT_SUFFIXES,
    list_images,
    list_new_images,
    run_window,
    stored_at,
)

DAY = datetime(2026, 1, 1, tzinfo=timezone.utc)


def put(folder, name: str, at: datetime | None = None) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())
    if at is not None:
        os.utime(path, (at.timestamp(), at.timestamp()))
    return f"file://{path}"


def test_images_only_sorted_and_recursive(tmp_path):
    expected = [put(tmp_path, name) for name in ("a.png", "b.JPG", "c.jpeg", "sub/d.png", "sub/deeper/e.jpg")]
    put(tmp_path, "notes.txt")
    put(tmp_path, "sub/readme.md")
    assert list_images(tmp_path) == sorted(expected)
    assert list_images(tmp_path, recursive=False) == sorted(expected[:3])
    assert list_images(f"file://{tmp_path}/") == sorted(expected)


def test_documents_are_listed_only_when_asked_for(tmp_path):
    """A bucket's PDFs never start being sent on their own: documents come with ``DOCUMENT_SUFFIXES``."""
    images = [put(tmp_path, name) for name in ("a.png", "b.jpg")]
    documents = [put(tmp_path, name) for name in ("c.PDF", "d.tiff", "e.webp", "f.heic")]
    put(tmp_path, "notes.txt")
    assert list_images(tmp_path) == sorted(images)
    assert list_images(tmp_path, suffixes=DOCUMENT_SUFFIXES) == sorted(images + documents)
    assert list_new_images(tmp_path, {}, suffixes=DOCUMENT_SUFFIXES) == sorted(images + documents)


def test_a_window_is_half_open_like_a_data_interval(tmp_path):
    at_start = put(tmp_path, "start.png", DAY)
    noon = put(tmp_path, "noon.png", DAY + timedelta(hours=12))
    put(tmp_path, "at-end.png", DAY + timedelta(days=1))
    put(tmp_path, "before.png", DAY - timedelta(seconds=1))
    assert list_images(tmp_path, since=DAY, until=DAY + timedelta(days=1)) == sorted([at_start, noon])
    assert list_images(tmp_path, since=DAY + timedelta(hours=1)) == sorted(
        [noon, f"file://{tmp_path}/at-end.png"]
    )
    naive = datetime(2026, 1, 1, 12)  # taken as UTC
    assert list_images(tmp_path, since=naive, until=naive + timedelta(seconds=1)) == [noon]


def test_a_missing_prefix_lists_nothing(tmp_path):
    assert list_images(tmp_path / "nowhere") == []


def test_one_listing_call_and_no_file_read(tmp_path, monkeypatch):
    for number in range(5):
        put(tmp_path, f"page-{number}.png", DAY)
    calls = []
    inside = []
    find, info = LocalFileSystem.find, LocalFileSystem.info

    def counted_find(self, *args, **kwargs):
        calls.append("find")
        inside.append(True)
        try:
            return find(self, *args, **kwargs)
        finally:
            inside.pop()

    def counted_info(self, *args, **kwargs):
        if not inside:  # the listing's own stat calls are the listing
            calls.append("info")
        return info(self, *args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError("listing must not open a file")

    monkeypatch.setattr(LocalFileSystem, "find", counted_find)
    monkeypatch.setattr(LocalFileSystem, "info", counted_info)
    monkeypatch.setattr(LocalFileSystem, "_open", refused)
    assert len(list_images(tmp_path, since=DAY, until=DAY + timedelta(days=1))) == 5
    assert calls == ["find"]


def test_an_untimed_listing_entry_is_kept_with_a_warning(tmp_path, monkeypatch, caplog):
    uri = put(tmp_path, "a.png")
    monkeypatch.setattr(
        LocalFileSystem,
        "find",
        lambda self, path, **kwargs: {f"{tmp_path}/a.png": {"name": f"{tmp_path}/a.png", "type": "file"}},
    )
    caplog.set_level(logging.WARNING, logger="airflow_provider_doc2x.storage.listing")
    assert list_images(tmp_path, since=DAY) == [uri]
    assert "no storage time" in caplog.text


def test_an_object_store_prefix(tmp_path):
    import fsspec
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    try:
        from airflow.sdk.io import attach
    except ImportError:  # Airflow 2
        from airflow.io.store import attach
    fs = fsspec.filesystem("memory")
    attach("memory", fs=fs)
    try:
        fs.pipe_file("/bucket/scans/2026/a.png", b"a")
        fs.pipe_file("/bucket/scans/b.jpg", b"b")
        fs.pipe_file("/bucket/other/c.png", b"c")
        uris = list_images("memory://bucket/scans")
        assert [ObjectStoragePath(uri).read_bytes() for uri in uris] == [b"a", b"b"]
        assert all(uri.startswith("memory://") for uri in uris)
    finally:
        fs.rm("/bucket", recursive=True)


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"LastModified": datetime(2026, 1, 1, 12, tzinfo=timezone.utc)}, DAY + timedelta(hours=12)),  # S3
        ({"updated": "2026-01-01T12:00:00.000Z"}, DAY + timedelta(hours=12)),  # GCS
        ({"last_modified": datetime(2026, 1, 1, 12)}, DAY + timedelta(hours=12)),  # Azure, naive
        ({"mtime": (DAY + timedelta(hours=12)).timestamp()}, DAY + timedelta(hours=12)),  # local
        ({"updated": "yesterday"}, None),
        ({}, None),
    ],
)
def test_storage_time_from_each_backend(info, expected):
    assert stored_at(info) == expected


def test_the_run_window_from_a_task_context():
    end = DAY + timedelta(days=1)
    assert run_window({"data_interval_end": end, "prev_data_interval_end_success": None}) == (None, end)
    assert run_window(
        {"data_interval_end": end + timedelta(days=1), "prev_data_interval_end_success": end}
    ) == (
        end - DEFAULT_LOOKBACK,
        end + timedelta(days=1),
    )
    assert run_window({}, lookback=timedelta(0)) == (None, None)


def test_new_images_since_the_last_successful_run(tmp_path):
    old = put(tmp_path, "old.png", DAY + timedelta(hours=1))
    late = put(tmp_path, "late.png", DAY + timedelta(hours=23, minutes=30))  # in the look-back
    new = put(tmp_path, "new.png", DAY + timedelta(days=1, hours=6))
    put(tmp_path, "future.png", DAY + timedelta(days=3))
    first = {"prev_data_interval_end_success": None, "data_interval_end": DAY + timedelta(days=1)}
    second = {
        "prev_data_interval_end_success": DAY + timedelta(days=1),
        "data_interval_end": DAY + timedelta(days=2),
    }
    assert list_new_images(tmp_path, first) == sorted([old, late])
    assert list_new_images(tmp_path, second) == sorted([late, new])
    assert list_new_images(tmp_path, second, lookback=timedelta(0)) == [new]
