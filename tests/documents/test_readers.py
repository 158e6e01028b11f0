"""The readers on well-formed files: formats sniffed, pages counted, rasters converted without losing a pixel."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import struct
import zlib
from pathlib import Path

import img2pdf
import pypdf
import pytest
from PIL import Image
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from airflow_provider_doc2x.documents import formats
from airflow_provider_doc2x.documents.formats import BMP, GIF, HEIF, JPEG, PDF, PNG, TIFF, WEBP
from airflow_provider_doc2x.documents.readers import (
    DocumentLimits,
    Inspection,
    document_pdf,
    inspect_file,
    to_png,
)
from airflow_provider_doc2x.exceptions import Doc2XInputError


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """An image that compresses badly, the same for a seed."""
    data = hashlib.shake_256(f"{seed}-{size}-{mode}".encode()).digest(size[0] * size[1] * len(mode))
    return Image.frombytes(mode, size, data)


def save(path: Path, frames: list[Image.Image], fmt: str, **options) -> Path:
    """Write one or more frames as ``fmt`` (Pillow's name) and answer the path."""
    if len(frames) > 1:
        options.update(save_all=True, append_images=frames[1:])
    frames[0].save(path, fmt, **options)
    return path


def head(path: Path) -> bytes:
    return path.read_bytes()[: formats.HEAD_BYTES]


def first_frame(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.copy()


def png_of(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def text_pdf(path: Path, pages: int) -> Path:
    """A PDF of ``pages`` pages of text, made with pypdf (Helvetica, "Page n" on each)."""
    writer = pypdf.PdfWriter()
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    for number in range(1, pages + 1):
        page = writer.add_blank_page(612, 792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
        )
        content = DecodedStreamObject()
        content.set_data(b"BT /F1 24 Tf 72 700 Td (Page %d) Tj ET" % number)
        page.replace_contents(content)
    with open(path, "wb") as output:
        writer.write(output)
    return path


def png_chunks(data: bytes, kind: bytes) -> bytes:
    """The joined payloads of a PNG's chunks of one kind (its IDAT data, say)."""
    position, parts = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        if data[position + 4 : position + 8] == kind:
            parts.append(data[position + 8 : position + 8 + length])
        position += 12 + length
    return b"".join(parts)


def page_images(pdf: Path) -> list[pypdf.generic.StreamObject]:
    """Each page's one image XObject."""
    found = []
    for page in pypdf.PdfReader(pdf).pages:
        xobjects = page["/Resources"]["/XObject"]
        (name,) = list(xobjects)
        found.append(xobjects[name].get_object())
    return found


# --- sniff ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pillow_format", "expected"),
    [
        ("a.jpg", "JPEG", JPEG),
        ("a.png", "PNG", PNG),
        ("a.tif", "TIFF", TIFF),
        ("a.webp", "WEBP", WEBP),
        ("a.bmp", "BMP", BMP),
        ("a.gif", "GIF", GIF),
    ],
)
def test_sniff_tells_each_raster_by_its_magic(tmp_path, name, pillow_format, expected):
    path = save(tmp_path / "no-extension", [noise((16, 8))], pillow_format)
    assert formats.sniff(head(path)) == expected
    assert formats.describe(expected).startswith(("a ", "an "))


def test_sniff_tells_pdf_big_tiff_and_heif_by_their_magic(tmp_path):
    pdf = text_pdf(tmp_path / "a.pdf", 1)
    assert formats.sniff(head(pdf)) == PDF
    assert formats.sniff(b"II+\x00\x08\x00\x00\x00" + bytes(8)) == TIFF
    assert formats.sniff(b"MM\x00+\x00\x08\x00\x00" + bytes(8)) == TIFF
    for brand in (b"heic", b"heix", b"hevc", b"mif1", b"msf1"):
        assert formats.sniff(b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1heic") == HEIF
    assert formats.sniff(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf") is None
    assert formats.sniff(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2") is None


def test_a_pdf_header_after_junk_is_found_within_the_first_1024_bytes():
    pdf = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj"
    assert formats.sniff(b"\x00" * 1000 + pdf) == PDF
    assert formats.sniff(b"junk" * 300 + pdf) is None  # the header starts past byte 1024
    assert formats.sniff(b"\x89PNG\r\n\x1a\n" + pdf) == PNG  # a raster's magic comes first


@pytest.mark.parametrize(
    ("content", "looks_like"),
    [
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "an HTML page"),
        (b"  <html lang=en>", "an HTML page"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "an SVG image"),
        (b'<?xml version="1.0"?><note/>', "an XML document"),
        (b'{"error": "not found"}', "JSON text"),
        (b"PK\x03\x04\x14\x00\x00\x00", "a ZIP archive (or an Office document)"),
        (b"\x1f\x8b\x08\x00", "a gzip archive"),
        (b"hello, world\n", "text"),
        ("héllo wörld".encode()[:-1], "text"),  # a character cut by the end of the head
        (b"\x00\x01\x02\xfe\xff\x80", "an unknown binary format"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "an AVIF image"),
        (b"", "an empty file"),
    ],
)
def test_describe_content_says_what_an_unknown_file_looks_like(content, looks_like):
    assert formats.sniff(content) is None
    assert formats.describe_content(content) == looks_like


# --- inspect ----------------------------------------------------------------------------------


def test_inspect_counts_the_pages_of_a_tiff(tmp_path):
    path = save(tmp_path / "scan.tif", [noise((60 + page, 40), seed=page) for page in range(3)], "TIFF")
    assert inspect_file(path, TIFF, source="scan.tif") == Inspection(TIFF, 3, 60, 40, mode="RGB")


def test_inspect_counts_the_pages_of_an_img2pdf_pdf_of_twenty_pngs(tmp_path):
    pngs = []
    for page in range(20):
        buffer = io.BytesIO()
        noise((20, 30), seed=page).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    path = tmp_path / "packed.pdf"
    path.write_bytes(img2pdf.convert(*pngs, engine=img2pdf.Engine.internal, nodate=True))
    assert inspect_file(path, PDF, source="packed.pdf") == Inspection(PDF, 20, 0, 0)


def test_inspect_counts_the_pages_of_a_text_pdf(tmp_path):
    path = text_pdf(tmp_path / "report.pdf", 20)
    assert pypdf.PdfReader(path).pages[19].extract_text() == "Page 20"
    assert inspect_file(path, PDF, source="report.pdf").pages == 20


def test_inspect_reads_an_animated_gif_as_one_page_of_several_frames(tmp_path):
    frames = [noise((30, 20), seed=frame).quantize(64) for frame in range(4)]
    path = save(tmp_path / "anim.gif", frames, "GIF")
    inspection = inspect_file(path, GIF, source="anim.gif")
    assert (inspection.pages, inspection.frames, inspection.mode) == (1, 4, "P")
    assert (inspection.width, inspection.height) == (30, 20)


@pytest.mark.parametrize(
    ("fmt", "pillow_format", "mode"), [(JPEG, "JPEG", "RGB"), (PNG, "PNG", "RGBA"), (BMP, "BMP", "RGB")]
)
def test_inspect_reads_a_single_raster(tmp_path, fmt, pillow_format, mode):
    path = save(tmp_path / "page", [noise((48, 32), mode)], pillow_format)
    assert inspect_file(path, fmt, source="page") == Inspection(fmt, 1, 48, 32, mode=mode)


def test_limits_are_positive_whole_numbers():
    with pytest.raises(ValueError, match="max_pages"):
        DocumentLimits(max_pages=0)
    with pytest.raises(ValueError, match="max_page_pixels"):
        DocumentLimits(max_page_pixels=1.5)  # type: ignore[arg-type]


# --- to_png -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "pillow_format", "mode", "options"),
    [
        (WEBP, "WEBP", "RGBA", {"lossless": True}),
        (WEBP, "WEBP", "RGB", {"lossless": True}),
        (BMP, "BMP", "RGB", {}),
        (BMP, "BMP", "L", {}),
        (TIFF, "TIFF", "RGB", {"compression": "tiff_lzw"}),
        (TIFF, "TIFF", "L", {}),
        (TIFF, "TIFF", "1", {"compression": "group4"}),
        (TIFF, "TIFF", "LA", {}),
        (TIFF, "TIFF", "I;16", {}),
    ],
)
def test_to_png_keeps_every_pixel_and_the_mode(tmp_path, fmt, pillow_format, mode, options):
    path = save(tmp_path / "source", [noise((37, 23), mode)], pillow_format, **options)
    png = png_of(to_png(path, fmt, source="source"))
    source = first_frame(path)
    assert (png.mode, png.size) == (source.mode, source.size)
    assert png.tobytes() == source.tobytes()


def test_to_png_of_a_gif_keeps_its_first_frame_palette_and_transparency(tmp_path):
    frames = [noise((30, 20), seed=frame).quantize(16) for frame in range(3)]
    path = save(tmp_path / "anim.gif", frames, "GIF", transparency=0)
    png = png_of(to_png(path, GIF, source="anim.gif"))
    source = first_frame(path)
    assert png.mode == "P" and png.info.get("transparency") == 0
    assert png.tobytes() == source.tobytes()
    assert png.convert("RGBA").tobytes() == source.convert("RGBA").tobytes()


def test_to_png_turns_cmyk_into_rgb_by_pillows_formula(tmp_path):
    path = save(tmp_path / "print.tif", [noise((40, 30), "CMYK")], "TIFF")
    png = png_of(to_png(path, TIFF, source="print.tif"))
    assert png.mode == "RGB"
    assert png.tobytes() == first_frame(path).convert("RGB").tobytes()


def test_to_png_keeps_32_bit_integers_that_fit_in_16_bits(tmp_path):
    values = Image.frombytes("I", (4, 1), struct.pack("<4i", 0, 1, 300, 65535))
    path = save(tmp_path / "depth.tif", [values], "TIFF")
    png = png_of(to_png(path, TIFF, source="depth.tif"))
    assert png.mode == "I;16"
    assert png.convert("I").tobytes() == values.tobytes()


def test_to_png_refuses_a_multi_page_tiff_which_document_pdf_takes_whole(tmp_path):
    path = save(tmp_path / "scan.tif", [noise((10, 10), seed=page) for page in range(2)], "TIFF")
    with pytest.raises(ValueError, match="document_pdf"):
        to_png(path, TIFF, source="scan.tif")


HEIF_INSTALLED = importlib.util.find_spec("pillow_heif") is not None


def heif_header(path: Path) -> Path:
    """The first bytes of a HEIC file (its ``ftyp`` box), enough to be sniffed as HEIF."""
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    return path


@pytest.mark.skipif(HEIF_INSTALLED, reason="pillow-heif is installed: the round trip is tested instead")
def test_a_heif_image_without_pillow_heif_is_refused_naming_the_extra(tmp_path):
    path = heif_header(tmp_path / "photo.heic")
    assert formats.sniff(head(path)) == HEIF
    for read in (
        lambda: inspect_file(path, HEIF, source="photo.heic"),
        lambda: to_png(path, HEIF, source="photo.heic"),
    ):
        with pytest.raises(Doc2XInputError) as refused:
            read()
        assert "photo.heic" in str(refused.value)
        assert "pip install 'airflow-provider-doc2x[heif]'" in str(refused.value)


@pytest.mark.skipif(
    not HEIF_INSTALLED, reason="pillow-heif is not installed (the extra airflow-provider-doc2x[heif])"
)
def test_a_heif_image_converts_to_the_png_of_its_decoded_pixels(tmp_path):
    import pillow_heif

    pillow_heif.register_heif_opener()
    path = save(tmp_path / "photo.heic", [noise((64, 48))], "HEIF", quality=-1)
    assert formats.sniff(head(path)) == HEIF
    assert inspect_file(path, HEIF, source="photo.heic").pages == 1
    png = png_of(to_png(path, HEIF, source="photo.heic"))
    assert png.tobytes() == first_frame(path).tobytes()


# --- document_pdf -----------------------------------------------------------------------------


def test_a_multi_page_tiff_becomes_a_pdf_of_every_page_one_point_per_pixel(tmp_path):
    sizes = [(60, 40), (45, 70), (80, 80)]
    path = save(tmp_path / "scan.tif", [noise(size, seed=page) for page, size in enumerate(sizes)], "TIFF")
    out = tmp_path / "scan.pdf"
    assert document_pdf(path, TIFF, out, source="scan.tif") == 3
    pages = pypdf.PdfReader(out).pages
    assert [(page.mediabox.width, page.mediabox.height) for page in pages] == sizes
    for page, image in enumerate(page_images(out)):
        assert image.get_data() == noise(sizes[page], seed=page).tobytes()  # lossless


def test_g4_bilevel_tiff_pages_are_embedded_as_they_are(tmp_path):
    frames = [noise((200, 100), "1", seed=page) for page in range(2)]
    path = save(tmp_path / "fax.tif", frames, "TIFF", compression="group4")
    out = tmp_path / "fax.pdf"
    assert document_pdf(path, TIFF, out, source="fax.tif") == 2
    assert [list(image["/Filter"]) for image in page_images(out)] == [["/CCITTFaxDecode"]] * 2
    data = path.read_bytes()
    with Image.open(path) as tiff:
        for page, image in enumerate(page_images(out)):
            tiff.seek(page)
            (offset,), (length,) = tiff.tag_v2[273], tiff.tag_v2[279]  # the page's one strip
            assert image._data == data[offset : offset + length]
            assert image["/DecodeParms"][0]["/K"] == -1  # Group 4
            assert (image["/Width"], image["/Height"]) == frames[page].size


def test_rgba_tiff_pages_are_flattened_onto_white(tmp_path):
    frames = []
    for page in range(2):
        frame = Image.new("RGBA", (20, 10), (200, 30, 30, 255))
        frame.paste((0, 0, 255, 0), (10 + page, 0, 20, 10))  # transparent blue on the right
        frames.append(frame)
    path = save(tmp_path / "overlay.tif", frames, "TIFF")
    out = tmp_path / "overlay.pdf"
    assert document_pdf(path, TIFF, out, source="overlay.tif") == 2
    for page, image in enumerate(page_images(out)):
        assert "/SMask" not in image
        expected = Image.new("RGB", (20, 10), "white")
        expected.paste((200, 30, 30), (0, 0, 10 + page, 10))
        assert image.get_data() == expected.tobytes()


def test_a_png_over_the_image_limit_becomes_a_pdf_holding_its_idat_data(tmp_path):
    path = tmp_path / "poster.png"
    noise((2100, 2100)).save(path, "PNG", compress_level=1)
    assert path.stat().st_size > 12 * 1024 * 1024
    out = tmp_path / "poster.pdf"
    assert document_pdf(path, PNG, out, source="poster.png") == 1
    (page,) = pypdf.PdfReader(out).pages
    assert (page.mediabox.width, page.mediabox.height) == (2100, 2100)
    (image,) = page_images(out)
    assert image["/Filter"] == "/FlateDecode"
    assert image._data == png_chunks(path.read_bytes(), b"IDAT")
    assert zlib.decompress(image._data)[:1] in (
        b"\x00",
        b"\x01",
        b"\x02",
        b"\x03",
        b"\x04",
    )  # PNG filter bytes


def test_a_large_jpeg_is_embedded_unchanged(tmp_path):
    path = save(tmp_path / "photo.jpg", [noise((300, 200))], "JPEG", quality=95)
    out = tmp_path / "photo.pdf"
    assert document_pdf(path, JPEG, out, source="photo.jpg") == 1
    (image,) = page_images(out)
    assert image["/Filter"] == "/DCTDecode" and image._data == path.read_bytes()


def test_an_animated_gif_gives_its_first_frame_flattened(tmp_path):
    frames = [noise((30, 20), seed=frame).quantize(16) for frame in range(3)]
    path = save(tmp_path / "anim.gif", frames, "GIF", transparency=0)
    out = tmp_path / "anim.pdf"
    assert document_pdf(path, GIF, out, source="anim.gif") == 1
    (image,) = page_images(out)
    source = first_frame(path).convert("RGBA")
    expected = Image.new("RGB", source.size, "white")
    expected.paste(source.convert("RGB"), mask=source.getchannel("A"))
    assert "/SMask" not in image and image.get_data() == expected.tobytes()
