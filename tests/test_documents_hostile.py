"""
The documents lane attacked through its public faces: TIFF directories written by hand, sources
changed, deleted or duplicated while a document waits its turn behind ``pdf_max_in_flight``, new
tries of the task, and the private folder after every way a task can end.

Each test states a promise of the lane (README "What you can feed it", the module docs of
``documents.intake``, ``documents.headers`` and ``pdf_lane.sending``) and checks what a user sees:
the task's error and records, and what the local Doc2X server billed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred
from PIL import Image

from airflow_provider_doc2x.documents import intake
from airflow_provider_doc2x.documents.formats import PDF, TIFF
from airflow_provider_doc2x.documents.readers import document_pdf, inspect_file
from airflow_provider_doc2x.exceptions import Doc2XError, Doc2XInputError
from airflow_provider_doc2x.local.engines import pixels_sha256
from airflow_provider_doc2x.storage.sources import ImageSource
from tests.documents.test_hostile_files import PAGE, handmade_pdf
from tests.documents.test_readers import noise
from tests.helpers import REPO, StateStore, first_event, parse_operator, use_connection
from tests.test_documents import frames, jpeg_page, packings, pdf_of_pages, run, split_pages, tiff_of

# -- TIFF files written field by field -------------------------------------------------------------

_CODES = {1: "B", 2: "B", 3: "H", 4: "I", 16: "Q"}


@dataclass(frozen=True)
class At:
    """A field whose ``count`` values are stored at ``offset`` (the file's bytes decide what they are)."""

    count: int
    offset: int


def build_tiff(pages: list[list[tuple]], blob: bytes = b"", *, big: bool = False) -> bytes:
    """A little-endian TIFF (or BigTIFF): ``blob`` right after the header, then one directory per page.

    A page is a list of ``(tag, type, values)``, written in the order given (duplicates kept);
    ``values`` is a list of numbers (inline when they fit, else after the directories) or :class:`At`.
    """
    head, entry_size, count_code, inline = (16, 20, "Q", 8) if big else (8, 12, "H", 4)
    pointer = "<Q" if big else "<I"
    sizes = [
        struct.calcsize(count_code) + entry_size * len(page) + struct.calcsize(pointer) for page in pages
    ]
    starts = [head + len(blob) + sum(sizes[:n]) for n in range(len(pages))]
    values_at = head + len(blob) + sum(sizes)
    directories, values = bytearray(), bytearray()
    for number, page in enumerate(pages):
        directories += struct.pack(f"<{count_code}", len(page))
        for tag, kind, field in page:
            if isinstance(field, At):
                count, value = field.count, struct.pack(pointer, field.offset)
            else:
                count, raw = len(field), struct.pack(f"<{_CODES[kind] * len(field)}", *field)
                if len(raw) <= inline:
                    value = raw.ljust(inline, b"\0")
                else:
                    value = struct.pack(pointer, values_at + len(values))
                    values += raw + b"\0" * (len(raw) % 2)
            directories += struct.pack(f"<HH{pointer[1]}", tag, kind, count) + value
        directories += struct.pack(pointer, starts[number + 1] if number + 1 < len(pages) else 0)
    header = b"II" + (struct.pack("<HHHQ", 43, 8, 0, starts[0]) if big else struct.pack("<HI", 42, starts[0]))
    return header + blob + bytes(directories) + bytes(values)


def grey_page(size: tuple[int, int], offsets, counts, *, rows: int | None = None, compression: int = 1):
    """The fields of one 8-bit grey page whose strips are at ``offsets`` (``counts`` bytes each)."""
    width, height = size
    return [
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, [8]),
        (259, 3, [compression]),
        (262, 3, [1]),
        (273, 4, offsets),
        (277, 3, [1]),
        (278, 4, [rows or height]),
        (279, 4, counts),
    ]


def refused(read, *args, **kwargs) -> str:
    """The message of the Doc2XInputError ``read`` raises; it names the source."""
    with pytest.raises(Doc2XInputError) as caught:
        read(*args, **kwargs)
    assert kwargs["source"] in caught.value.message
    return caught.value.message


# -- promise 1: hostile TIFF directories are refused from their headers ------------------------------


def test_pages_sharing_their_strips_through_lists_at_different_places_are_refused(tmp_path):
    """Promise: "pages sharing data" refused at the check. The same two strip offsets, listed at two
    places of the file, are the same pixel data: a 45 KB file of 40 pages of 9000x9000 px took 16 s
    of packing here (0.4 s a page, so 400 s for the 1000 pages the limit allows).
    """
    size = (9000, 9000)
    half = zlib.compress(bytes(size[0] * size[1] // 2), 9)
    pages = [grey_page(size, [8, 8], [len(half), len(half)], rows=size[1] // 2, compression=8)] * 3
    path = tmp_path / "shared.tif"
    path.write_bytes(build_tiff(pages, half))
    assert path.stat().st_size < 50_000
    with Image.open(path) as image:  # a real TIFF: every page decodes the one strip, twice
        assert image.n_frames == 3
    message = refused(inspect_file, path, TIFF, source="shared.tif")
    assert "share their pixel data" in message


def test_a_strip_table_given_twice_is_checked_as_the_decoder_reads_it(tmp_path):
    """Promise: a cut TIFF is refused before anything is sent. Pillow (and libtiff) read the first
    StripOffsets of a page; the check reads the last, so a page whose first table points past the
    file's end passes the check and is found cut only when packed.
    """
    strip = bytes(range(64))
    first = grey_page((8, 8), [5000], [64])
    first.insert(6, (273, 4, [8]))  # a second StripOffsets, whole, after the one the decoder uses
    path = tmp_path / "twice.tif"
    path.write_bytes(build_tiff([first, grey_page((8, 8), [8], [64])], strip))
    with Image.open(path) as image:
        assert image.tile[0].offset == 5000  # what is decoded: past the end of a 200-byte file
    message = refused(inspect_file, path, TIFF, source="twice.tif")
    assert "truncated" in message


@pytest.mark.parametrize(
    ("name", "page", "big", "says"),
    [
        ("ascii-counts", [(273, 4, [8]), (279, 2, [64])], False, "type 2, not a number"),
        ("rational-counts", [(273, 4, [8]), (279, 5, At(1, 8))], False, "type 5, not a number"),
        ("endless-table", [(273, 4, At(2**32 - 1, 8)), (279, 4, At(2**32 - 1, 8))], False, "4,294,967,295"),
        ("past-4-gb", [(273, 4, [2**32 - 10]), (279, 4, [64])], False, "truncated"),
        ("bigtiff-past-4-gb", [(273, 16, [2**33]), (279, 16, [64])], True, "truncated"),
        (
            "counts-without-offsets",
            [(273, 4, [8, 16]), (279, 4, [8])],
            False,
            "more offsets than byte counts",
        ),
        ("table-past-the-end", [(273, 4, At(4, 10**6)), (279, 4, At(4, 10**6))], False, "truncated"),
    ],
)
def test_absurd_strip_tables_are_refused_at_the_check(tmp_path, name, page, big, says):
    fields = [field for field in grey_page((8, 8), [8], [64]) if field[0] not in (273, 279)] + page
    path = tmp_path / f"{name}.tif"
    path.write_bytes(build_tiff([sorted(fields, key=lambda field: field[0])], bytes(64), big=big))
    assert says in refused(inspect_file, path, TIFF, source=f"{name}.tif")


def test_a_whole_bigtiff_is_read_and_packed(tmp_path):
    """Positive control for the BigTIFF rows above: the same fields, whole, are a page."""
    fields = [field for field in grey_page((8, 8), [16], [64]) if field[0] not in (273, 279)]
    fields += [(273, 16, [16]), (279, 16, [64])]
    path = tmp_path / "big.tif"
    path.write_bytes(build_tiff([sorted(fields, key=lambda field: field[0])], bytes(64), big=True))
    assert inspect_file(path, TIFF, source="big.tif").pages == 1
    assert document_pdf(path, TIFF, tmp_path / "big.pdf", source="big.tif") == 1


def test_a_pdf_nested_two_hundred_thousand_deep_is_refused_in_a_worker_thread(tmp_path):
    deep = b"[" * 200_000 + b"]" * 200_000
    path = tmp_path / "deep.pdf"
    path.write_bytes(
        handmade_pdf(
            {
                1: b"<< /Type /Catalog /Pages 2 0 R /Deep %s >>" % deep,
                2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                3: PAGE,
            }
        )
    )
    with intake.Intake() as checks, pytest.raises(Doc2XInputError, match=r"deep\.pdf is corrupt"):
        checks.check_all([ImageSource.of(str(path))])


def test_a_multi_page_tiff_cut_in_a_page_without_byte_counts_is_refused_before_anything_is_sent(
    lane, tmp_path
):
    """Promise: a truncated file of every format is refused before anything is uploaded. A page
    without StripByteCounts (libtiff reads it) whose strip starts past the file's end is left to
    the decoder, so the JPEG beside it is billed and the TIFF fails only when packed.
    """
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_page("Good"))
    cut = tmp_path / "cut.tif"
    page = [field for field in grey_page((8, 8), [5000], [64]) if field[0] != 279]
    cut.write_bytes(build_tiff([grey_page((8, 8), [8], [64]), page], bytes(64)))
    with Image.open(cut) as image:
        assert image.n_frames == 2
    with pytest.raises(Doc2XInputError) as caught:
        parse_operator([good, cut], deferrable=True).execute({})
    assert str(cut) in str(caught.value) and "nothing was submitted" in str(caught.value)
    assert (lane.stats()["billed_total"], lane.stats()["pdf_tasks"]) == (0, 0)


def test_a_cut_jpeg_over_seven_megabytes_is_refused_at_the_check(lane, tmp_path):
    scan = tmp_path / "scan.jpg"
    noise((2600, 2000)).save(scan, "JPEG", quality=100)
    whole = scan.read_bytes()
    assert len(whole) > 7 * 1024 * 1024
    scan.write_bytes(whole[: len(whole) - 4096])
    for large_images in (True, False):
        with pytest.raises(Doc2XInputError, match=r"scan\.jpg") as caught:
            parse_operator([scan], large_images=large_images).execute({})
        assert "nothing was submitted" in str(caught.value)
    assert (lane.stats()["billed_total"], lane.stats()["pdf_tasks"]) == (0, 0)


# -- promises 2 and 3: one billing, no page lost, a changed source never sent -----------------------


def deferred_once(op, context: dict) -> dict:
    """Run the first half of a deferrable task; answer its trigger's event."""
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    return asyncio.run(first_event(deferred.value.trigger))


def to_the_end(op, event: dict, context: dict):
    """Resume with ``event`` and every later deferral, to the task's end."""
    while True:
        try:
            return op.execute_complete(context, event)
        except TaskDeferred as again:
            event = asyncio.run(first_event(again.trigger))


def broken_tiff(path: Path, pictures: list[Image.Image]) -> Path:
    """A TIFF whole by its directories whose page 2's deflate stream is overwritten."""
    pictures[0].save(
        path, format="TIFF", save_all=True, append_images=pictures[1:], compression="tiff_adobe_deflate"
    )
    with Image.open(path) as image:
        image.seek(1)
        start = image.tile[0].offset  # where page 2's pixel data begins
    data = bytearray(path.read_bytes())
    data[start + 8 : start + 72] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("change", ["deleted", "replaced by a PDF", "replaced by another TIFF"])
def test_a_tiff_changed_while_it_waits_its_turn_is_named_and_not_sent(lane, tmp_path, monkeypatch, change):
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    first = pdf_of_pages(tmp_path / "first.pdf", ["One"])
    waiting = tiff_of(tmp_path / "waiting.tif", frames(3))
    op = parse_operator([first, waiting], deferrable=True)
    event = deferred_once(op, {})
    if change == "deleted":
        waiting.unlink()
    elif change == "replaced by a PDF":
        pdf_of_pages(waiting, ["Not a TIFF"])
    else:
        tiff_of(waiting, frames(2, size=(200, 100)))
    with pytest.raises(Doc2XError) as caught:
        to_the_end(op, event, {})
    message = str(caught.value)
    assert "1 of 2 images were not parsed" in message and str(waiting) in message
    if change != "deleted":
        assert "source_changed" in message
    assert (lane.stats()["pdf_tasks"], lane.stats()["pdf_pages_billed"]) == (1, 1)


def test_a_tiff_corrupt_inside_that_waits_a_deferral_fails_alone(lane, tmp_path, monkeypatch):
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    first = tiff_of(tmp_path / "first.tif", frames(2))
    broken = broken_tiff(tmp_path / "broken.tif", frames(3, size=(300, 200)))
    last = pdf_of_pages(tmp_path / "last.pdf", ["Last 1", "Last 2"])
    op = parse_operator([first, broken, last], deferrable=True)
    with pytest.raises(Doc2XError) as caught:
        to_the_end(op, deferred_once(op, {}), {})
    message = str(caught.value)
    assert "1 of 3 images were not parsed" in message and str(broken) in message
    assert str(first) not in message.split("not parsed", 1)[1]
    assert (lane.stats()["pdf_tasks"], lane.stats()["pdf_pages_billed"]) == (2, 4)


def test_one_tiff_under_two_names_behind_a_deferral_is_packed_once_and_billed_once(
    lane, tmp_path, monkeypatch
):
    packed = packings(monkeypatch)
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    first = pdf_of_pages(tmp_path / "first.pdf", ["One"])
    pictures = frames(3)
    scan = tiff_of(tmp_path / "scan.tif", pictures)
    again = tmp_path / "again.tif"
    shutil.copyfile(scan, again)
    records = run(parse_operator([first, scan, again], deferrable=True))
    assert [record["source"] for record in records] == [str(first), str(scan), str(again)]
    for record in records[1:]:
        pages = split_pages(record["markdown"])
        assert [number for number, _ in pages] == [1, 2, 3]
        for (_, text), picture in zip(pages, pictures, strict=True):
            assert pixels_sha256(picture)[:12] in text
    assert len(packed) == 1
    assert (lane.stats()["pdf_tasks"], lane.stats()["pdf_pages_billed"]) == (2, 4)


def test_a_new_try_after_the_second_document_was_sent_pays_nothing_again(lane, tmp_path, monkeypatch):
    """Try 1 sends the first TIFF, resumes, sends the second, and dies deferred; try 2 reconnects to both."""
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    first = tiff_of(tmp_path / "first.tif", frames(2))
    second = tiff_of(tmp_path / "second.tif", frames(3, size=(200, 150)))
    store = StateStore()
    context = {"task_state_store": store}
    op = parse_operator([first, second], deferrable=True)
    event = deferred_once(op, context)
    with pytest.raises(TaskDeferred):
        op.execute_complete(context, event)  # the second TIFF is sent; the worker dies here
    assert lane.stats()["pdf_tasks"] == 2
    records = run(parse_operator([first, second], deferrable=True), store)
    assert [len(record["pages"]) for record in records] == [2, 3]
    assert (lane.stats()["pdf_tasks"], lane.stats()["pdf_pages_billed"]) == (2, 5)


@pytest.mark.parametrize("method", ["sync", "pdf"])
def test_documents_and_images_in_sync_and_pdf_methods_each_end_parsed_in_order(
    lane, tmp_path, monkeypatch, method
):
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    page = tmp_path / "page.jpg"
    page.write_bytes(jpeg_page("Loose"))
    pictures = frames(3)
    scan = tiff_of(tmp_path / "scan.tif", pictures)
    report = pdf_of_pages(tmp_path / "report.pdf", ["Report 1", "Report 2"])
    records = run(parse_operator([scan, page, report], method=method, deferrable=method == "pdf"))
    assert [record["source"] for record in records] == [str(scan), str(page), str(report)]
    scan_pages = split_pages(records[0]["markdown"])
    assert [
        pixels_sha256(picture)[:12] in text for (_, text), picture in zip(scan_pages, pictures, strict=True)
    ] == [True] * 3
    assert records[1]["markdown"].startswith("# Loose")
    assert [text.splitlines()[0] for _, text in split_pages(records[2]["markdown"])] == [
        "# Report 1",
        "# Report 2",
    ]
    assert lane.stats()["pdf_pages_billed"] + lane.stats()["billed_total"] == 6


# -- promises 4 and 5: private files, packing off the event loop ------------------------------------


@pytest.fixture
def private_temp(tmp_path, monkeypatch) -> Path:
    """The system's temp folder for this test alone (others may run tasks at the same time)."""
    folder = tmp_path / "system-temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_nothing_is_left_in_the_temp_folder_however_the_task_ends(lane, tmp_path, monkeypatch, private_temp):
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    good = [
        tiff_of(tmp_path / "a.tif", frames(2)),
        pdf_of_pages(tmp_path / "b.pdf", ["B"]),
        tmp_path / "c.webp",
    ]
    frames(1)[0].save(good[2], format="WEBP", lossless=True)
    op = parse_operator(good, deferrable=True)
    event = deferred_once(op, {})
    assert list(private_temp.iterdir()) == []  # deferred
    to_the_end(op, event, {})
    assert list(private_temp.iterdir()) == []  # succeeded
    broken = broken_tiff(tmp_path / "broken.tif", frames(3))
    with pytest.raises(Doc2XError):
        run(parse_operator([broken], deferrable=True))
    assert list(private_temp.iterdir()) == []  # failed at packing
    with pytest.raises(Doc2XInputError):
        parse_operator([good[0], tmp_path / "missing.pdf"]).execute({})
    assert list(private_temp.iterdir()) == []  # refused at the check

    def dies(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(intake, "document_pdf", dies)
    with pytest.raises(MemoryError):
        run(parse_operator([good[0]], deferrable=False))
    assert list(private_temp.iterdir()) == []  # killed while packing


_DIES_WHILE_PACKING = """
import sys
from airflow_provider_doc2x.documents import intake
from tests.helpers import parse_operator


def dies(*args, **kwargs):
    raise SystemExit("a library gave up")


intake.document_pdf = dies
try:
    parse_operator([sys.argv[1]], deferrable=False).execute({})
except BaseException as error:
    print("ended with", type(error).__name__)
"""


def test_a_task_whose_packing_thread_exits_ends_and_leaves_nothing(lane, tmp_path):
    """A BaseException out of the packing thread (SystemExit, KeyboardInterrupt) ends the task too.

    It must not escape the transport's background loop (its thread would die, and the task wait
    for the loop's answer forever): it ends the task as an error. The subprocess is stopped after
    a minute, a guard, not a figure.
    """
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    scan = tiff_of(tmp_path / "scan.tif", frames(2))
    ended = subprocess.run(
        [sys.executable, "-c", _DIES_WHILE_PACKING, str(scan)],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(system_temp)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ended with RuntimeError" in ended.stdout, ended.stderr[-2000:]
    assert list(system_temp.iterdir()) == []


def test_the_private_folder_is_the_owners_alone(tmp_path, private_temp):
    with intake.Intake() as checks:
        checks.check_all([ImageSource.of(str(tiff_of(tmp_path / "a.tif", frames(2))))])
        assert checks.folder.parent == private_temp
        assert checks.folder.stat().st_mode & 0o777 == 0o700
        with intake.Intake() as other:
            assert other.folder != checks.folder


def test_packing_runs_off_the_event_loop(lane, tmp_path, monkeypatch):
    on_loop: list[bool] = []
    real = intake.document_pdf

    def watched(path, fmt, out, *, source, limits):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(path, fmt, out, source=source, limits=limits)

    monkeypatch.setattr(intake, "document_pdf", watched)
    run(parse_operator([tiff_of(tmp_path / "a.tif", frames(2))], deferrable=True))
    assert on_loop == [False]


def test_a_pdf_sent_after_a_deferral_keeps_its_page_count(lane, tmp_path, monkeypatch):
    """The copy made after a resume is the checked bytes: its pages are not counted again, and all arrive."""
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    first = tiff_of(tmp_path / "first.tif", frames(2))
    report = pdf_of_pages(tmp_path / "report.pdf", [f"Clause {n}" for n in range(1, 8)])
    (_, record) = run(parse_operator([first, report], deferrable=True))
    assert [page["page"] for page in record["pages"]] == list(range(1, 8))
    assert record["source_format"] == PDF
    assert lane.stats()["pdf_pages_billed"] == 9
