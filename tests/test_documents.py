"""
Documents as users have them, through the operator against the local server: PDFs, multi-page
TIFFs, WebP/BMP/GIF, scans over 7 MB, with each page's provenance, billed once, and hostile files
refused before anything is sent.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from pathlib import Path

import img2pdf
import pytest
from airflow.providers.common.compat.sdk import TaskDeferred
from PIL import Image

from airflow_provider_doc2x.exceptions import Doc2XError, Doc2XInputError
from airflow_provider_doc2x.local.engines import pixels_sha256
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.pdf.results import PAGE_MARKER
from airflow_provider_doc2x.storage.objects import storage_path
from tests.documents.test_hostile_files import PAGE, bomb_png, handmade_pdf, handmade_tiff
from tests.helpers import StateStore, first_event, parse_operator, run_to_the_end, use_connection


def jpeg_page(title: str, size=(400, 300)) -> bytes:
    """A page whose Markdown the local engine knows (it is embedded in the JPEG)."""
    return render(Page(title=title), fmt="JPEG", size=size)


def pdf_of_pages(path: Path, titles: list[str]) -> Path:
    """A PDF whose pages are JPEG pages with these titles, in order."""
    path.write_bytes(img2pdf.convert([jpeg_page(title) for title in titles]))
    return path


def frames(count: int, size=(320, 240)) -> list[Image.Image]:
    """Pages of distinct pixels (each one's hash tells it apart)."""
    out = []
    for n in range(count):
        picture = Image.new("RGB", size, (255 - 20 * n, 40 * n % 256, 90))
        picture.putpixel((n, n), (0, 0, 0))
        out.append(picture)
    return out


def tiff_of(path: Path, pictures: list[Image.Image]) -> Path:
    pictures[0].save(path, format="TIFF", save_all=True, append_images=pictures[1:], compression="tiff_lzw")
    return path


def run(op, store: StateStore | None = None):
    context = {"task_state_store": store} if store is not None else {}
    if op.deferrable:
        return run_to_the_end(op, context)[0]
    return op.execute(context)


def logged(caplog, capfd) -> str:
    """What was logged: records, and the captured streams (Airflow 3 logs through structlog)."""
    return "\n".join([record.getMessage() for record in caplog.records] + list(capfd.readouterr()))


def read_text(uri: str) -> str:
    return storage_path(uri).read_text()


def split_pages(markdown: str) -> list[tuple[int, str]]:
    """A document's Markdown split on its page markers, as a chunker would."""
    marker = re.escape(PAGE_MARKER).replace(r"\{page\}", r"(\d+)")
    parts = re.split(marker, markdown)
    return [(int(parts[i]), parts[i + 1].strip()) for i in range(1, len(parts), 2)]


# -- documents ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("deferrable", [True, False])
def test_a_three_page_tiff_is_one_document_of_three_pages_in_order(lane, tmp_path, deferrable):
    pictures = frames(3)
    scan = tiff_of(tmp_path / "fax.tiff", pictures)
    out = tmp_path / "out"
    (record,) = run(parse_operator([scan], deferrable=deferrable, output_path=str(out)))
    assert record["source"] == str(scan)
    assert record["document"] is True
    assert (record["source_format"], record["converted"]) == ("tiff", "pdf")
    assert [(page["page"], page["page_idx"]) for page in record["pages"]] == [(1, 0), (2, 1), (3, 2)]
    markdown = read_text(record["markdown_path"])
    pages = split_pages(markdown)
    assert [number for number, _ in pages] == [1, 2, 3]
    for (_, text), picture in zip(pages, pictures, strict=True):
        assert pixels_sha256(picture)[:12] in text  # each page is its own frame's
    sidecar = json.loads(read_text(record["sidecar_path"]))
    assert sidecar["source"] == str(scan) and sidecar["document"] is True
    assert [page["page"] for page in sidecar["pages"]] == [1, 2, 3]
    stats = lane.stats()
    assert (stats["pdf_tasks"], stats["pdf_pages_billed"], stats["billed_total"]) == (1, 3, 0)


def test_a_twenty_page_pdf_is_billed_twenty_pages_once_and_a_rerun_bills_nothing(lane, tmp_path):
    titles = [f"Clause {n}" for n in range(1, 21)]
    contract = pdf_of_pages(tmp_path / "contract.pdf", titles)
    out = tmp_path / "out"
    (record,) = run(parse_operator([contract], deferrable=True, output_path=str(out)))
    assert record["document"] is True and record["source_format"] == "pdf" and "converted" not in record
    assert [page["page"] for page in record["pages"]] == list(range(1, 21))
    pages = split_pages(read_text(record["markdown_path"]))
    assert [text.splitlines()[0] for _, text in pages] == [f"# {title}" for title in titles]
    assert (lane.stats()["pdf_tasks"], lane.stats()["pdf_pages_billed"]) == (1, 20)

    again = parse_operator([contract], deferrable=True, output_path=str(out))
    (cached,) = run(again)
    assert cached["cached"] is True and cached["markdown_path"] == record["markdown_path"]
    assert (lane.stats()["pdf_tasks"], lane.stats()["pdf_pages_billed"]) == (1, 20)

    incremental = parse_operator([contract], deferrable=True, output_path=str(out), incremental=True)
    run(incremental)  # records the manifest
    (known,) = run(parse_operator([contract], deferrable=True, output_path=str(out), incremental=True))
    assert (lane.stats()["pdf_tasks"], lane.stats()["pdf_pages_billed"]) == (1, 20)
    # From the manifest alone (the PDF not even read), the record is the document's, pages and all.
    assert known["markdown_path"] == record["markdown_path"] and known["document"] is True
    assert [(page["page"], page["page_idx"]) for page in known["pages"]] == [(n, n - 1) for n in range(1, 21)]
    assert (known["source_format"], known["sha256"]) == ("pdf", record["sha256"])


def test_a_changed_pdf_is_parsed_again(lane, tmp_path):
    contract = pdf_of_pages(tmp_path / "contract.pdf", ["First draft"])
    out = tmp_path / "out"
    run(parse_operator([contract], output_path=str(out), incremental=True))
    pdf_of_pages(contract, ["Second draft", "Annex"])
    os.utime(contract, (1e9, 2e9))  # a new modification time, as a rewrite has
    (record,) = run(parse_operator([contract], output_path=str(out), incremental=True))
    assert [page["page"] for page in record["pages"]] == [1, 2]
    assert "# Second draft" in read_text(record["markdown_path"])
    assert lane.stats()["pdf_pages_billed"] == 3


def test_a_new_try_reconnects_to_the_recorded_document_and_pays_nothing_again(lane, tmp_path):
    contract = pdf_of_pages(tmp_path / "contract.pdf", [f"Page {n}" for n in range(5)])
    store = StateStore()
    first = parse_operator([contract], deferrable=True)
    with pytest.raises(TaskDeferred):
        first.execute({"task_state_store": store})
    (record,) = run(parse_operator([contract], deferrable=True), store)
    assert [page["page"] for page in record["pages"]] == [1, 2, 3, 4, 5]
    assert record["markdown"].startswith(PAGE_MARKER.format(page=1))
    assert (lane.stats()["pdf_tasks"], lane.stats()["pdf_pages_billed"]) == (1, 5)


# -- rasters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["async", "sync"])
def test_webp_bmp_and_gif_are_converted_to_png_and_parsed(lane, tmp_path, method):
    pictures = frames(3, size=(300, 200))
    files = []
    for picture, (name, fmt, options) in zip(
        pictures,
        [("page.webp", "WEBP", {"lossless": True}), ("page.bmp", "BMP", {}), ("page.gif", "GIF", {})],
        strict=True,
    ):
        if fmt == "GIF":
            picture = picture.convert("P", palette=Image.Palette.ADAPTIVE)
        picture.save(tmp_path / name, format=fmt, **options)
        files.append(tmp_path / name)
    records = run(parse_operator(files, method=method))
    assert [record["source"] for record in records] == [str(path) for path in files]
    assert [record["source_format"] for record in records] == ["webp", "bmp", "gif"]
    assert all(record["converted"] == "png" for record in records)
    for record, path in zip(records, files, strict=True):
        with Image.open(path) as source:
            assert pixels_sha256(source)[:12] in record["markdown"]
    assert lane.stats()["billed_total"] == 3 and lane.stats()["pdf_tasks"] == 0


def test_a_png_over_seven_megabytes_goes_through_the_pdf_api(lane, tmp_path, caplog, capfd):
    big = tmp_path / "scan.png"
    Image.frombytes("RGB", (2000, 2000), os.urandom(2000 * 2000 * 3)).save(big, compress_level=0)
    assert big.stat().st_size > 12 * 1000 * 1000
    caplog.set_level("INFO")
    (record,) = run(parse_operator([big], output_path=str(tmp_path / "out")))
    assert (record["source_format"], record["converted"], record["document"]) == ("png", "pdf", True)
    assert [page["page"] for page in record["pages"]] == [1]
    assert (lane.stats()["pdf_pages_billed"], lane.stats()["billed_total"]) == (1, 0)
    assert "goes through Doc2X's PDF API packed losslessly into a PDF" in logged(caplog, capfd)

    with pytest.raises(Doc2XInputError, match=r"scan\.png.*large_images"):
        parse_operator([big], large_images=False).execute({})
    assert lane.stats()["pdf_pages_billed"] == 1


def test_a_mixed_folder_in_the_pdf_lane_packs_images_and_sends_documents_as_they_are(lane, tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(jpeg_page("Loose A"))
    b.write_bytes(jpeg_page("Loose B"))
    webp = tmp_path / "c.webp"
    frames(1)[0].save(webp, format="WEBP", lossless=True)
    tiff = tiff_of(tmp_path / "d.tiff", frames(3))
    report = pdf_of_pages(tmp_path / "e.pdf", ["Report 1", "Report 2", "Report 3"])
    records = run(parse_operator([a, webp, tiff, b, report], method="pdf", deferrable=True))
    assert [record["source"] for record in records] == [str(p) for p in (a, webp, tiff, b, report)]
    assert records[0]["markdown"].startswith("# Loose A") and records[3]["markdown"].startswith("# Loose B")
    assert records[1]["converted"] == "png"
    assert [len(record["pages"]) for record in (records[2], records[4])] == [3, 3]
    assert [text.splitlines()[0] for _, text in split_pages(records[4]["markdown"])] == [
        "# Report 1",
        "# Report 2",
        "# Report 3",
    ]
    stats = lane.stats()
    assert stats["pdf_pages_billed"] == 2 + 3 + 3 and stats["billed_total"] == 1


# -- hostile and broken files ---------------------------------------------------------------------------


def test_hostile_files_are_refused_named_and_nothing_is_billed(lane, tmp_path):
    """Each hostile file gets a clear error naming it before anything is sent; the good one is not named."""
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_page("Good"))
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(pdf_of_pages(tmp_path / "whole.pdf", ["A", "B"]).read_bytes()[:900])
    bomb = bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    encrypted = tmp_path / "locked.pdf"
    _encrypted_pdf(encrypted)
    loop = tmp_path / "loop.pdf"
    loop.write_bytes(
        handmade_pdf(
            {
                1: b"<< /Type /Catalog /Pages 2 0 R >>",
                2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                3: b"<< /Type /Pages /Parent 2 0 R /Kids [4 0 R 2 0 R] /Count 1 >>",
                4: PAGE,
            }
        )
    )
    endless = handmade_tiff(tmp_path / "endless.tif", 100_000)
    cut_webp = tmp_path / "cut.webp"
    frames(1)[0].save(cut_webp, format="WEBP", lossless=True)
    cut_webp.write_bytes(cut_webp.read_bytes()[:-40])
    odd = tmp_path / "notes.txt"
    odd.write_text("just words")
    cut_tiff = tiff_of(tmp_path / "cut.tif", frames(3))
    cut_tiff.write_bytes(cut_tiff.read_bytes()[:-60])
    hostile = [truncated, bomb, encrypted, loop, endless, cut_webp, odd, cut_tiff]
    with pytest.raises(Doc2XInputError) as caught:
        parse_operator([good, *hostile], deferrable=True).execute({})
    message = str(caught.value)
    assert f"{len(hostile)} of {len(hostile) + 1} files cannot be sent" in message
    assert "nothing was submitted" in message
    lines = message.splitlines()[1:]
    for path, says in zip(
        hostile,
        [
            "truncated",
            "pixels per page",
            "encrypted",
            "loops",
            "more than 1000 pages",
            "truncated",
            "looks like text",
            "truncated",
        ],
        strict=True,
    ):
        (line,) = [line for line in lines if str(path) in line]
        assert says in line
    assert str(good) not in message
    stats = lane.stats()
    assert (stats["billed_total"], stats["pdf_tasks"], stats["pdf_pages_billed"]) == (0, 0, 0)


def test_a_document_changed_after_the_check_is_named_and_not_sent(lane, tmp_path, monkeypatch):
    """Submitted after a deferral (one PDF in flight at a time), a PDF whose bytes changed is not sent."""
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    first = pdf_of_pages(tmp_path / "first.pdf", ["One"])
    second = pdf_of_pages(tmp_path / "second.pdf", ["Two"])
    op = parse_operator([first, second], deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    pdf_of_pages(second, ["Two, edited", "A new page"])  # changed while the first PDF was parsed
    event = asyncio.run(first_event(deferred.value.trigger))
    with pytest.raises(Doc2XError) as caught:
        run_to_the_end_from(op, event)
    message = str(caught.value)
    assert "1 of 2 images were not parsed" in message and str(second) in message
    assert "source_changed" in message
    assert (lane.stats()["pdf_tasks"], lane.stats()["pdf_pages_billed"]) == (1, 1)


def test_a_tiff_whose_pixel_data_is_corrupt_fails_alone_named_and_is_not_sent(lane, tmp_path):
    """Whole by its directories, corrupt inside: found when it is packed; the other sources are parsed."""
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_page("Good"))
    broken = tmp_path / "broken.tif"
    pictures = frames(3)
    pictures[0].save(
        broken, format="TIFF", save_all=True, append_images=pictures[1:], compression="tiff_adobe_deflate"
    )
    data = bytearray(broken.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # inside page 2's deflate stream
    broken.write_bytes(bytes(data))
    op = parse_operator([good, broken], deferrable=True)
    with pytest.raises(Doc2XError) as caught:
        run(op)
    message = str(caught.value)
    assert "1 of 2 images were not parsed" in message and str(broken) in message
    assert str(good) not in message.split("not parsed", 1)[1]
    stats = lane.stats()
    assert (stats["billed_total"], stats["pdf_tasks"]) == (1, 0)


def packings(monkeypatch) -> list[str]:
    """The sources the intake packs into a PDF, in order, as it packs them (each packing decodes the source)."""
    from airflow_provider_doc2x.documents import intake

    packed: list[str] = []
    real = intake.document_pdf

    def counted(path, fmt, out, *, source, limits):
        packed.append(source)
        return real(path, fmt, out, source=source, limits=limits)

    monkeypatch.setattr(intake, "document_pdf", counted)
    return packed


def test_a_tiff_sent_after_a_deferral_is_packed_once(lane, tmp_path, monkeypatch):
    """One PDF in flight at a time: the second TIFF waits a deferral; each is decoded and packed once."""
    packed = packings(monkeypatch)
    use_connection(monkeypatch, lane, pdf_max_in_flight=1)
    first = tiff_of(tmp_path / "first.tif", frames(2))
    second = tiff_of(tmp_path / "second.tif", frames(3, size=(200, 150)))
    records = run(parse_operator([first, second], deferrable=True))
    assert [len(record["pages"]) for record in records] == [2, 3]
    assert packed == [str(first), str(second)]
    assert lane.stats()["pdf_pages_billed"] == 5


def run_to_the_end_from(op, event):
    """Resume a deferred task with its trigger's event, and every later deferral, to its end."""
    while True:
        try:
            return op.execute_complete({}, event)
        except TaskDeferred as again:
            event = asyncio.run(first_event(again.trigger))


def test_a_sync_task_parses_images_by_the_sync_endpoint_and_documents_by_the_pdf_api(lane, tmp_path):
    page = tmp_path / "page.jpg"
    page.write_bytes(jpeg_page("Loose"))
    report = pdf_of_pages(tmp_path / "report.pdf", ["Report 1", "Report 2"])
    records = run(parse_operator([report, page], method="sync"))
    assert [record["source"] for record in records] == [str(report), str(page)]
    assert records[0]["document"] is True and len(records[0]["pages"]) == 2
    assert records[1]["markdown"].startswith("# Loose")
    stats = lane.stats()
    assert (stats["pdf_pages_billed"], stats["billed_total"]) == (2, 1)


def test_a_heic_photo_is_converted_to_png_and_parsed(lane, tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    photo = tmp_path / "receipt.heic"
    frames(1)[0].save(photo, format="HEIF", quality=-1)  # lossless
    (record,) = run(parse_operator([photo]))
    assert (record["source_format"], record["converted"]) == ("heif", "png")
    with Image.open(photo) as source:
        assert pixels_sha256(source)[:12] in record["markdown"]
    assert lane.stats()["billed_total"] == 1


def _encrypted_pdf(path: Path) -> None:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(img2pdf.convert([jpeg_page("Secret")]))))
    writer.encrypt("password")
    with path.open("wb") as handle:
        writer.write(handle)


# -- what an outside review found ------------------------------------------------------------------


def test_a_document_is_stored_under_the_model_that_parsed_it(lane, tmp_path):
    """``pdf_model`` parses through the PDF lane; a v3 result is never reused as v2, nor the other way."""
    contract = pdf_of_pages(tmp_path / "contract.pdf", ["Clause 1", "Clause 2"])
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="method='pdf'"):
        parse_operator([contract], method="async", pdf_model="v3-2026")
    (v3,) = run(parse_operator([contract], method="pdf", pdf_model="v3-2026", output_path=out))
    assert json.loads(read_text(v3["sidecar_path"]))["model"] == "v3-2026"
    (v2,) = run(parse_operator([contract], method="async", output_path=out))
    assert json.loads(read_text(v2["sidecar_path"]))["model"] == "v2" and v2["cached"] is False
    assert lane.stats()["preuploads_by_model"] == {"v3-2026": 1, "v2": 1}


def test_a_path_the_system_refuses_is_a_bad_input_named_with_the_others(lane, tmp_path):
    """A symlink loop or a name too long is the system's answer, not a storage outage to retry."""
    loop = tmp_path / "loop.pdf"
    loop.symlink_to(loop)
    long_name = tmp_path / ("n" * 300 + ".pdf")
    odd = tmp_path / "notes.txt"
    odd.write_text("just words")
    with pytest.raises(Doc2XInputError) as caught:
        parse_operator([loop, long_name, odd]).execute({})
    message = str(caught.value)
    assert "3 of 3 files cannot be sent" in message
    assert str(loop) in message and str(long_name) in message and str(odd) in message


def test_a_large_pdf_whose_cross_reference_is_broken_is_refused_not_rebuilt_in_memory(lane, tmp_path):
    """pypdf would rebuild it by reading it whole: over 32 MiB it is refused, named, with what to do."""
    payload = b"0" * (33 * 1024 * 1024)
    body = handmade_pdf(
        {
            1: b"<< /Type /Catalog /Pages 2 0 R >>",
            2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            3: b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 100 100] /Contents 4 0 R >>",
            4: b"<< /Length %d >>\nstream\n" % len(payload) + payload + b"\nendstream",
        }
    )
    head, _, tail = body.rpartition(b"startxref\n")
    offset = int(tail.split(b"\n")[0])
    broken = tmp_path / "archive.pdf"
    broken.write_bytes(head + b"startxref\n%d\n%%%%EOF\n" % (offset + 7))
    with pytest.raises(Doc2XInputError, match=r"archive\.pdf is corrupt \(its startxref does not point"):
        parse_operator([broken]).execute({})
    assert lane.stats()["pdf_tasks"] == 0


def test_a_document_is_named_by_its_source_in_the_log_never_by_its_private_copy(
    lane, tmp_path, caplog, capfd
):
    caplog.set_level("INFO")
    report = pdf_of_pages(tmp_path / "report.pdf", ["R1", "R2"])
    run(parse_operator([report]))
    text = logged(caplog, capfd)
    assert f"Uploaded {report} (1 sources) to Doc2X" in text
    assert "doc2x-intake-" not in text
