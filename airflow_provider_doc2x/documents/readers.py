"""What a document holds, checked against the limits before anything is sent: :func:`inspect_file`.

:func:`inspect_file` answers what a file holds (:class:`Inspection`) or refuses it with a
:class:`~airflow_provider_doc2x.exceptions.Doc2XInputError` that names the file, what is wrong
(the figure and the limit) and what to do. It decodes no pixel and renders no page:

- **PDF**: its size, then its tail (``%%EOF``: a cut file is refused), encryption (refused: decrypt
  it first), and its pages, counted by walking the page tree once, visiting each node at most
  once and stopping one page past the limit (:func:`~airflow_provider_doc2x.documents.checks.count_pdf_pages`).
- **Rasters**: the pixel size of every page (each TIFF page, the first frame of the others) from
  the header (:mod:`~airflow_provider_doc2x.documents.headers`) before Pillow opens the file, then
  Pillow's lazy open (headers only) for the mode and the frames. A TIFF's pages are counted up to
  ``max_pages + 1``; a JPEG, PNG or WebP must be whole (these may be sent as they are). A cut GIF,
  BMP, TIFF or HEIF is caught when :func:`to_png` or :func:`document_pdf` decodes it, which they
  always do before a byte of it is sent.

This module is the face of the subpackage: the limits (:class:`DocumentLimits`) and the
conversions (:func:`to_png`, :func:`document_pdf`, from
:mod:`~airflow_provider_doc2x.documents.convert`) are importable from it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, BinaryIO

from airflow_provider_doc2x.documents.checks import (
    BYTES_EXTRA,
    DEFAULT_LIMITS,
    IMAGE_ERRORS,
    DocumentLimits,
    byte_size,
    check_pixels,
    corrupt,
    count_pdf_pages,
    open_document,
    opened_image,
    page_sizes,
    refuse,
)
from airflow_provider_doc2x.documents.convert import document_pdf, to_png
from airflow_provider_doc2x.documents.formats import (
    FORMATS,
    HEAD_BYTES,
    PDF,
    TIFF,
    describe,
    describe_content,
    sniff,
)

__all__ = [
    "DEFAULT_LIMITS",
    "DocumentLimits",
    "Inspection",
    "check_head_pixels",
    "document_pdf",
    "inspect_file",
    "to_png",
]

#: Adobe's readers need ``%%EOF`` only within the last 1024 bytes (PDF reference, note 18).
_PDF_TAIL_BYTES = 1024


@dataclass(frozen=True)
class Inspection:
    """What a document holds, read from its headers and structure."""

    #: One of the format names of :mod:`~airflow_provider_doc2x.documents.formats`.
    format: str
    #: PDF pages, TIFF pages (every one counted, up to the limit), 1 for other rasters.
    pages: int
    #: The first page's pixels (0 for a PDF, whose pages are not rendered here).
    width: int
    height: int
    #: Frames of an animation (GIF, WebP, APNG) or of a multi-image file (MPO, HEIF); only the
    #: first is parsed. 1 otherwise: a TIFF's frames are its pages.
    frames: int = 1
    #: Pillow's mode of the first frame ("" for a PDF).
    mode: str = ""


def inspect_file(
    path: str | os.PathLike, fmt: str, *, source: str, limits: DocumentLimits = DEFAULT_LIMITS
) -> Inspection:
    """What the document at ``path`` holds, or a ``Doc2XInputError`` naming ``source`` if it is refused.

    ``fmt`` is the format :func:`~airflow_provider_doc2x.documents.formats.sniff` told from the
    file's first bytes; it is told again here and a file that is not what it was said to be is
    refused. No pixel is decoded and no page rendered: see the module's doc for what is checked.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    with open_document(path, source) as (handle, size):
        head = handle.read(HEAD_BYTES)
        if sniff(head) != fmt:
            raise refuse(
                f"File {source} is not {describe(fmt)} by its content (it looks like {describe_content(head)}): "
                "check that it is the file meant, and convert it to PDF, PNG or JPEG first",
                source=source,
                code="parse_file_invalid",
            )
        if fmt == PDF:
            return _inspect_pdf(handle, size, source, limits)
        sizes = page_sizes(handle, fmt, size, source=source, limits=limits)
        with opened_image(handle, fmt, source, limits) as image:
            frames = 1 if fmt == TIFF else _frames(image, fmt, source)
            width, height = sizes[0] if sizes else image.size
            return Inspection(fmt, len(sizes) or 1, width, height, frames, image.mode)


def _frames(image: Any, fmt: str, source: str) -> int:
    """Frames of an animation or multi-image file (only the first is parsed); counting reads no pixel."""
    try:
        return int(getattr(image, "n_frames", 1))
    except IMAGE_ERRORS as error:
        raise corrupt(
            fmt, source, f"its frames cannot be counted ({type(error).__name__}: {error})"
        ) from error


def _inspect_pdf(handle: BinaryIO, size: int, source: str, limits: DocumentLimits) -> Inspection:
    if size > limits.max_pdf_bytes:
        raise refuse(
            f"PDF document {source} is {byte_size(size)}, over the limit of "
            f"{byte_size(limits.max_pdf_bytes)}: split it into "
            f"smaller PDFs, or raise the limit with the Doc2X connection's extra {BYTES_EXTRA}",
            source=source,
            code="parse_file_too_large",
        )
    handle.seek(max(0, size - _PDF_TAIL_BYTES))
    if b"%%EOF" not in handle.read():
        raise corrupt(PDF, source, "no %%EOF marker in its last 1024 bytes: the file was cut", truncated=True)
    return Inspection(PDF, count_pdf_pages(handle, source, limits), 0, 0)


def check_head_pixels(head: bytes, fmt: str, *, source: str, limits: DocumentLimits = DEFAULT_LIMITS) -> None:
    """Refuse a PNG whose header (in its first bytes) claims more pixels than a page may have.

    For an image in object storage that is sent as it is: its first bytes are all that is read
    before its turn comes. A PNG's size is in its first 24 bytes; a JPEG's frame header may lie
    past any fixed head (behind its EXIF data), so a JPEG is left to the service.
    """
    if fmt != "png" or len(head) < 24 or head[12:16] != b"IHDR":
        return
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    check_pixels(fmt, source, width, height, limits)
