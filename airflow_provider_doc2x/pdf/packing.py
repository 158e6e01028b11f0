"""Packing images into PDFs for Doc2X's PDF API (the bulk lane), losslessly.

Doc2X's image API takes 30 images per 30 s per key; for bulk work the vendor advises its PDF API,
with images of one aspect ratio packed into multi-page PDFs (one image = one page of quota either
way). This module does the packing and nothing else: no network, no Airflow.

What it promises:

- **Lossless.** A JPEG is embedded unchanged (the page's ``DCTDecode`` stream is the file, byte for
  byte); a PNG's compressed data (its ``IDAT`` chunks) is copied into a ``FlateDecode`` stream with
  PNG predictors, never decoded. The writer is ``img2pdf`` with its own PDF engine (its pikepdf
  engine would let qpdf recompress streams), never Pillow's PDF writer. Images that img2pdf would
  decode and re-encode, or refuse, are returned as :class:`Unpackable` with the reason: they go
  through the image lane instead. Before an image is packed, img2pdf's own reading of it is checked
  to embed exactly the file's bytes (JPEG) or its ``IDAT`` data (PNG) with no soft mask, so a case
  the rules below miss is caught and sent to the image lane, never re-encoded into a page.
- **Pages that map back to pixels.** Each page is as large in points as its image is in pixels
  (1 px = 1 pt, whatever DPI the file claims; img2pdf's fixed-DPI layout at 72 DPI), and carries
  no ``/Rotate``. What Doc2X reports as ``page_width``/``page_height`` for such a page is not
  documented (the facts' open question 5: the image's pixels, or a rendering at some DPI): callers
  map results back by ``page_idx`` through :attr:`PackedPdf.pages`, and
  :meth:`PackedPage.pixel_scale` turns reported sizes and coordinates back into the image's
  pixels whatever the service measures in; :meth:`PackedPage.agrees_with` checks the aspect ratio.
- **One page per content.** Images with the same sha256 become one page (billed once); the page
  map lists every source of that content.
- **Bounded memory and disk.** Headers are read to group images (Pillow's lazy open: no pixels
  decoded); an image's bytes are read when its PDF is written, one PDF at a time, and let go once
  it is written: ``pdf_max_bytes`` (image bytes per PDF) bounds the memory of a pack, whatever the
  size of the batch. Each PDF is written to a private temporary folder (mode 0700, files 0600,
  never a predictable path), removed by :meth:`PackResult.cleanup`.

Grouping: by exact pixel size, or (``aspect_tolerance`` > 0) by aspect ratio within that relative
tolerance. Groups come in the order of their first image; pages in input order within a group;
each group is cut into PDFs of at most ``pdf_max_pages`` pages and ``pdf_max_bytes`` bytes.
"""

from __future__ import annotations

import gc
import hashlib
import io
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from airflow_provider_doc2x.pdf.headers import (
    PNG_MAGIC,
    ImageContent,
    ImageHeader,
    header_of,
    read_content,
    read_header,
)

log = logging.getLogger(__name__)

#: Default pages per PDF. Far under the service's 2000 pages per file and pdfdeal's local cap of
#: 1000; five PDFs in flight (pdfdeal's default) then hold 1000 pages in progress, pdfdeal's bound;
#: a PDF of scanned pages finishes well inside the service's 15 minutes (``parse_timeout``); and a
#: PDF that fails as a whole (open question 6) costs at most 200 pages of work again.
DEFAULT_PDF_MAX_PAGES = 200
#: Largest ``pdf_max_pages`` accepted: pdfdeal's local cap (the service's is 2000).
MAX_PDF_PAGES = 1000
#: Default bytes of image data per PDF: bounds the memory img2pdf needs to assemble one PDF, and
#: keeps one upload short on a slow link (a PUT that fails is sent again whole).
DEFAULT_PDF_MAX_BYTES = 64 * 1024 * 1024
#: Default relative tolerance of the aspect-ratio grouping (0: group by exact pixel size).
DEFAULT_ASPECT_TOLERANCE = 0.02


@cache
def _img2pdf() -> Any:
    """img2pdf, imported when the first image is packed, not with the operator in a DAG file.

    Why: it loads pikepdf (tens of milliseconds, and a log line); most tasks never pack a PDF.
    """
    import img2pdf

    return img2pdf


@cache
def _layout() -> Any:
    """1 px = 1 pt: img2pdf's layout at a fixed 72 DPI, whatever the file claims."""
    return _img2pdf().get_fixed_dpi_layout_fun((72, 72))


@dataclass(frozen=True)
class PackImage:
    """One image to pack: a local file, the name it goes by, and (if known) its content.

    ``source`` names the image in the page map, logs and errors (a URI, or the path by default).
    The bytes read when the PDF is written are checked against a given ``sha256``, and the header
    rules are applied to those bytes. A given ``content`` (what
    :func:`~airflow_provider_doc2x.pdf.headers.read_content` read: sha256, header, size) spares
    reading the file's header again to group it.
    """

    path: Path
    source: str = ""
    sha256: str | None = None
    content: ImageContent | None = None

    @classmethod
    def of(cls, value: PackImage | str | os.PathLike) -> PackImage:
        """An image to pack from a path (named by its path), or as it is."""
        if isinstance(value, PackImage):
            return value
        return cls(Path(value), str(value))

    @property
    def name(self) -> str:
        """How the image is named: its source, or its path."""
        return self.source or str(self.path)


@dataclass(frozen=True)
class PackedPage:
    """One page of a packed PDF: the content on it, every source of that content, its pixel size.

    ``page_idx`` counts from 0, as Doc2X's ``page_idx`` does.
    """

    page_idx: int
    sha256: str
    sources: tuple[str, ...]
    width: int
    height: int

    def pixel_scale(self, page_width: float, page_height: float) -> tuple[float, float]:
        """Factors that turn Doc2X's page coordinates into the image's pixels: ``(x_scale, y_scale)``.

        Whatever unit Doc2X reports ``page_width``/``page_height`` in (open question 5), a
        coordinate ``x`` on the page is ``x * x_scale`` pixels of the image.
        """
        if page_width <= 0 or page_height <= 0:
            raise ValueError(f"page size {page_width}x{page_height} is not a size")
        return self.width / page_width, self.height / page_height

    def agrees_with(self, page_width: float, page_height: float, tolerance: float = 0.02) -> bool:
        """Whether a reported page size has this image's aspect ratio (the page map is not off by one)."""
        if page_width <= 0 or page_height <= 0:
            return False
        return abs((page_width / page_height) / (self.width / self.height) - 1) <= tolerance

    def to_dict(self) -> dict[str, Any]:
        """The page as JSON."""
        return {
            "page_idx": self.page_idx,
            "sha256": self.sha256,
            "sources": list(self.sources),
            "width": self.width,
            "height": self.height,
        }


@dataclass(frozen=True)
class PackedPdf:
    """A PDF written to a private temporary file, and its page map (``pages[i].page_idx == i``)."""

    path: Path
    size: int
    pages: tuple[PackedPage, ...]

    @property
    def page_count(self) -> int:
        """Pages in the PDF: what it bills and what it holds of the key's pages in progress."""
        return len(self.pages)

    @property
    def sources(self) -> tuple[str, ...]:
        """Every source on the PDF's pages, in page order."""
        return tuple(source for page in self.pages for source in page.sources)

    def page(self, page_idx: int) -> PackedPage:
        """The page Doc2X reports as ``page_idx``; ``KeyError`` for an index this PDF does not have."""
        if not 0 <= page_idx < len(self.pages):
            raise KeyError(page_idx)
        return self.pages[page_idx]

    def remove(self) -> None:
        """Delete the file (once it has been uploaded); the page map stays."""
        self.path.unlink(missing_ok=True)

    def to_dict(self) -> dict[str, Any]:
        """The PDF's page map as JSON (its path is local to this worker)."""
        return {"size": self.size, "pages": [page.to_dict() for page in self.pages]}


@dataclass(frozen=True)
class Unpackable:
    """Content that cannot be packed losslessly: send it through the image lane (``path``) instead."""

    path: Path
    sha256: str | None
    sources: tuple[str, ...]
    reason: str


@dataclass
class PackResult:
    """The PDFs of one pack, and what could not be packed.

    Use it as a context manager, or call :meth:`cleanup`: the temporary folder and every PDF in it
    are removed.
    """

    directory: Path
    pdfs: list[PackedPdf] = field(default_factory=list)
    unpackable: list[Unpackable] = field(default_factory=list)

    @property
    def page_count(self) -> int:
        """Pages in all the PDFs."""
        return sum(pdf.page_count for pdf in self.pdfs)

    def cleanup(self) -> None:
        """Remove the temporary folder and every PDF in it."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PackResult:
        """Return the result; it is cleaned up on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Remove the temporary files."""
        self.cleanup()


@dataclass
class _Content:
    """One distinct content of the input: its first file, its hash, header, and every source.

    ``read`` is set when the hash, header and size came from one read of the bytes (never when a
    given sha256 met a header read apart): a later pack of the plan groups by it without a read.
    """

    image: PackImage
    sha256: str
    header: ImageHeader
    sources: list[str]
    size: int
    read: ImageContent | None = None


def pack_images(
    images: Iterable[PackImage | str | os.PathLike],
    *,
    pdf_max_pages: int = DEFAULT_PDF_MAX_PAGES,
    pdf_max_bytes: int = DEFAULT_PDF_MAX_BYTES,
    aspect_tolerance: float = DEFAULT_ASPECT_TOLERANCE,
    temp_dir: str | os.PathLike | None = None,
) -> PackResult:
    """Pack images into PDFs, losslessly, one page per distinct content; see the module's doc.

    Args:
        images: local image files (paths, or :class:`PackImage` with a source name and sha256).
        pdf_max_pages: most pages in one PDF (1 to 1000).
        pdf_max_bytes: most bytes of image data in one PDF (an image larger than this alone gets a
            PDF of its own); bounds the memory of the pack.
        aspect_tolerance: 0 groups images by exact pixel size; above 0, by aspect ratio within this
            relative tolerance of the group's first image.
        temp_dir: where the private temporary folder is made (the system's temp folder by default).

    Returns:
        The PDFs, in order (groups in the order of their first image, input order within a group),
        and the content that goes through the image lane instead. The caller cleans it up.
    """
    if not 1 <= pdf_max_pages <= MAX_PDF_PAGES:
        raise ValueError(f"pdf_max_pages must be 1 to {MAX_PDF_PAGES}, got {pdf_max_pages}")
    if pdf_max_bytes < 1:
        raise ValueError(f"pdf_max_bytes must be positive, got {pdf_max_bytes}")
    if not 0 <= aspect_tolerance < 1:
        raise ValueError(f"aspect_tolerance must be in [0, 1), got {aspect_tolerance}")
    contents, unpackable = _distinct_contents([PackImage.of(image) for image in images])
    result = PackResult(Path(tempfile.mkdtemp(prefix="doc2x-pack-", dir=temp_dir)))
    result.unpackable.extend(unpackable)
    try:
        for group in _groups(contents, aspect_tolerance):
            for chunk in _chunks(group, pdf_max_pages, pdf_max_bytes):
                pdf = _write_pdf(chunk, result)
                if pdf is not None:
                    result.pdfs.append(pdf)
    except BaseException:
        result.cleanup()
        raise
    log.info(
        "Packed %d pages into %d PDFs; %d images go through the image lane",
        result.page_count,
        len(result.pdfs),
        len(result.unpackable),
    )
    return result


def plan_pdfs(
    images: Iterable[PackImage | str | os.PathLike],
    *,
    pdf_max_pages: int = DEFAULT_PDF_MAX_PAGES,
    pdf_max_bytes: int = DEFAULT_PDF_MAX_BYTES,
    aspect_tolerance: float = DEFAULT_ASPECT_TOLERANCE,
) -> tuple[list[list[PackImage]], list[Unpackable]]:
    """How :func:`pack_images` would cut these images into PDFs, from their headers, writing nothing.

    Returns each PDF's distinct contents (the first image of each, its ``sha256`` set), in the
    order :func:`pack_images` would write them, and the content its header rules refuse. A caller
    that submits a few PDFs at a time plans once, then packs each planned PDF's images when its
    turn comes (an image may still turn out unpackable then, when img2pdf reads it whole).
    """
    if not 1 <= pdf_max_pages <= MAX_PDF_PAGES:
        raise ValueError(f"pdf_max_pages must be 1 to {MAX_PDF_PAGES}, got {pdf_max_pages}")
    if not 0 <= aspect_tolerance < 1:
        raise ValueError(f"aspect_tolerance must be in [0, 1), got {aspect_tolerance}")
    contents, unpackable = _distinct_contents([PackImage.of(image) for image in images])
    plans = [
        [PackImage(item.image.path, item.image.name, item.sha256, item.read) for item in chunk]
        for group in _groups(contents, aspect_tolerance)
        for chunk in _chunks(group, pdf_max_pages, max(1, pdf_max_bytes))
    ]
    return plans, unpackable


def _distinct_contents(images: Sequence[PackImage]) -> tuple[list[_Content], list[Unpackable]]:
    """Headers and hashes of every image, duplicates folded into the first of their content."""
    by_hash: dict[str, _Content | Unpackable] = {}
    order: list[str] = []
    unreadable: list[Unpackable] = []
    for image in images:
        known = image.content if image.content is not None and image.content.sha256 == image.sha256 else None
        try:
            if known is None and image.sha256 is None:
                known = read_content(image.path)  # the hash and the header of the same bytes
            sha256 = known.sha256 if known is not None else image.sha256
            size = known.size if known is not None else os.path.getsize(image.path)
        except OSError as error:
            reason = f"it cannot be read ({type(error).__name__}: {error.strerror})"
            unreadable.append(Unpackable(image.path, image.sha256, (image.name,), reason))
            continue
        assert sha256 is not None
        seen = by_hash.get(sha256)
        if isinstance(seen, _Content):
            seen.sources.append(image.name)
            continue
        if isinstance(seen, Unpackable):
            by_hash[sha256] = Unpackable(seen.path, seen.sha256, (*seen.sources, image.name), seen.reason)
            continue
        header = known.header if known is not None else read_header(image.path)
        order.append(sha256)
        if header.refusal is not None:
            by_hash[sha256] = Unpackable(image.path, sha256, (image.name,), header.refusal)
        else:
            by_hash[sha256] = _Content(image, sha256, header, [image.name], size, known)
    contents = [item for sha in order if isinstance(item := by_hash[sha], _Content)]
    refused = [item for sha in order if isinstance(item := by_hash[sha], Unpackable)]
    return contents, unreadable + refused


def _groups(contents: Sequence[_Content], aspect_tolerance: float) -> list[list[_Content]]:
    """Contents by pixel size, or by aspect ratio near the first of each group; first-seen order."""
    groups: list[tuple[tuple[int, int] | float, list[_Content]]] = []
    for content in contents:
        header = content.header
        for key, members in groups:
            if aspect_tolerance == 0:
                same = key == (header.width, header.height)
            else:
                assert isinstance(key, float)
                same = abs(header.aspect / key - 1) <= aspect_tolerance
            if same:
                members.append(content)
                break
        else:
            key = (header.width, header.height) if aspect_tolerance == 0 else header.aspect
            groups.append((key, [content]))
    return [members for _, members in groups]


def _chunks(group: Sequence[_Content], max_pages: int, max_bytes: int) -> Iterator[list[_Content]]:
    chunk: list[_Content] = []
    size = 0
    for content in group:
        if chunk and (len(chunk) >= max_pages or size + content.size > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(content)
        size += content.size
    if chunk:
        yield chunk


def _write_pdf(chunk: Sequence[_Content], result: PackResult) -> PackedPdf | None:
    """Read the chunk's images one by one, check each embeds unchanged, and write their PDF."""
    streams: list[io.BytesIO] = []
    placed: list[_Content] = []
    for content in chunk:
        try:
            data = content.image.path.read_bytes()
        except OSError as error:
            reason = f"it cannot be read ({type(error).__name__}: {error.strerror})"
            result.unpackable.append(_unpackable(content, reason))
            continue
        refusal = _embedding_refusal(data, content)
        if refusal is not None:
            result.unpackable.append(_unpackable(content, refusal))
            continue
        streams.append(io.BytesIO(data))
        placed.append(content)
    if not placed:
        return None
    img2pdf = _img2pdf()
    document = img2pdf.convert_to_docobject(
        *streams,
        engine=img2pdf.Engine.internal,
        layout_fun=_layout(),
        rotation=img2pdf.Rotation.none,
        first_frame_only=True,
        nodate=True,
    )
    try:
        descriptor, name = tempfile.mkstemp(prefix="pack-", suffix=".pdf", dir=result.directory)
        path = Path(name)
        with os.fdopen(descriptor, "wb") as output:
            document.tostream(output)
    finally:
        _release(document)
    pages = tuple(
        PackedPage(index, item.sha256, tuple(item.sources), item.header.width, item.header.height)
        for index, item in enumerate(placed)
    )
    return PackedPdf(path, path.stat().st_size, pages)


def _release(document: Any) -> None:
    """Drop the image bytes of img2pdf's document, a reference cycle only a full collection frees.

    Left to the collector, PDF after PDF piles up; a full collection per PDF walks all of Airflow's
    heap (0.2 ms a page at 200 pages a PDF).
    """
    objects = getattr(getattr(document, "writer", None), "objects", None)
    if not isinstance(objects, list):  # not img2pdf's own engine as we know it: collect instead
        gc.collect()
        return
    for item in objects:
        item.stream = None
    objects.clear()


def _unpackable(content: _Content, reason: str) -> Unpackable:
    return Unpackable(content.image.path, content.sha256, tuple(content.sources), reason)


def _embedding_refusal(data: bytes, content: _Content) -> str | None:
    """Why img2pdf would not embed these bytes unchanged, or None when it would.

    The bytes must still be the content hashed at the start, and the header rules hold for these
    bytes themselves (whatever header the plan carried); then img2pdf's own reading of them must
    embed the file as it is (JPEG) or its ``IDAT`` data (PNG), with no soft mask, at the header's
    pixel size. Only images the header rules let through are read this way, and those img2pdf
    embeds without decoding their pixels.
    """
    if hashlib.sha256(data).hexdigest() != content.sha256:
        return "its content changed while it was being packed (its sha256 no longer matches)"
    header = header_of(io.BytesIO(data))
    if header.refusal is not None:
        return header.refusal
    if (header.format, header.width, header.height) != (
        content.header.format,
        content.header.width,
        content.header.height,
    ):
        return (
            f"its header says {header.format} {header.width}x{header.height} px, not what it was planned as"
        )
    try:
        img2pdf = _img2pdf()
        readings = img2pdf.read_images(data, None, first_frame_only=True, rot=img2pdf.Rotation.none)
    except Exception as error:  # img2pdf raises bare Exception for a broken PNG, among others
        return f"img2pdf cannot read it ({type(error).__name__}: {error})"
    if len(readings) != 1:
        return f"img2pdf reads it as {len(readings)} images"
    _, _, image_format, image_data, soft_mask, width, height, *_ = readings[0]
    expected = data if content.header.format == "JPEG" else _png_idat(data)
    if image_format.name != content.header.format or image_data != expected or soft_mask is not None:
        return "img2pdf would not embed it unchanged (it would decode and re-encode it)"
    if (width, height) != (content.header.width, content.header.height):
        return f"img2pdf reads it as {width}x{height} px, its header says otherwise"
    return None


def _png_idat(data: bytes) -> bytes:
    """A PNG's compressed pixel data: its ``IDAT`` chunks, joined."""
    parts = []
    position = len(PNG_MAGIC)
    while position + 8 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        if kind == b"IDAT":
            parts.append(data[position + 8 : position + 8 + length])
        elif kind == b"IEND":
            break
        position += 12 + length
    return b"".join(parts)
