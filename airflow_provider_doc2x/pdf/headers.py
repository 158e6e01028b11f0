"""What an image's header says about packing it into a PDF unchanged, read without decoding a pixel.

The rules that send an image through the image lane rather than into a PDF (a CMYK or EXIF-rotated
JPEG, a PNG with alpha, ...) are here; :mod:`~airflow_provider_doc2x.pdf.packing` applies them, and
checks img2pdf's own reading of each image's bytes when its PDF is written.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

#: Longest side, in pixels, of a packable image: at 1 px = 1 pt, PDF's page limit of 14400 pt
#: (200 inches); past it img2pdf scales the page with ``/UserUnit``, which many readers ignore.
MAX_SIDE_PIXELS = 14400

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Bytes :func:`read_content` reads at once: the first of them hold the header (a page the PDF lane
#: packs is at most 7 MB, read whole).
WHOLE_READ_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says: its format, pixel size, and why it cannot be packed (if so)."""

    format: str
    width: int
    height: int
    refusal: str | None = None

    @property
    def aspect(self) -> float:
        """Width over height."""
        return self.width / self.height


@dataclass(frozen=True)
class ImageContent:
    """An image's bytes as one read saw them: their sha256, what their header says, their size."""

    sha256: str
    header: ImageHeader
    size: int


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Read an image's format and pixel size from its header, and whether img2pdf can embed it as is.

    Nothing is decoded: Pillow's lazy open reads the header (a PNG's chunks before its pixel data,
    a JPEG's markers before its scan) and the PNG's ``IHDR`` is read directly. A file that is not a
    JPEG or PNG, or whose header cannot be read, comes back with a ``refusal`` and a zero size.
    """
    try:
        with open(path, "rb") as handle:
            return header_of(handle)
    except OSError as error:
        return ImageHeader("", 0, 0, f"it cannot be read ({type(error).__name__}: {error.strerror or error})")


def read_content(path: str | os.PathLike) -> ImageContent:
    """An image's sha256, header and size from one read of its bytes, so that all three are of the same bytes.

    Why: read apart, a file rewritten between the reads (A, then B, then A again) would pair A's
    hash with B's header. The header is read from the first ``WHOLE_READ_BYTES`` of the read (what
    the rules look at comes before the pixels); the rest is only hashed, a chunk at a time.

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as handle:
        first = handle.read(WHOLE_READ_BYTES)
        digest, size = hashlib.sha256(first), len(first)
        while chunk := handle.read(WHOLE_READ_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return ImageContent(digest.hexdigest(), header_of(io.BytesIO(first)), size)


def header_of(handle: BinaryIO) -> ImageHeader:
    """What the header of the image open in ``handle`` (at its start) says; see :func:`read_header`."""
    from PIL import Image  # imported on first use, as img2pdf is

    try:
        head = handle.read(64)
        if head.startswith(PNG_MAGIC):
            return _png_header(head, handle)
        if head.startswith(JPEG_MAGIC):
            return _jpeg_header(handle)
    except (Image.DecompressionBombError, SyntaxError, ValueError, struct.error, OSError) as error:
        # OSError: Pillow's for a file it cannot identify or that ends early (the handle is open).
        return ImageHeader("", 0, 0, f"its header cannot be read ({type(error).__name__}: {error})")
    return ImageHeader("", 0, 0, "it is not a JPEG or PNG")


def _png_header(head: bytes, handle: Any) -> ImageHeader:
    if head[12:16] != b"IHDR" or len(head) < 29:
        return ImageHeader("PNG", 0, 0, "its PNG header (IHDR) is missing")
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    from PIL import Image

    handle.seek(0)
    with Image.open(handle) as image:
        info = image.info
        frames = getattr(image, "n_frames", 1)
    refusal = None
    if interlace:
        refusal = "it is an interlaced PNG: img2pdf would decode and re-encode it"
    elif color_type in (4, 6):
        refusal = "it is a PNG with an alpha channel: img2pdf would re-encode it and compute a soft mask"
    elif "transparency" in info:
        refusal = (
            "it is a PNG with a transparent colour (tRNS): img2pdf would compute a soft mask from its pixels"
        )
    elif depth == 16:
        refusal = (
            "it is a PNG of 16 bits per sample: PDF 1.5 pixels in the PDF 1.3 file img2pdf writes, "
            "which a reader may refuse or reduce"
        )
    elif color_type == 3 and "icc_profile" in info:
        refusal = "it is a palette PNG with an ICC profile: img2pdf would convert it to RGB"
    elif frames > 1:
        refusal = "it is an animated PNG: only its first frame would be packed"
    return _sized(ImageHeader("PNG", width, height, refusal))


def _jpeg_header(handle: Any) -> ImageHeader:
    from PIL import Image

    handle.seek(0)
    with Image.open(handle) as image:
        kind, mode, (width, height) = image.format, image.mode, image.size
        orientation = image.getexif().get(0x0112) if kind in ("JPEG", "MPO") else None
    refusal = None
    if kind == "MPO":
        refusal = "it is a multi-picture JPEG (MPO): img2pdf would split it into frames"
    elif kind != "JPEG":
        refusal = f"Pillow reads it as {kind}, not JPEG"
    elif mode == "CMYK":
        refusal = (
            "it is a CMYK JPEG: embedded unchanged, its colours would depend on the reader honouring "
            "Adobe's inverted CMYK; Doc2X decodes the file itself in the image lane"
        )
    elif mode not in ("RGB", "L"):
        refusal = f"it is a JPEG in colour mode {mode}"
    elif orientation not in (None, 1):
        refusal = (
            f"its EXIF orientation is {orientation}: the page would have to be turned, and its size "
            "would no longer map to the file's pixels"
        )
    return _sized(ImageHeader("JPEG", width, height, refusal))


def _sized(header: ImageHeader) -> ImageHeader:
    if header.refusal is None and not (header.width > 0 and header.height > 0):
        return ImageHeader(header.format, header.width, header.height, "its header gives no pixel size")
    if header.refusal is None and max(header.width, header.height) > MAX_SIDE_PIXELS:
        return ImageHeader(
            header.format,
            header.width,
            header.height,
            f"it is {header.width}x{header.height} px, over PDF's page limit of {MAX_SIDE_PIXELS} pt at 1 px = 1 pt",
        )
    return header
