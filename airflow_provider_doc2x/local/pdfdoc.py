"""Reading the pages of an uploaded PDF as the engine parses them, for the local server's PDF API.

PDFs come in two kinds: the bulk lane's, where img2pdf packed one image per page, and documents as
users have them: scans (one image per page, often with an invisible OCR text layer), born-digital
files (a text layer, maybe small pictures), multi-page TIFFs packed by img2pdf. A page is read as
**one image or its text layer**, by this rule:

- the page's image is its largest image XObject (by pixels), among those of its own resources;
- a page that shows text (text drawn in a visible render mode, not 3 or 7) is read as its text
  layer (``page.extract_text()``, stripped), whatever images it holds: a born-digital page, whose
  pictures are a logo, a background or figures beside the text. Its Markdown is that text, with
  no engine in between (see :meth:`~airflow_provider_doc2x.local.pdf_tasks.PdfTasks.read_page`);
- a page with an image and no text, or only invisible text, is read as that image: a page of the
  bulk lane, a scan, a scan with an OCR layer (OCR tools draw their text invisible over the image:
  the service parses what the page shows, and the image is it);
- a page with invisible text and no image is read as its text;
- a page with neither is a blank page.

An image is handed to the engine as:

- a ``/DCTDecode`` image: its stream's bytes, the original JPEG, comment included, so the
  ``simple`` engine still finds the text embedded in it;
- a ``/FlateDecode`` image with PNG predictors (how img2pdf embeds a PNG, and most writers a
  lossless image), in grey, RGB or indexed colour at any bit depth: the PNG whose image data the
  stream is, put back behind a PNG header (see :func:`_png_of_predicted_flate`);
- any other image (``/CCITTFaxDecode`` from a G3/G4 TIFF, Flate without predictors, JPEG 2000,
  CMYK, ...): a PNG rebuilt from the pixels pypdf decodes (CMYK turned to RGB).

A PNG's text chunk does not survive img2pdf, so the ``simple`` engine answers its fallback line
for a PNG page, ``Image WxH (PNG), pixels sha256 HASH`` (see
:func:`~airflow_provider_doc2x.local.engines.fallback_text`).

A page's size is its image's, in pixels; a text or blank page's is its media box in points, as
displayed (width and height swapped for a page turned by a quarter). The page's content hash, the key
of the PDF billing counters, is the sha256 of the JPEG bytes for a JPEG page (the key the image API
bills the same JPEG under), else of the page's RGB pixels for another image
(:func:`~airflow_provider_doc2x.local.engines.pixels_sha256`), else of its text (UTF-8) for a text
page, else (blank page) of nothing.

A page whose image or content does not decode raises :class:`PdfUnreadable`: the task fails with
``parse_file_invalid``, the service's code for a file it cannot read. A text layer that cannot be
read beside an image is skipped, and the image read.

Images inside form XObjects and inline images are not looked for: a page that holds its picture
only there is read as its text, or as a blank page.
"""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import zlib
from dataclasses import dataclass
from functools import cache
from typing import Any

from airflow_provider_doc2x.local.engines import pixels_sha256

#: A PDF's header must start within its first 1024 bytes (PDF 1.7, annex H).
HEADER_WINDOW = 1024
JPEG_MAGIC = b"\xff\xd8\xff"
#: Text render modes that draw nothing (PDF 32000-1, 9.3.6): 3 invisible, 7 clipping only.
INVISIBLE_TEXT_MODES = frozenset({3, 7})
#: Operators that show text (PDF 32000-1, 9.4.3).
SHOW_TEXT_OPERATORS = frozenset({b"Tj", b"TJ", b"'", b'"'})
#: Image modes a PNG stores as they are; any other (CMYK, ...) is turned to RGB first.
PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})


class PdfUnreadable(Exception):
    """The file says it is a PDF but cannot be read: malformed, encrypted, or a page without sense."""


def looks_like_pdf(body: bytes) -> bool:
    """Whether the bytes carry a PDF header (``%PDF-``) where readers look for it."""
    return b"%PDF-" in body[:HEADER_WINDOW]


@cache
def _decode_errors() -> tuple[type[BaseException], ...]:
    """What pypdf and Pillow raise on bytes they cannot make sense of (a bad file, not a bug here)."""
    from PIL import Image
    from pypdf.errors import PyPdfError

    return (
        PyPdfError,
        Image.DecompressionBombError,
        OSError,
        ValueError,
        LookupError,
        TypeError,
        AttributeError,
        ArithmeticError,
        NotImplementedError,
        RecursionError,
        SyntaxError,  # Pillow's word for a broken PNG chunk
        struct.error,
        zlib.error,
    )


@dataclass(frozen=True)
class PageImage:
    """One PDF page, read back as the engine parses it: its image, or its text layer."""

    index: int
    #: What the engine reads: JPEG or PNG bytes; empty for a text page and a blank page.
    data: bytes
    #: ``"JPEG"``, ``"PNG"``, or ``""`` for a text page and a blank page.
    format: str
    width: int
    height: int
    #: The page's content hash (see the module's docstring).
    digest: str
    #: The page's text layer when the page is read as text, else ``""``.
    text: str = ""

    @property
    def blank(self) -> bool:
        """Whether the page holds no image to parse (a text page holds none either: see :attr:`text`)."""
        return not self.data


class PdfDocument:
    """An uploaded PDF, open for reading its pages from several threads in turn.

    Args:
        body: the PDF's bytes.

    Raises:
        PdfUnreadable: the PDF cannot be opened, is encrypted, or has no page.
    """

    def __init__(self, body: bytes) -> None:
        """Open the PDF and count its pages."""
        from pypdf import PdfReader

        self._lock = threading.Lock()
        try:
            self._reader = PdfReader(io.BytesIO(body))
            if self._reader.is_encrypted:
                raise PdfUnreadable("the PDF is encrypted")
            self.page_count = len(self._reader.pages)
        except _decode_errors() as error:
            raise PdfUnreadable(f"the PDF cannot be read: {error}") from error
        if self.page_count == 0:
            raise PdfUnreadable("the PDF has no page")

    def page(self, index: int) -> PageImage:
        """Read page ``index`` (from 0) as the engine parses it. Blocking: run it in a thread.

        Raises:
            PdfUnreadable: the page, or the image it is read as, cannot be decoded.
        """
        with self._lock:  # pypdf reads one stream: one page at a time
            try:
                return self._read_page(index)
            except PdfUnreadable:
                raise
            except _decode_errors() as error:
                raise PdfUnreadable(f"page {index} cannot be read: {error}") from error

    def _read_page(self, index: int) -> PageImage:
        page = self._reader.pages[index]
        images = _image_xobjects(page)
        largest = max(images, key=lambda item: _pixels(item[1])) if images else None
        try:
            text, shows_text = _text_layer(page)
        except _decode_errors():
            if largest is None:
                raise
            text, shows_text = "", False  # the image is what the page shows: read it
        if largest is not None and not shows_text:
            return _image_page(index, page, *largest)
        width, height = _displayed_size(page)
        return PageImage(index, b"", "", width, height, hashlib.sha256(text.encode()).hexdigest(), text)


def _pixels(xobject: Any) -> int:
    return int(xobject["/Width"]) * int(xobject["/Height"])


def _image_page(index: int, page: Any, name: str, xobject: Any) -> PageImage:
    """The page read as its image ``name``: a JPEG as embedded, any other image as a PNG of its pixels."""
    filters = xobject.get("/Filter")
    filters = list(filters) if isinstance(filters, list) else [filters]
    if filters and filters[-1] == "/DCTDecode":
        data = xobject.get_data()
        if data.startswith(JPEG_MAGIC):
            width, height = int(xobject["/Width"]), int(xobject["/Height"])
            return PageImage(index, data, "JPEG", width, height, hashlib.sha256(data).hexdigest())
    data = _png_of_predicted_flate(xobject)
    if data is not None:
        from PIL import Image

        picture = Image.open(io.BytesIO(data))
        picture.load()  # a stream that does not decode fails here, not in the engine
    else:
        picture = page.images[name].image
        if picture is None:
            raise PdfUnreadable(f"page {index}: its image {name} does not decode")
        if picture.mode not in PNG_MODES:
            picture = picture.convert("RGB")
        out = io.BytesIO()
        picture.save(out, format="PNG", compress_level=1)
        data = out.getvalue()
    width, height = picture.size
    return PageImage(index, data, "PNG", width, height, pixels_sha256(picture))


def _png_of_predicted_flate(xobject: Any) -> bytes | None:
    """The PNG file whose image data is this ``/FlateDecode`` stream with PNG predictors, or None.

    Such a stream is a PNG's ``IDAT`` data (what img2pdf copies from a PNG): put back behind a PNG
    header, Pillow decodes it at any bit depth. pypdf's own decoding of it is wrong below 8 bits
    per pixel (it takes the predictors' left neighbour as 0 bytes away, not 1). None when the
    image is another kind (other filters, no predictor, a ``/Decode`` array, a mask, a colour space
    a PNG cannot hold): pypdf decodes those.
    """
    filters = xobject.get("/Filter")
    parameters = xobject.get("/DecodeParms")
    if isinstance(filters, list):
        if len(filters) != 1:
            return None
        filters = filters[0]
        parameters = parameters[0] if isinstance(parameters, list) and parameters else parameters
    if filters != "/FlateDecode" or parameters is None:
        return None
    parameters = parameters.get_object()
    width, height = int(xobject["/Width"]), int(xobject["/Height"])
    bits = int(xobject.get("/BitsPerComponent", 8))
    if (
        int(parameters.get("/Predictor", 1)) < 10
        or int(parameters.get("/Columns", 1)) != width
        or int(parameters.get("/BitsPerComponent", 8)) != bits
        or any(key in xobject for key in ("/Decode", "/SMask", "/Mask", "/ImageMask"))
    ):
        return None
    colour = _png_colour(xobject.get("/ColorSpace"), int(parameters.get("/Colors", 1)), bits)
    if colour is None:
        return None
    colour_type, palette = colour
    header = struct.pack(">IIBBBBB", width, height, bits, colour_type, 0, 0, 0)
    stored = xobject._data  # the stream as stored, before any filter: pypdf has no public name for it
    chunks = [(b"IHDR", header), (b"PLTE", palette), (b"IDAT", stored), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in chunks
        if body or kind in (b"IDAT", b"IEND")
    )


def _png_colour(space: Any, colours: int, bits: int) -> tuple[int, bytes] | None:
    """The PNG colour type (and palette) of a PDF colour space, or None when a PNG cannot hold it."""
    space = space.get_object() if space is not None else None
    if isinstance(space, list) and space and space[0] == "/ICCBased":
        components = int(space[1].get_object().get("/N", 0))
        space = {1: "/DeviceGray", 3: "/DeviceRGB"}.get(components)
    if space == "/DeviceGray" and colours == 1 and bits in (1, 2, 4, 8, 16):
        return 0, b""
    if space == "/DeviceRGB" and colours == 3 and bits in (8, 16):
        return 2, b""
    if isinstance(space, list) and len(space) == 4 and space[0] == "/Indexed" and colours == 1:
        base = space[1].get_object()
        if isinstance(base, list) and base and base[0] == "/ICCBased":
            base = "/DeviceRGB" if int(base[1].get_object().get("/N", 0)) == 3 else None
        lookup = _string_bytes(space[3].get_object())
        entries = int(space[2]) + 1
        if (
            base == "/DeviceRGB"
            and bits in (1, 2, 4, 8)
            and 0 < entries <= 256
            and len(lookup) >= 3 * entries
        ):
            return 3, lookup[: 3 * entries]
    return None


def _text_layer(page: Any) -> tuple[str, bool]:
    """The page's text, stripped, and whether any of it is drawn visible (see the module's docstring).

    The render mode (``Tr``) is followed through the content stream as the graphics state keeps it
    (saved by ``q``, restored by ``Q``), into the forms the page draws.
    """
    mode, saved, shows = 0, [], False

    def follow(operator: bytes, operands: Any, _matrix: Any, _text_matrix: Any) -> None:
        nonlocal mode, shows
        if operator == b"q":
            saved.append(mode)
        elif operator == b"Q":
            mode = saved.pop() if saved else 0
        elif operator == b"Tr" and operands:
            mode = int(operands[0])
        elif operator in SHOW_TEXT_OPERATORS and mode not in INVISIBLE_TEXT_MODES:
            shows = True

    text = page.extract_text(visitor_operand_before=follow).strip()
    return text, shows and bool(text)


def _displayed_size(page: Any) -> tuple[int, int]:
    """The page's media box in points, as displayed (turned by its ``/Rotate``)."""
    box = page.mediabox
    width, height = round(float(box.width)), round(float(box.height))
    return (height, width) if page.rotation % 180 == 90 else (width, height)


def _image_xobjects(page: Any) -> list[tuple[str, Any]]:
    """The page's image XObjects (those of its own resources), by name."""
    resources = page.get("/Resources")
    resources = resources.get_object() if resources is not None else {}
    xobjects = resources.get("/XObject")
    if xobjects is None:
        return []
    found = []
    for name, reference in xobjects.get_object().items():
        xobject = reference.get_object()
        if xobject.get("/Subtype") == "/Image":
            found.append((str(name), xobject))
    return found


def _string_bytes(value: Any) -> bytes:
    """The bytes of a PDF string or stream (an indexed colour space's lookup table)."""
    if hasattr(value, "get_data"):
        return bytes(value.get_data())
    if isinstance(value, str):  # a text string: pypdf keeps the bytes it was read from
        return bytes(value.original_bytes)  # type: ignore[attr-defined]
    return bytes(value)
