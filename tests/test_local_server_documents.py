"""The local Doc2X server's PDF API reads documents as users have them, through the hook over real HTTP.

Born-digital PDFs (a text layer, no image), multi-page G4 TIFFs packed by img2pdf, images in every
colour kind, scans with an OCR layer, and pages whose image does not decode. Text PDFs are written
by hand (a Helvetica text stream per page); image pages by img2pdf, as the provider packs them.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import img2pdf
import pytest
from PIL import Image, ImageDraw
from pypdf import PdfReader, PdfWriter, Transformation

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import Doc2XInputError, Doc2XJobFailedError
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook

LETTER = (612, 792)


def text_pdf(*pages: str, size: tuple[int, int] = LETTER, invisible: bool = False) -> bytes:
    """A PDF of text pages only (Helvetica, one line of the page per text line), with no image.

    ``invisible`` draws the text in render mode 3, as an OCR layer over a scan is drawn.
    """
    width, height = size
    objects: list[bytes] = [b"", b"", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        lines = [
            b"("
            + line.encode("latin-1").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")
            + b") Tj T*"
            for line in text.splitlines()
        ]
        stream = b"\n".join(
            [
                b"BT /F1 12 Tf 16 TL",
                b"3 Tr" if invisible else b"0 Tr",
                b"36 %d Td" % (height - 48),
                *lines,
                b"ET",
            ]
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents %d 0 R >>" % (width, height, len(objects))
        )
        kids.append(b"%d 0 R" % len(objects))
    objects[0] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), len(kids))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def drawing(size=(240, 160), mode: str = "L", mark: int = 0) -> Image.Image:
    """A page with a box and a line of text on it; ``mark`` moves the box, so that pages differ."""
    picture = Image.new("L", size, 255)
    pen = ImageDraw.Draw(picture)
    pen.rectangle((10 + 12 * mark, 60, 90 + 12 * mark, 140), fill=0)
    pen.text((10, 10), f"Scanned page {mark}", fill=0)
    return picture.convert(mode)


def encoded(picture: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    picture.save(out, format=fmt, **options)
    return out.getvalue()


def g4_tiff(frames: list[Image.Image]) -> bytes:
    """A multi-page bilevel TIFF, CCITT group 4, as a fax or a document scanner writes it."""
    first, *rest = frames
    return encoded(first, "TIFF", compression="group4", save_all=True, append_images=rest)


def rgb_sha256(picture: Image.Image) -> str:
    return hashlib.sha256(picture.convert("RGB").tobytes()).hexdigest()


def pixel_line(picture: Image.Image) -> str:
    """What the simple engine answers for a page held as pixels (documented in local/pdfdoc.py)."""
    width, height = picture.size
    return f"Image {width}x{height} (PNG), pixels sha256 {rgb_sha256(picture)[:12]}"


def merged(base: bytes, over: bytes, transformation: Transformation | None = None) -> bytes:
    """A one-page PDF: the first page of ``base`` with the first page of ``over`` drawn on it."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(base)))
    writer.pages[0].merge_transformed_page(
        PdfReader(io.BytesIO(over)).pages[0], transformation or Transformation()
    )
    return written(writer)


def joined(*pdfs: bytes) -> bytes:
    """One PDF of the pages of these, in order."""
    writer = PdfWriter()
    for pdf in pdfs:
        writer.append(PdfReader(io.BytesIO(pdf)))
    return written(writer)


def written(writer: PdfWriter) -> bytes:
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


async def parse(tmp_path, pdf: bytes, name: str = "document.pdf") -> list[protocol.Doc2XPage]:
    """Parse a PDF through the hook, as the provider's documents do; return its pages in order."""
    path = tmp_path / name
    path.write_bytes(pdf)
    pages = len(PdfReader(io.BytesIO(pdf)).pages)
    status = await Doc2XHook().pdf.aparse_pdf(path, pages=pages, sources=[str(path)], poll_interval=0.02)
    assert status.status == protocol.STATUS_SUCCESS and status.result is not None
    return sorted(status.result.pages, key=lambda page: page.page_idx)


# Text layers


async def test_text_only_pages_give_their_text_in_order(lane, tmp_path):
    texts = [
        "Annual Report 2025\nRevenue grew by 12 percent.",
        "Chapter 2: Costs (fixed and variable)\nCosts fell.",
        "Appendix\nAll figures in EUR.",
    ]
    pages = await parse(tmp_path, text_pdf(*texts))
    assert [page.md for page in pages] == texts
    assert [(page.page_idx, page.page_width, page.page_height, page.score) for page in pages] == [
        (index, 612, 792, 100) for index in range(3)
    ]
    stats = lane.stats()
    assert stats["pdf_billed"] == {hashlib.sha256(text.encode()).hexdigest(): 1 for text in texts}


async def test_every_page_of_a_long_pdf_is_billed_even_when_pages_repeat(lane, tmp_path):
    texts = [f"Clause {number % 10}\nThe parties agree." for number in range(20)]
    pages = await parse(tmp_path, text_pdf(*texts))
    assert [page.md for page in pages] == texts
    stats = lane.stats()
    assert stats["pdf_pages_billed"] == 20
    assert stats["pages_by_model"] == {"v2": 20}
    assert stats["pdf_billed"] == dict(Counter(hashlib.sha256(text.encode()).hexdigest() for text in texts))
    assert stats["max_pdf_billed_per_page"] == 2


async def test_a_text_page_can_ask_the_task_to_fail(lane, tmp_path):
    with pytest.raises(Doc2XJobFailedError) as failed:
        await parse(tmp_path, text_pdf("Fine", "<!-- doc2x-fail: parse_error -->"))
    assert failed.value.code == "parse_error"
    assert lane.stats()["pdf_pages_billed"] == 0


# Images


async def test_a_g4_tiff_packed_by_img2pdf_gives_one_page_per_frame(lane, tmp_path):
    frames = [drawing(mode="1", mark=mark) for mark in range(3)]
    pages = await parse(tmp_path, img2pdf.convert(g4_tiff(frames)), "fax.pdf")
    assert [page.md for page in pages] == [pixel_line(frame) for frame in frames]
    assert all(page.md for page in pages)
    assert [(page.page_width, page.page_height) for page in pages] == [(240, 160)] * 3
    assert lane.stats()["pdf_billed"] == {rgb_sha256(frame): 1 for frame in frames}


async def test_a_large_scan_is_read_as_a_one_page_pdf(lane, tmp_path):
    scan = drawing(size=(2480, 3508), mode="1", mark=9)  # A4 at 300 dpi, bilevel
    pages = await parse(tmp_path, img2pdf.convert(g4_tiff([scan])), "scan.pdf")
    assert [(page.page_width, page.page_height, page.md) for page in pages] == [
        (2480, 3508, pixel_line(scan))
    ]
    assert lane.stats()["pdf_pages_billed"] == 1


async def test_images_of_every_colour_kind_are_read_from_their_pixels(lane, tmp_path):
    bilevel, grey = drawing(mode="1", mark=1), drawing(mark=2)
    indexed = drawing(mode="RGB", mark=3).quantize(colors=4)
    grey_jpeg = encoded(drawing(mark=4), "JPEG", comment=b"# Grey JPEG page")
    images = [encoded(bilevel, "PNG"), encoded(grey, "PNG"), encoded(indexed, "PNG"), grey_jpeg]
    pages = await parse(tmp_path, img2pdf.convert(images))
    assert [page.md for page in pages] == [
        pixel_line(bilevel),
        pixel_line(grey),
        pixel_line(indexed),
        "# Grey JPEG page",  # a JPEG is embedded as it is: the engine reads its comment
    ]


# Text and images together


async def test_a_mixed_pdf_gives_its_text_pages_and_its_image_pages(lane, tmp_path):
    letter = "Cover letter\nPlease find the invoice enclosed."
    scan = img2pdf.convert(encoded(drawing(mode="RGB", mark=5), "JPEG", comment=b"# Scanned invoice"))
    pages = await parse(tmp_path, joined(text_pdf(letter), scan, text_pdf(letter)))
    assert [page.md for page in pages] == [letter, "# Scanned invoice", letter]
    assert [page.score for page in pages] == [100, 100, 100]
    stats = lane.stats()
    assert stats["pdf_pages_billed"] == 3
    assert stats["pdf_billed"][hashlib.sha256(letter.encode()).hexdigest()] == 2


async def test_a_page_with_text_and_images_is_read_as_what_it_shows(lane, tmp_path):
    def image_page(title: bytes, mark: int) -> tuple[bytes, tuple[int, int]]:
        image = img2pdf.convert(encoded(drawing(mode="RGB", mark=mark), "JPEG", comment=title))
        box = PdfReader(io.BytesIO(image)).pages[0].mediabox
        return image, (round(box.width), round(box.height))

    logo, _ = image_page(b"# Logo", 6)
    letter = merged(
        text_pdf("Dear customer,\nthank you."), logo, Transformation().scale(0.3).translate(400, 700)
    )
    background, size = image_page(b"# Background", 7)
    slide = merged(background, text_pdf("Quarterly results", size=size))  # visible text over a picture
    scan, size = image_page(b"# The scanned page", 8)
    ocr_scan = merged(scan, text_pdf("Tbe scanned pagc", size=size, invisible=True))  # an OCR layer
    pages = await parse(tmp_path, joined(letter, slide, ocr_scan))
    assert [page.md for page in pages] == [
        "Dear customer,\nthank you.",
        "Quarterly results",
        "# The scanned page",
    ]
    assert [(page.page_width, page.page_height) for page in pages] == [(612, 792), size, (240, 160)]


# Pages that do not decode


async def test_an_image_that_does_not_decode_fails_the_task_as_an_invalid_file(lane, tmp_path):
    damaged = bytearray(img2pdf.convert(encoded(drawing(mode="RGB"), "PNG")))
    data = damaged.index(b"stream\n", damaged.index(b"/Subtype /Image")) + len(b"stream\n")
    damaged[data + 2 : data + 42] = bytes(range(40))  # past the zlib header: the pixels are lost
    with pytest.raises(Doc2XInputError) as failed:
        await parse(tmp_path, bytes(damaged), "damaged.pdf")
    assert failed.value.code == "parse_file_invalid"
    stats = lane.stats()
    assert (stats["pdf_tasks_failed"], stats["pdf_pages_billed"]) == (1, 0)
    pages = await parse(tmp_path, text_pdf("Still here"), "next.pdf")  # the server goes on
    assert [page.md for page in pages] == ["Still here"]
