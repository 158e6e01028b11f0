"""Packing images into PDFs: lossless, one point per pixel, grouped, split, deduplicated, bounded, private."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import stat
import struct
import zlib
from pathlib import Path

import img2pdf
import pypdf
import pytest
from PIL import Image, ImageCms

from airflow_provider_doc2x.pdf import packing
from airflow_provider_doc2x.pdf.packing import PackImage, pack_images


def noise(size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Image.Image:
    """An image that compresses badly (so sizes in bytes are predictable), the same for a seed."""
    channels = len(mode)
    data = hashlib.shake_256(f"{seed}-{size}".encode()).digest(size[0] * size[1] * channels)
    return Image.frombytes(mode, size, data)


@pytest.fixture
def images(tmp_path):
    """Write an image: ``images("a.jpg", (400, 300))``; noise by default, a plain colour with ``plain=True``."""

    def write(name: str, size=(400, 300), *, mode="RGB", seed=0, plain=False, **save) -> Path:
        path = tmp_path / name
        image = (
            Image.new(mode, size, 1 if mode in ("1", "P") else "white") if plain else noise(size, seed, mode)
        )
        image.save(path, "JPEG" if name.endswith(".jpg") else "PNG", **save)
        return path

    return write


def xobjects(pdf_path: Path) -> list[tuple[pypdf.PageObject, pypdf.generic.StreamObject]]:
    reader = pypdf.PdfReader(pdf_path)
    found = []
    for page in reader.pages:
        (image,) = [ref.get_object() for ref in page["/Resources"]["/XObject"].values()]
        found.append((page, image))
    return found


def png_idat(data: bytes) -> bytes:
    position, parts = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        if data[position + 4 : position + 8] == b"IDAT":
            parts.append(data[position + 8 : position + 8 + length])
        position += 12 + length
    return b"".join(parts)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def interlaced_png(width: int = 8, height: int = 8) -> bytes:
    """A grey, Adam7-interlaced PNG (Pillow cannot write one)."""
    passes = [
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ]
    rows = b""
    for x0, y0, dx, dy in passes:
        columns = (width - x0 + dx - 1) // dx if width > x0 else 0
        lines = (height - y0 + dy - 1) // dy if height > y0 else 0
        if columns and lines:
            rows += (b"\0" + b"\x80" * columns) * lines
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# -- lossless ------------------------------------------------------------------------------------


def test_jpeg_pages_embed_the_file_byte_for_byte(images):
    files = [
        images("a.jpg", seed=1),
        images("b.jpg", seed=2, progressive=True),
        images("c.jpg", mode="L", seed=3),
    ]
    with pack_images(files) as result:
        (pdf,) = result.pdfs
        assert [page.sources for page in pdf.pages] == [(str(path),) for path in files]
        for (_, image), path in zip(xobjects(pdf.path), files, strict=True):
            assert image["/Filter"] == "/DCTDecode"
            assert image._data == path.read_bytes()


@pytest.mark.parametrize(
    ("mode", "colours"),
    [("RGB", 3), ("L", 1), ("1", 1), ("P", 1)],
)
def test_png_data_is_copied_not_reencoded(images, mode, colours):
    path = images("page.png", mode=mode, plain=mode in ("1", "P"))
    with pack_images([path]) as result:
        ((_, image),) = xobjects(result.pdfs[0].path)
        assert image["/Filter"] == "/FlateDecode"
        assert image._data == png_idat(path.read_bytes())  # the file's compressed bytes, not new ones
        assert image["/DecodeParms"]["/Predictor"] == 15
        assert image["/DecodeParms"]["/Colors"] == colours


def test_png_with_an_icc_profile_is_copied_with_it(images):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = images("icc.png", icc_profile=srgb)
    with pack_images([path]) as result:
        ((_, image),) = xobjects(result.pdfs[0].path)
        assert image._data == png_idat(path.read_bytes())
        assert image["/ColorSpace"][0] == "/ICCBased"


def test_pages_map_one_point_to_one_pixel_whatever_dpi_the_file_claims(images):
    files = [images("a.jpg", (400, 300), dpi=(300, 300)), images("b.png", (1000, 750), dpi=(600, 600))]
    with pack_images(files) as result:
        (pdf,) = result.pdfs
        for (page, image), packed in zip(xobjects(pdf.path), pdf.pages, strict=True):
            assert [float(value) for value in page.mediabox] == [0, 0, packed.width, packed.height]
            assert (image["/Width"], image["/Height"]) == (packed.width, packed.height)
            assert "/Rotate" not in page and "/UserUnit" not in page
        assert [(page.width, page.height) for page in pdf.pages] == [(400, 300), (1000, 750)]


def test_the_page_map_turns_reported_sizes_back_into_pixels(images):
    with pack_images([images("a.png", (800, 600))]) as result:
        page = result.pdfs[0].page(0)
        assert page.pixel_scale(800, 600) == (1.0, 1.0)
        assert page.pixel_scale(1600, 1200) == (0.5, 0.5)  # were Doc2X to render at 144 DPI
        assert page.agrees_with(1600, 1200) and not page.agrees_with(600, 800)
        with pytest.raises(KeyError):
            result.pdfs[0].page(1)


# -- grouping, splitting, duplicates -------------------------------------------------------------


def test_grouped_by_exact_pixel_size_without_a_tolerance(images):
    a, b, c, d = (
        images(f"{n}.png", size, seed=n)
        for n, size in enumerate([(400, 300), (800, 600), (400, 300), (401, 300)])
    )
    with pack_images([a, b, c, d], aspect_tolerance=0) as result:
        assert [[page.sources[0] for page in pdf.pages] for pdf in result.pdfs] == [
            [str(a), str(c)],
            [str(b)],
            [str(d)],
        ]


def test_grouped_by_aspect_ratio_within_the_tolerance(images):
    sizes = [(400, 300), (300, 400), (800, 600), (405, 300), (500, 300), (600, 800)]
    files = [images(f"{n}.png", size, seed=n) for n, size in enumerate(sizes)]
    with pack_images(files, aspect_tolerance=0.02) as result:
        groups = [[(page.width, page.height) for page in pdf.pages] for pdf in result.pdfs]
    assert groups == [[(400, 300), (800, 600), (405, 300)], [(300, 400), (600, 800)], [(500, 300)]]


def test_pdf_max_pages_splits_a_group_in_input_order(images):
    files = [images(f"{n}.jpg", seed=n) for n in range(7)]
    with pack_images(files, pdf_max_pages=3) as result:
        assert [pdf.page_count for pdf in result.pdfs] == [3, 3, 1]
        assert [source for pdf in result.pdfs for source in pdf.sources] == [str(path) for path in files]
        assert all(
            [page.page_idx for page in pdf.pages] == list(range(pdf.page_count)) for pdf in result.pdfs
        )
        assert len(xobjects(result.pdfs[0].path)) == 3


def test_pdf_max_bytes_splits_a_group(images):
    files = [images(f"{n}.png", (200, 200), seed=n) for n in range(4)]
    one = files[0].stat().st_size
    with pack_images(files, pdf_max_bytes=2 * one + 100) as result:
        assert [pdf.page_count for pdf in result.pdfs] == [2, 2]


def test_the_same_content_twice_is_one_page_listing_every_source(images, tmp_path):
    first = images("first.jpg", seed=7)
    other = images("other.jpg", seed=8)
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(first.read_bytes())
    named = PackImage(copy, source="s3://bucket/copy.jpg")
    with pack_images([first, other, named, first]) as result:
        (pdf,) = result.pdfs
        assert pdf.page_count == 2
        assert pdf.pages[0].sources == (str(first), "s3://bucket/copy.jpg", str(first))
        assert pdf.pages[0].sha256 == hashlib.sha256(first.read_bytes()).hexdigest()
        assert pdf.pages[1].sources == (str(other),)
        assert len(xobjects(pdf.path)) == 2


def test_the_order_is_deterministic(images):
    files = [images(f"{n}.png", size, seed=n) for n, size in enumerate([(300, 400), (400, 300), (300, 400)])]
    with pack_images(files) as first, pack_images(files) as second:
        assert [pdf.to_dict() for pdf in first.pdfs] == [pdf.to_dict() for pdf in second.pdfs]
        assert [pdf.path.read_bytes() for pdf in first.pdfs] == [pdf.path.read_bytes() for pdf in second.pdfs]


# -- bounded and private ---------------------------------------------------------------------------


def test_a_batch_is_packed_into_files_one_pdf_at_a_time(images):
    """PDFs go to files, each within its byte bound (bench/packing_memory.py prints the peak memory)."""
    files = [images(f"{n}.jpg", (600, 600), seed=n, quality=95) for n in range(24)]
    total = sum(path.stat().st_size for path in files)
    per_pdf = total // 12
    with pack_images(files, pdf_max_bytes=per_pdf) as result:
        assert len(result.pdfs) >= 12
        assert all(isinstance(pdf.path, Path) and pdf.path.stat().st_size == pdf.size for pdf in result.pdfs)
        assert sum(pdf.size for pdf in result.pdfs) > total  # the data went to files
        assert sorted(source for pdf in result.pdfs for source in pdf.sources) == sorted(map(str, files))


def test_temp_files_are_private_unpredictable_and_removed(images, tmp_path):
    files = [images(f"{n}.jpg", seed=n) for n in range(4)]
    with pack_images(files, pdf_max_pages=2, temp_dir=tmp_path) as result:
        directory = result.directory
        assert directory.parent == tmp_path and directory.name.startswith("doc2x-pack-")
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert directory.stat().st_uid == os.getuid()
        for pdf in result.pdfs:
            assert pdf.path.parent == directory
            assert stat.S_IMODE(pdf.path.stat().st_mode) == 0o600
        with pack_images(files, pdf_max_pages=2, temp_dir=tmp_path) as again:
            assert {pdf.path.name for pdf in again.pdfs}.isdisjoint(pdf.path.name for pdf in result.pdfs)
        result.pdfs[0].remove()
        assert not result.pdfs[0].path.exists() and result.pdfs[1].path.exists()
    assert not directory.exists()


def open_files() -> set[str]:
    """What this process holds open (the descriptor that listed them is closed by then)."""
    held = set()
    for descriptor in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            held.add(os.readlink(f"/proc/self/fd/{descriptor}"))
    return held


@pytest.mark.parametrize(
    ("owner", "step", "error"),
    [
        (img2pdf, "convert_to_docobject", MemoryError("the PDF's images do not fit")),
        (img2pdf.pdfdoc, "tostream", OSError(28, "No space left on device")),
    ],
    ids=["the document cannot be made", "the PDF's file cannot be written"],
)
def test_a_failure_while_packing_leaves_no_files(images, tmp_path, monkeypatch, owner, step, error):
    def broken(*args, **kwargs):
        raise error

    before = open_files()
    monkeypatch.setattr(owner, step, broken)
    with pytest.raises(type(error)):
        pack_images([images("a.jpg")], temp_dir=tmp_path)
    assert list(tmp_path.glob("doc2x-pack-*")) == []
    assert open_files() - before == set()  # no descriptor left open on a deleted PDF either


# -- what goes through the image lane instead -------------------------------------------------------


def exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    noise((40, 30)).save(path, "JPEG", exif=exif)


def palette_with_icc(path: Path) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("P", (40, 30)).save(path, "PNG", icc_profile=srgb)


def animated(path: Path) -> None:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue")]
    frames[0].save(path, "PNG", save_all=True, append_images=frames[1:])


def multi_picture(path: Path) -> None:
    frames = [noise((40, 30), seed) for seed in (1, 2)]
    frames[0].save(path, "MPO", save_all=True, append_images=frames[1:])


#: name, how to write it, the reason's words, whether img2pdf itself would re-encode it.
UNPACKABLE = [
    ("alpha.png", lambda p: noise((40, 30), mode="RGBA").save(p), "alpha channel", True),
    ("grey-alpha.png", lambda p: noise((40, 30), mode="LA").save(p), "alpha channel", True),
    ("trns.png", lambda p: Image.new("RGB", (40, 30)).save(p, transparency=(0, 0, 0)), "tRNS", True),
    ("palette-trns.png", lambda p: Image.new("P", (40, 30)).save(p, transparency=0), "tRNS", True),
    ("interlaced.png", lambda p: p.write_bytes(interlaced_png()), "interlaced", True),
    ("palette-icc.png", palette_with_icc, "ICC profile", True),
    ("deep.png", lambda p: Image.new("I;16", (40, 30)).save(p), "16 bits", False),
    ("animated.png", animated, "animated", False),
    ("cmyk.jpg", lambda p: noise((40, 30), mode="CMYK").save(p, "JPEG"), "CMYK", False),
    ("rotated.jpg", exif_rotated, "EXIF orientation is 6", False),
    ("camera.mpo", multi_picture, "MPO", False),
    ("notes.png", lambda p: p.write_text("not an image"), "not a JPEG or PNG", False),
    ("gif.png", lambda p: Image.new("P", (4, 4)).save(p, "GIF"), "not a JPEG or PNG", False),
    ("truncated.png", lambda p: p.write_bytes(chunk_truncated_png()), "img2pdf cannot read it", False),
    ("huge.png", lambda p: Image.new("1", (14401, 2)).save(p), "over PDF's page limit", False),
]


def chunk_truncated_png() -> bytes:
    buffer = io.BytesIO()
    noise((40, 30)).save(buffer, "PNG")
    return buffer.getvalue()[:-40]


@pytest.mark.parametrize(
    ("name", "write", "reason", "reencoded"), UNPACKABLE, ids=[case[0] for case in UNPACKABLE]
)
def test_images_img2pdf_cannot_take_as_they_are_go_to_the_image_lane(
    tmp_path, images, name, write, reason, reencoded
):
    path = tmp_path / name
    write(path)
    good = images("good.jpg")
    with pack_images([path, good]) as result:
        ((refused,),) = [[item for item in result.unpackable]]
        assert refused.sources == (str(path),) and refused.path == path
        assert reason in refused.reason
        assert [pdf.sources for pdf in result.pdfs] == [(str(good),)]
    if reencoded:  # the rule is img2pdf's: left to it, the image would not be copied
        ((_, _, _, data, soft_mask, *_),) = img2pdf.read_images(
            path.read_bytes(), None, rot=img2pdf.Rotation.none
        )
        assert data != png_idat(path.read_bytes()) or soft_mask is not None


def test_duplicates_of_an_unpackable_image_are_listed_together(tmp_path):
    path, copy = tmp_path / "a.png", tmp_path / "b.png"
    noise((40, 30), mode="RGBA").save(path)
    copy.write_bytes(path.read_bytes())
    with pack_images([path, copy]) as result:
        assert result.pdfs == []
        assert [item.sources for item in result.unpackable] == [(str(path), str(copy))]


def test_a_missing_file_is_unpackable_not_an_error(tmp_path, images):
    with pack_images([tmp_path / "missing.jpg", images("a.jpg")]) as result:
        assert "cannot be read" in result.unpackable[0].reason
        assert result.page_count == 1


def test_content_that_changed_after_it_was_hashed_is_not_packed(images):
    path = images("a.jpg")
    stale = PackImage(path, "a.jpg", sha256="0" * 64)
    with pack_images([stale]) as result:
        assert result.pdfs == []
        assert "changed while it was being packed" in result.unpackable[0].reason


@pytest.mark.parametrize(
    "refused",
    [lambda p: noise((40, 30), mode="CMYK").save(p, "JPEG"), exif_rotated],
    ids=["CMYK", "EXIF-rotated"],
)
def test_a_header_read_apart_from_the_hash_is_read_again_when_packed(tmp_path, refused):
    """A file that is A when hashed, B (packable) when planned, A again when packed: A's rules decide."""
    path = tmp_path / "flip.jpg"
    refused(path)
    a = path.read_bytes()
    planned_as = PackImage(path, "flip.jpg", sha256=hashlib.sha256(a).hexdigest())
    noise((40, 30)).save(path, "JPEG")
    plans, _ = packing.plan_pdfs([planned_as])
    path.write_bytes(a)
    with pack_images(plans[0]) as result:
        assert result.pdfs == [] and len(result.unpackable) == 1
        assert result.unpackable[0].reason.startswith(("it is a CMYK JPEG", "its EXIF orientation is 6"))


def test_a_plan_s_own_read_gives_the_hash_and_header_of_the_same_bytes(images):
    """Planned from one read, a PDF is packed without reading the header again, its bytes checked by hash."""
    path = images("a.jpg")
    plans, _ = packing.plan_pdfs([PackImage.of(path)])
    (planned,) = plans[0]
    assert planned.content is not None and planned.content.sha256 == planned.sha256
    assert planned.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    noise((40, 30), seed=9).save(path, "JPEG")  # changed after the plan: refused, never packed as planned
    with pack_images(plans[0]) as result:
        assert result.pdfs == [] and "changed while it was being packed" in result.unpackable[0].reason


@pytest.mark.parametrize(
    "body", [b"\xff\xd8\xff" + b"junk" * 40, "truncated"], ids=["JPEG magic, then junk", "a JPEG cut short"]
)
def test_a_corrupt_image_is_unpackable_with_its_reason_not_an_error(images, body):
    path = images("a.jpg")
    if body == "truncated":
        body = path.read_bytes()[:300]
    path.write_bytes(body)
    assert packing.read_content(path).header.refusal.startswith("its header cannot be read")
    with pack_images([path]) as result:
        assert result.pdfs == [] and result.unpackable[0].reason.startswith("its header cannot be read")


def test_the_header_rules_are_applied_to_the_bytes_packed_whatever_the_plan_carried(tmp_path):
    """A content given with its true sha256 and a header that lets it through is still refused by its bytes."""
    path = tmp_path / "cmyk.jpg"
    noise((40, 30), mode="CMYK").save(path, "JPEG")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    claimed = packing.ImageContent(digest, packing.ImageHeader("JPEG", 40, 30), path.stat().st_size)
    with pack_images([PackImage(path, "cmyk.jpg", digest, claimed)]) as result:
        assert result.pdfs == [] and result.unpackable[0].reason.startswith("it is a CMYK JPEG")


def test_a_case_the_header_rules_miss_is_caught_before_it_is_embedded(images, monkeypatch, caplog):
    """Should img2pdf start re-encoding an image the rules let through, it is refused, never packed so."""
    path = images("a.png")
    reading = img2pdf.read_images

    def reencoding(data, *args, **kwargs):
        color, dpi, kind, _, *rest = reading(data, *args, **kwargs)[0]
        return [(color, dpi, kind, zlib.compress(b"new pixels"), *rest)]

    monkeypatch.setattr(img2pdf, "read_images", reencoding)
    caplog.set_level(logging.INFO)
    with pack_images([path]) as result:
        assert result.pdfs == []
        assert "would not embed it unchanged" in result.unpackable[0].reason


def test_parameters_are_checked(images):
    for bad in (
        {"pdf_max_pages": 0},
        {"pdf_max_pages": 1001},
        {"pdf_max_bytes": 0},
        {"aspect_tolerance": -0.1},
    ):
        with pytest.raises(ValueError):
            pack_images([images("a.jpg")], **bad)
    assert packing.DEFAULT_PDF_MAX_PAGES * 5 == 1000  # five PDFs in flight hold pdfdeal's 1000 pages
