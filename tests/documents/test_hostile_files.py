"""Hostile and broken files: each refused before anything is sent, naming the file, the figure and the limit.

The files are made at test time: cut copies of good files, and headers written by hand with
``struct`` (a PNG or TIFF that claims 100,000 x 100,000 pixels in a few hundred bytes, a TIFF of
100,000 pages sharing one strip, a chain of pages or a page tree that loops). Which function
catches what is part of the contract: a JPEG, PNG, WebP or PDF may be sent as it is, so
:func:`inspect_file` must refuse it when it is cut; a GIF, BMP or TIFF is always decoded by
:func:`to_png` or :func:`document_pdf` before it is sent, and a cut one is refused there.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import pypdf
import pytest
from PIL import Image

from airflow_provider_doc2x.documents.formats import GIF, JPEG, PDF, PNG, TIFF, WEBP
from airflow_provider_doc2x.documents.readers import DocumentLimits, document_pdf, inspect_file, to_png
from airflow_provider_doc2x.exceptions import Doc2XInputError, Doc2XPermanentError
from tests.documents.test_readers import noise, save, text_pdf


def refusal(read, *args, **kwargs) -> str:
    """The message of the Doc2XInputError ``read`` raises; it names the source it was given."""
    with pytest.raises(Doc2XInputError) as refused:
        read(*args, **kwargs)
    assert refused.value.source == kwargs["source"]
    assert kwargs["source"] in refused.value.message
    assert isinstance(refused.value, Doc2XPermanentError)  # no retry can fix a file
    return refused.value.message


def handmade_pdf(objects: dict[int, bytes]) -> bytes:
    """A PDF of these objects (object 1 the catalog) with a correct cross-reference table."""
    data = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number, body in sorted(objects.items()):
        offsets[number] = len(data)
        data += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref, size = len(data), max(objects) + 1
    data += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        data += b"%010d 00000 n \n" % offsets[number]
    data += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(data)


PAGE = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 100 100] >>"


def handmade_tiff(
    path: Path, pages: int, *, size: tuple[int, int] = (1, 1), loop_to_first: bool = False
) -> Path:
    """A grey TIFF of ``pages`` directories, each page a one-byte strip of its own (100,000 pages in 13 MB).

    ``loop_to_first``: the last directory points back at the first, so the chain never ends.
    """
    width, height = size

    def directory(strip: int) -> bytes:
        entries = [
            (256, 4, 1, width),
            (257, 4, 1, height),
            (258, 3, 1, 8),
            (259, 3, 1, 1),
            (262, 3, 1, 1),
            (273, 4, 1, strip),
            (277, 3, 1, 1),
            (278, 4, 1, height),
            (279, 4, 1, 1),
        ]
        return struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *entry) for entry in entries)

    step, first = len(directory(0)) + 4, 8
    strips = first + step * pages
    data = bytearray(strips + pages)
    data[:8] = b"II*\x00" + struct.pack("<I", first)
    data[strips:] = b"\x80" * pages
    for page in range(pages):
        start = first + page * step
        following = start + step if page < pages - 1 else (first if loop_to_first else 0)
        data[start : start + step] = directory(strips + page) + struct.pack("<I", following)
    path.write_bytes(data)
    return path


def test_a_tiff_whose_pages_share_their_pixel_data_is_refused(tmp_path):
    """Pages pointing at one strip would decode the same bytes again and again: hours from a small file."""
    path = handmade_tiff(tmp_path / "shared.tif", 3)
    data = bytearray(path.read_bytes())
    entry = struct.pack("<HHI", 273, 4, 1)  # StripOffsets, one LONG: its value follows
    places = [at for at in range(len(data)) if data[at : at + 8] == entry]
    first = data[places[0] + 8 : places[0] + 12]
    for at in places:
        data[at + 8 : at + 12] = first  # every page's strip is the first page's
    path.write_bytes(bytes(data))
    message = refusal(inspect_file, path, TIFF, source="shared.tif")
    assert "pages 1 and 2 share their pixel data" in message


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, in a few dozen bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )
    return path


def cut(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# --- PDF --------------------------------------------------------------------------------------


def test_an_encrypted_pdf_is_refused_with_how_to_decrypt_it(tmp_path):
    writer = pypdf.PdfWriter()
    writer.add_blank_page(100, 100)
    writer.encrypt("secret")
    path = tmp_path / "locked.pdf"
    writer.write(path)
    message = refusal(inspect_file, path, PDF, source="s3://bucket/locked.pdf")
    assert "is encrypted" in message and "decrypt it first" in message


def test_a_truncated_pdf_is_refused(tmp_path):
    path = cut(text_pdf(tmp_path / "report.pdf", 5), 0.6)
    message = refusal(inspect_file, path, PDF, source="report.pdf")
    assert "is truncated" in message and "%%EOF" in message


def test_a_pdf_whose_page_tree_loops_is_refused(tmp_path):
    path = tmp_path / "loop.pdf"
    path.write_bytes(
        handmade_pdf(
            {
                1: b"<< /Type /Catalog /Pages 2 0 R >>",
                2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                3: b"<< /Type /Pages /Parent 2 0 R /Kids [4 0 R 2 0 R] /Count 1 >>",  # back to its parent
                4: PAGE,
            }
        )
    )
    message = refusal(inspect_file, path, PDF, source="loop.pdf")
    assert "is corrupt" in message and "reaches object 2 0 R twice: it loops" in message


def test_a_pdf_listing_one_page_many_times_is_refused_at_the_second(tmp_path):
    path = tmp_path / "echo.pdf"
    kids = b" ".join([b"3 0 R"] * 100_000)
    path.write_bytes(
        handmade_pdf(
            {
                1: b"<< /Type /Catalog /Pages 2 0 R >>",
                2: b"<< /Type /Pages /Kids [%s] /Count 100000 >>" % kids,
                3: PAGE,
            }
        )
    )
    message = refusal(inspect_file, path, PDF, source="echo.pdf", limits=DocumentLimits(max_pages=200_000))
    assert "reaches object 3 0 R twice" in message


def test_a_pdf_claiming_more_pages_than_the_limit_is_refused(tmp_path):
    path = tmp_path / "claims.pdf"
    path.write_bytes(
        handmade_pdf(
            {
                1: b"<< /Type /Catalog /Pages 2 0 R >>",
                2: b"<< /Type /Pages /Kids [3 0 R] /Count 5000 >>",
                3: PAGE,
            }
        )
    )
    message = refusal(inspect_file, path, PDF, source="claims.pdf")
    assert "claims 5,000 pages" in message and "limit of 1000 pages" in message
    assert "document_max_pages" in message


def test_a_pdf_with_more_pages_than_the_limit_is_refused(tmp_path):
    path = text_pdf(tmp_path / "long.pdf", 20)
    message = refusal(inspect_file, path, PDF, source="long.pdf", limits=DocumentLimits(max_pages=5))
    assert "claims 20 pages" in message and "limit of 5 pages" in message and "document_max_pages" in message
    assert inspect_file(path, PDF, source="long.pdf", limits=DocumentLimits(max_pages=20)).pages == 20


def test_a_pdf_whose_page_count_lies_is_counted_page_by_page(tmp_path):
    """/Count says 1; the walk counts the pages themselves, and stops one past the limit."""
    pages = {number: PAGE for number in range(3, 23)}
    kids = b" ".join(b"%d 0 R" % number for number in pages)
    objects = {1: b"<< /Type /Catalog /Pages 2 0 R >>", 2: b"<< /Type /Pages /Kids [%s] /Count 1 >>" % kids}
    path = tmp_path / "liar.pdf"
    path.write_bytes(handmade_pdf({**objects, **pages}))
    assert inspect_file(path, PDF, source="liar.pdf").pages == 20
    message = refusal(inspect_file, path, PDF, source="liar.pdf", limits=DocumentLimits(max_pages=5))
    assert "has more than 5 pages" in message and "document_max_pages" in message


def test_a_pdf_over_the_byte_limit_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.pdf"
    path.write_bytes(b"%PDF-1.7\n" + bytes(2048))  # not even a PDF past its header: never parsed
    message = refusal(inspect_file, path, PDF, source="big.pdf", limits=DocumentLimits(max_pdf_bytes=1024))
    assert "2,057 bytes" in message and "limit of 1,024 bytes" in message and "document_max_bytes" in message


def test_a_pdf_without_pages_is_refused(tmp_path):
    path = tmp_path / "empty.pdf"
    path.write_bytes(
        handmade_pdf({1: b"<< /Type /Catalog /Pages 2 0 R >>", 2: b"<< /Type /Pages /Kids [] /Count 0 >>"})
    )
    assert "has no pages" in refusal(inspect_file, path, PDF, source="empty.pdf")


def test_a_file_that_is_not_what_it_was_sniffed_as_is_refused(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_text("<!DOCTYPE html><html><body>Please sign in</body></html>")
    message = refusal(inspect_file, path, PDF, source="scan.pdf")
    assert "is not a PDF document by its content (it looks like an HTML page)" in message


def test_a_missing_or_empty_file_is_refused(tmp_path):
    assert "cannot be read" in refusal(inspect_file, tmp_path / "gone.png", PNG, source="gone.png")
    (tmp_path / "empty.png").write_bytes(b"")
    assert "is empty" in refusal(to_png, tmp_path / "empty.png", PNG, source="empty.png")


# --- truncated rasters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "pillow_format", "options", "says"),
    [
        (PNG, "PNG", {}, "before its IEND chunk"),
        (WEBP, "WEBP", {"lossless": True}, "its header says"),
        (JPEG, "JPEG", {}, "no end (EOI marker)"),
    ],
)
def test_a_truncated_jpeg_png_or_webp_is_refused_by_inspect(tmp_path, fmt, pillow_format, options, says):
    """These three may be uploaded as they are: inspect_file, run on every source first, catches the cut."""
    path = cut(save(tmp_path / "page", [noise((120, 90))], pillow_format, **options), 0.7)
    message = refusal(inspect_file, path, fmt, source="page")
    assert "is truncated" in message and says in message
    assert "is truncated" in refusal(to_png, path, fmt, source="page")


def test_a_truncated_gif_is_refused_when_it_is_decoded(tmp_path):
    """A GIF is never sent as it is: to_png and document_pdf decode it first and refuse the cut."""
    path = cut(save(tmp_path / "anim.gif", [noise((120, 90)).quantize(200)], "GIF"), 0.7)
    assert inspect_file(path, GIF, source="anim.gif").pages == 1  # headers only: whole enough
    assert "is truncated" in refusal(to_png, path, GIF, source="anim.gif")
    assert "is truncated" in refusal(document_pdf, path, GIF, tmp_path / "out.pdf", source="anim.gif")


def test_a_truncated_tiff_is_refused_from_its_directories(tmp_path):
    """Pillow writes a TIFF's directory before its pixels: a cut in the pixels is found from the
    strips the directory places past the file's end, before anything is decoded."""
    path = cut(save(tmp_path / "scan.tif", [noise((120, 90))], "TIFF"), 0.7)
    message = refusal(inspect_file, path, TIFF, source="scan.tif")
    assert "is truncated (the file ends before the pixel data of page 1" in message
    assert "is truncated" in refusal(to_png, path, TIFF, source="scan.tif")
    assert "is truncated" in refusal(document_pdf, path, TIFF, tmp_path / "out.pdf", source="scan.tif")


def test_a_multi_page_tiff_cut_in_its_last_page_is_refused_from_its_directories(tmp_path):
    frames = [noise((60, 40)) for _ in range(3)]
    path = save(tmp_path / "scan.tif", frames, "TIFF")
    whole = inspect_file(path, TIFF, source="scan.tif")
    assert whole.pages == 3
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    message = refusal(inspect_file, path, TIFF, source="scan.tif")
    assert "is truncated (the file ends before the pixel data of page 3" in message


def test_a_tiff_cut_inside_its_chain_of_pages_is_refused_by_inspect(tmp_path):
    path = cut(handmade_tiff(tmp_path / "scan.tif", 10), 0.55)
    message = refusal(inspect_file, path, TIFF, source="scan.tif")
    assert "is truncated (the file ends before the pixel data of page 1" in message


# --- TIFF page chains -------------------------------------------------------------------------


def test_handmade_tiff_pages_are_read_by_pillow_and_counted(tmp_path):
    """Positive control: the hand-written pages are real pages."""
    path = handmade_tiff(tmp_path / "three.tif", 3, size=(1, 1))
    with Image.open(path) as image:
        assert image.n_frames == 3
    assert inspect_file(path, TIFF, source="three.tif").pages == 3
    assert document_pdf(path, TIFF, tmp_path / "three.pdf", source="three.tif") == 3


def test_a_tiff_of_100000_pages_is_refused_after_the_limit(tmp_path):
    path = handmade_tiff(tmp_path / "endless.tif", 100_000)
    message = refusal(inspect_file, path, TIFF, source="endless.tif")
    assert "has more than 1000 pages" in message and "limit of 1000 pages" in message
    assert "document_max_pages" in message
    assert "more than 1000 pages" in refusal(
        document_pdf, path, TIFF, tmp_path / "out.pdf", source="endless.tif"
    )


def test_a_tiff_whose_pages_loop_is_refused(tmp_path):
    path = handmade_tiff(tmp_path / "loop.tif", 3, loop_to_first=True)
    message = refusal(inspect_file, path, TIFF, source="loop.tif")
    assert "is corrupt" in message and "page 3 points back to page 1" in message
    assert "loops" in refusal(document_pdf, path, TIFF, tmp_path / "out.pdf", source="loop.tif")


# --- decompression bombs ----------------------------------------------------------------------


def test_a_png_claiming_ten_billion_pixels_is_refused_before_decoding(tmp_path):
    path = bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    assert path.stat().st_size < 200
    for read in (inspect_file, to_png):
        message = refusal(read, path, PNG, source="bomb.png")
        assert "100000x100000 px (10,000,000,000 pixels)" in message
        assert "limit of 89,478,485 pixels per page" in message and "page_max_pixels" in message
    assert "10,000,000,000 pixels" in refusal(
        document_pdf, path, PNG, tmp_path / "out.pdf", source="bomb.png"
    )


def test_a_tiff_page_claiming_ten_billion_pixels_is_refused_before_decoding(tmp_path):
    path = handmade_tiff(tmp_path / "bomb.tif", 1, size=(100_000, 100_000))
    for read in (inspect_file, to_png):
        message = refusal(read, path, TIFF, source="bomb.tif")
        assert "100000x100000 px (10,000,000,000 pixels)" in message and "page_max_pixels" in message


def test_the_pixel_limit_is_checked_on_every_page_of_a_tiff(tmp_path):
    path = save(tmp_path / "scan.tif", [noise((10, 10)), noise((40, 40)), noise((10, 10))], "TIFF")
    message = refusal(
        inspect_file, path, TIFF, source="scan.tif", limits=DocumentLimits(max_page_pixels=1000)
    )
    assert message.startswith("Page 2 of TIFF image scan.tif is 40x40 px (1,600 pixels)")


def test_pillows_own_bomb_check_is_a_refusal_too(tmp_path):
    """A limit raised past twice Pillow's own: Pillow refuses to open it, and the refusal says what to raise."""
    path = bomb_png(tmp_path / "huge.png", 20_000, 20_000)
    limits = DocumentLimits(max_page_pixels=10**9)
    message = refusal(inspect_file, path, PNG, source="huge.png", limits=limits)
    assert "more pixels than Pillow opens" in message and "PIL.Image.MAX_IMAGE_PIXELS" in message
    assert "400000000 pixels" in message and "limit is 1,000,000,000 pixels" in message


def test_pillows_bomb_warning_raised_as_an_error_is_a_refusal_too(tmp_path):
    """Where warnings are errors, Pillow's warning (past its own setting, under twice it) refuses too."""
    path = bomb_png(tmp_path / "wide.png", 10_000, 10_000)
    limits = DocumentLimits(max_page_pixels=10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        message = refusal(inspect_file, path, PNG, source="wide.png", limits=limits)
    assert "more pixels than Pillow opens" in message and "100000000 pixels" in message
