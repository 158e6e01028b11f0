"""The checks every reading of a document shares: the limits, the refusals, and how a file is opened.

:mod:`~airflow_provider_doc2x.documents.readers` inspects documents and
:mod:`~airflow_provider_doc2x.documents.convert` converts them; both read a file through the
functions here, so a file is refused the same way, with the same words, whichever reads it:

- :class:`DocumentLimits`: pages per document, bytes per PDF, pixels per page;
- the refusals (:func:`refuse`, :func:`corrupt`, :func:`too_many_pages`, :func:`check_pixels`),
  each a :class:`~airflow_provider_doc2x.exceptions.Doc2XInputError` that names the file, what is
  wrong (the figure and the limit) and what to do, with the connection's extra that raises a limit;
- a file opened (:func:`open_document`), its pages' pixel sizes read from its header
  (:func:`page_sizes`) before Pillow opens it (:func:`opened_image`), and what Pillow raises while
  decoding turned into a refusal (:func:`decoding`);
- a PDF's pages counted (:func:`count_pdf_pages`) by walking its page tree here rather than through
  pypdf's own flattening: each indirect object is visited once (a tree that loops, or reaches a
  node twice, is refused at the second visit), and the walk stops one page past ``max_pages``, so
  a hostile page tree costs at most that many pages of work.

Pillow, pillow-heif and pypdf are imported on first use, not when a DAG file is parsed.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, BinaryIO

from airflow_provider_doc2x.documents import headers
from airflow_provider_doc2x.documents.formats import HEIF, PDF, TIFF, describe
from airflow_provider_doc2x.exceptions import Doc2XInputError, printable

#: The connection's extras that raise each limit (named in the errors).
PAGES_EXTRA, BYTES_EXTRA, PIXELS_EXTRA = "document_max_pages", "document_max_bytes", "page_max_pixels"
#: What installs pillow-heif, the optional reader of HEIF/HEIC images.
HEIF_EXTRA = "pip install 'airflow-provider-doc2x[heif]'"
#: Nodes of a PDF page tree allowed per page before the tree is refused as malformed: a real tree
#: has fewer inner nodes than pages; this bounds a tree of empty ``/Pages`` nodes.
_PAGE_TREE_NODES_PER_PAGE = 4
#: Longest reason from a library quoted in an error (its words may hold bytes of the file).
REASON_CHARS = 200
#: Pillow's names of the formats, for ``Image.open(formats=...)``: a file opens as what it was sniffed as.
_PILLOW_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "tiff": "TIFF",
    "webp": "WEBP",
    "bmp": "BMP",
    "gif": "GIF",
    "heif": "HEIF",
}
#: What Pillow raises on a corrupt or cut file (it has no one base class for them).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, zlib.error)


@dataclass(frozen=True)
class DocumentLimits:
    """What one document may hold, checked before it is read further or sent.

    Each is raised through the Doc2X connection's extra named in the error it causes.
    """

    #: Pages per document (PDF pages, TIFF pages). The vendor's SDK (pdfdeal) caps a PDF at 1000
    #: pages and the service at 2000: the stricter.
    max_pages: int = 1000
    #: Bytes of a PDF. The vendor's error table says 300 MB, its preupload page 1 GB: the stricter.
    max_pdf_bytes: int = 300 * 1024**2
    #: Pixels of one page, checked before it is decoded: Pillow's own decompression-bomb threshold
    #: (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 million, 256 MB of pixels at 3 bytes per pixel). An
    #: A3 page scanned at 600 dpi (7016 x 9921, about 70 million) fits. Above twice Pillow's own
    #: setting Pillow refuses to open the image whatever this says: raise both together.
    max_page_pixels: int = 89_478_485

    def __post_init__(self) -> None:
        for name in ("max_pages", "max_pdf_bytes", "max_page_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DocumentLimits.{name} must be a positive whole number, got {value!r}")


#: The limits when the connection sets none (a frozen value, shared safely as a default).
DEFAULT_LIMITS = DocumentLimits()


def noun(fmt: str) -> str:
    """A format's name to start a sentence with: ``"PDF document"``, ``"TIFF image"``."""
    return describe(fmt).split(" ", 1)[1]


def byte_size(count: int) -> str:
    """Bytes in words: ``"314,572,800 bytes (300 MB)"``, the megabytes from 1 MB up."""
    megabytes = f" ({count / 1024**2:,.0f} MB)" if count >= 1024**2 else ""
    return f"{count:,} bytes{megabytes}"


def refuse(message: str, *, source: str, code: str | None = None) -> Doc2XInputError:
    """The error for a refused document (raise it): the message names the source and what to do."""
    return Doc2XInputError(message, source=source, code=code)


def corrupt(fmt: str, source: str, reason: object, *, truncated: bool = False) -> Doc2XInputError:
    """The error for a file that cannot be read as its format, with the reader's reason."""
    text = printable(reason)[:REASON_CHARS]
    state = "is truncated" if truncated else "is corrupt"
    advice = "copy or download it again" if truncated else "repair it or export it again from its source"
    code = "parse_pdf_invalid" if fmt == PDF else "parse_file_invalid"
    return refuse(f"{noun(fmt)} {source} {state} ({text}): {advice}", source=source, code=code)


@contextlib.contextmanager
def open_document(path: str | os.PathLike, source: str) -> Iterator[tuple[BinaryIO, int]]:
    """The file opened for reading, with its size; a file that cannot be opened, or is empty, is refused."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; the errors of open() alone are translated
    except OSError as error:
        raise refuse(
            f"File {source} cannot be read ({type(error).__name__}: {printable(error.strerror or error)}): "
            "check that it exists and that the worker may read it",
            source=source,
        ) from error
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise refuse(f"File {source} is empty: nothing to parse", source=source)
        yield handle, size


def page_sizes(
    handle: BinaryIO, fmt: str, size: int, *, source: str, limits: DocumentLimits
) -> tuple[tuple[int, int], ...]:
    """Every page's pixel size by the raster's header, each checked against the limits; none for HEIF.

    A TIFF's pages are counted up to the limit plus one: more is refused. Other rasters have one
    page (their first frame). Nothing is decoded.
    """
    cap = limits.max_pages
    try:
        if fmt == TIFF:
            walked = headers.tiff_pages(handle, size, max_pages=cap)
            if walked.more or len(walked.sizes) > cap:
                raise too_many_pages(fmt, source, limits, f"has more than {cap} pages")
            sizes = walked.sizes
        else:
            first = headers.raster_size(handle, fmt, size)
            sizes = () if first is None else (first,)
    except headers.HeaderError as error:
        raise corrupt(fmt, source, error.reason, truncated=error.truncated) from error
    for page, (width, height) in enumerate(sizes, start=1):
        check_pixels(fmt, source, width, height, limits, page=page if len(sizes) > 1 else None)
    return sizes


def too_many_pages(fmt: str, source: str, limits: DocumentLimits, claim: str) -> Doc2XInputError:
    """The error for a document over the page limit; ``claim`` says how many it has ("has 1,500 pages")."""
    cap = limits.max_pages
    return refuse(
        f"{noun(fmt)} {source} {claim}, over the limit of {cap} pages per document: split it into "
        f"documents of at most {cap} pages, or raise the limit with the Doc2X connection's extra {PAGES_EXTRA}",
        source=source,
        code="parse_page_limit_exceeded",
    )


def check_pixels(
    fmt: str, source: str, width: int, height: int, limits: DocumentLimits, *, page: int | None = None
) -> None:
    """Refuse a page with no pixels, or with more than the limit, before it is decoded."""
    subject = f"{noun(fmt)} {source}" if page is None else f"Page {page} of {noun(fmt)} {source}"
    if width <= 0 or height <= 0:
        where = "it" if page is None else f"page {page}"
        raise corrupt(fmt, source, f"{where} is {width}x{height} px: no pixels")
    pixels = width * height
    if pixels > limits.max_page_pixels:
        raise refuse(
            f"{subject} is {width}x{height} px ({pixels:,} pixels), over the limit of "
            f"{limits.max_page_pixels:,} pixels per page: scan or export it at a lower resolution, "
            f"or raise the limit with the Doc2X connection's extra {PIXELS_EXTRA}",
            source=source,
        )


@contextlib.contextmanager
def opened_image(handle: BinaryIO, fmt: str, source: str, limits: DocumentLimits) -> Iterator[Any]:
    """Pillow's lazy open of the file as ``fmt`` (headers read, no pixel), its size checked again.

    Pillow's own decompression-bomb check is turned into the same refusal as the limit's, and a
    file Pillow cannot open is refused as corrupt. A HEIF image needs pillow-heif (registered with
    Pillow on first use), named in the error when it is missing.
    """
    from PIL import Image  # imported on first use: a DAG file imports the operator at every parse

    if fmt == HEIF:
        _require_heif(source)
    handle.seek(0)
    with decoding(fmt, source, limits):
        image = Image.open(handle, formats=[_PILLOW_FORMATS[fmt]])
    with image:
        check_pixels(fmt, source, image.width, image.height, limits)
        yield image


@contextlib.contextmanager
def decoding(fmt: str, source: str, limits: DocumentLimits, *, page: int | None = None) -> Iterator[None]:
    """Turn what Pillow raises while reading ``source`` into a refusal naming it (and the page)."""
    from PIL import Image

    where = "" if page is None else f"page {page}: "
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise refuse(
            f"{noun(fmt)} {source} has more pixels than Pillow opens ({where}{printable(error)[:REASON_CHARS]}); "
            f"the limit is {limits.max_page_pixels:,} pixels per page: scan or export it at a lower "
            f"resolution, or raise the limit with the Doc2X connection's extra {PIXELS_EXTRA} together "
            "with PIL.Image.MAX_IMAGE_PIXELS on the workers",
            source=source,
        ) from error
    except IMAGE_ERRORS as error:
        truncated = "truncated" in str(error) or isinstance(error, EOFError)
        raise corrupt(fmt, source, f"{where}{type(error).__name__}: {error}", truncated=truncated) from error


@cache
def _register_heif() -> None:
    """pillow-heif's opener, registered with Pillow once per process (an ImportError is not cached)."""
    import pillow_heif

    pillow_heif.register_heif_opener()


def _require_heif(source: str) -> None:
    try:
        _register_heif()
    except ImportError as error:
        raise refuse(
            f"HEIF/HEIC image {source} needs pillow-heif, which is not installed: install it on the "
            f"workers with {HEIF_EXTRA}, or convert the image to PNG or JPEG first",
            source=source,
        ) from error


def count_pdf_pages(handle: BinaryIO, source: str, limits: DocumentLimits) -> int:
    """The pages of an open PDF, read by pypdf, its page tree walked here; refusals as the module's doc says."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    _check_cross_reference(handle, source)
    handle.seek(0)
    try:
        reader = PdfReader(handle, strict=False)
        if reader.is_encrypted:
            raise refuse(
                f"PDF document {source} is encrypted (password-protected): decrypt it first, for example "
                "with `qpdf --decrypt in.pdf out.pdf` (with --password=... if it needs one)",
                source=source,
            )
        return _walk_page_tree(reader, source, limits)
    except (PyPdfError, *IMAGE_ERRORS, TypeError, AttributeError, RecursionError) as error:
        raise corrupt(PDF, source, f"pypdf cannot read it: {type(error).__name__}: {error}") from error


#: Largest PDF whose broken cross-reference pypdf may rebuild: its rebuild reads the whole file
#: into memory, so a larger one is refused rather than costing the worker its size.
MAX_REBUILT_PDF_BYTES = 32 * 1024 * 1024
_STARTXREF = re.compile(rb"startxref\s+(\d+)\s+%%EOF")
_XREF_AT = re.compile(rb"\s*(?:xref|\d+\s+\d+\s+obj)")


def _check_cross_reference(handle: BinaryIO, source: str) -> None:
    """Refuse a large PDF whose last ``startxref`` does not point at a cross-reference.

    pypdf repairs such a file by reading all of it into memory (its ``_rebuild_xref_table``):
    harmless for a small file, a worker's memory for a large one. Readers accept a small one, so
    only a file over :data:`MAX_REBUILT_PDF_BYTES` is refused, with what to do.
    """
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    if size <= MAX_REBUILT_PDF_BYTES:
        return
    handle.seek(max(0, size - 1024))
    found = _STARTXREF.findall(handle.read())
    offset = int(found[-1]) if found else -1
    if 0 <= offset < size:
        handle.seek(offset)
        if _XREF_AT.match(handle.read(64)):
            return
    raise corrupt(
        PDF,
        source,
        f"its startxref does not point at its cross-reference table, and at {byte_size(size)} it is "
        "too large to rebuild in memory; qpdf in.pdf out.pdf repairs it",
    )


def _walk_page_tree(reader: Any, source: str, limits: DocumentLimits) -> int:
    """Count the leaves of the page tree: each indirect node once, at most ``max_pages + 1`` pages.

    A node reached a second time (a ``/Kids`` entry pointing back at an ancestor, or one page
    listed twice) makes the tree malformed, and it is refused at once. The walk holds at most
    :data:`_PAGE_TREE_NODES_PER_PAGE` nodes per allowed page, visited or waiting.
    """
    from pypdf.generic import ArrayObject, DictionaryObject, IndirectObject

    def resolved(value: Any) -> Any:
        return value.get_object() if isinstance(value, IndirectObject) else value

    catalog = resolved(reader.trailer.get("/Root"))
    if not isinstance(catalog, DictionaryObject) or "/Pages" not in catalog:
        raise corrupt(PDF, source, "it has no page tree (no /Pages in its catalog)")
    most_nodes = _PAGE_TREE_NODES_PER_PAGE * (limits.max_pages + 1)
    waiting: list[Any] = [catalog.raw_get("/Pages")]
    visited: set[tuple[int, int]] = set()
    pages = nodes = 0
    while waiting:
        item = waiting.pop()
        if isinstance(item, IndirectObject):
            reference = (item.idnum, item.generation)
            if reference in visited:
                raise corrupt(
                    PDF,
                    source,
                    f"its page tree reaches object {reference[0]} {reference[1]} R twice: "
                    "it loops, or lists a node twice",
                )
            visited.add(reference)
        node = resolved(item)
        if not isinstance(node, DictionaryObject):
            raise corrupt(PDF, source, f"its page tree holds {type(node).__name__} where a page belongs")
        if nodes == 0:
            claimed = resolved(node.get("/Count"))
            if isinstance(claimed, int) and claimed > limits.max_pages:
                raise too_many_pages(
                    PDF, source, limits, f"claims {claimed:,} pages (its page tree's /Count)"
                )
        nodes += 1
        kind = resolved(node.get("/Type"))
        if kind == "/Pages" or (kind is None and "/Kids" in node):
            kids = resolved(node.get("/Kids"))
            if not isinstance(kids, ArrayObject):
                raise corrupt(PDF, source, "a node of its page tree has no /Kids array")
            if nodes + len(waiting) + len(kids) > most_nodes:
                claim = f"has a page tree of more than {most_nodes:,} entries"
                raise too_many_pages(PDF, source, limits, claim)
            waiting.extend(reversed(kids))
        else:
            pages += 1
            if pages > limits.max_pages:
                raise too_many_pages(PDF, source, limits, f"has more than {limits.max_pages} pages")
    if pages == 0:
        raise refuse(f"PDF document {source} has no pages: nothing to parse", source=source)
    return pages
