"""Reading the pages of an uploaded PDF as images, for the local server's PDF API.

The bulk lane packs images losslessly with img2pdf: every page holds one image XObject, a JPEG
embedded unchanged (``/DCTDecode``) or a PNG's pixel data copied (``/FlateDecode``). A page is read
back as the image the engine then parses:

- a ``/DCTDecode`` image is its stream's bytes: the original JPEG, comment included, so the
  ``simple`` engine still finds the text embedded in it;
- any other image is rebuilt from its pixels as a PNG. A PNG's text chunk does not survive
  img2pdf, so the ``simple`` engine answers its fallback line for it,
  ``Image WxH (PNG), pixels sha256 HASH`` (see :func:`~airflow_provider_doc2x.local.engines.fallback_text`).

A page with several images is read as its largest (by pixels); a page with none is a blank page
(size: its media box, in points). The page's content hash, the key of the PDF billing counters,
is the sha256 of the JPEG bytes for a JPEG page (the key the image API bills the same JPEG under),
else of the page's RGB pixels (:func:`~airflow_provider_doc2x.local.engines.pixels_sha256`), else
(blank page) of nothing.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass
from typing import Any

from airflow_provider_doc2x.local.engines import pixels_sha256

#: A PDF's header must start within its first 1024 bytes (PDF 1.7, annex H).
HEADER_WINDOW = 1024
JPEG_MAGIC = b"\xff\xd8\xff"


class PdfUnreadable(Exception):
    """The file says it is a PDF but cannot be read: malformed, encrypted, or a page without sense."""


def looks_like_pdf(body: bytes) -> bool:
    """Whether the bytes carry a PDF header (``%PDF-``) where readers look for it."""
    return b"%PDF-" in body[:HEADER_WINDOW]


@dataclass(frozen=True)
class PageImage:
    """One PDF page, read back as the image it holds."""

    index: int
    #: What the engine reads: JPEG or PNG bytes; empty for a blank page.
    data: bytes
    #: ``"JPEG"``, ``"PNG"``, or ``""`` for a blank page.
    format: str
    width: int
    height: int
    #: The page's content hash (see the module's docstring).
    digest: str

    @property
    def blank(self) -> bool:
        """Whether the page holds no image."""
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
        from pypdf.errors import PyPdfError

        self._lock = threading.Lock()
        try:
            self._reader = PdfReader(io.BytesIO(body))
            if self._reader.is_encrypted:
                raise PdfUnreadable("the PDF is encrypted")
            self.page_count = len(self._reader.pages)
        except (PyPdfError, OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise PdfUnreadable(f"the PDF cannot be read: {error}") from error
        if self.page_count == 0:
            raise PdfUnreadable("the PDF has no page")

    def page(self, index: int) -> PageImage:
        """Read page ``index`` (from 0) back as its image. Blocking: run it in a thread.

        Raises:
            PdfUnreadable: the page or its image cannot be decoded.
        """
        from pypdf.errors import PyPdfError

        with self._lock:  # pypdf reads one stream: one page at a time
            try:
                return self._read_page(index)
            except PdfUnreadable:
                raise
            except (PyPdfError, OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise PdfUnreadable(f"page {index} cannot be read: {error}") from error

    def _read_page(self, index: int) -> PageImage:
        page = self._reader.pages[index]
        images = _image_xobjects(page)
        if not images:
            box = page.mediabox
            width, height = round(float(box.width)), round(float(box.height))
            return PageImage(index, b"", "", width, height, hashlib.sha256(b"").hexdigest())
        name, xobject = max(images, key=lambda item: int(item[1]["/Width"]) * int(item[1]["/Height"]))
        filters = xobject.get("/Filter")
        filters = list(filters) if isinstance(filters, list) else [filters]
        if filters and filters[-1] == "/DCTDecode":
            data = xobject.get_data()
            if data.startswith(JPEG_MAGIC):
                width, height = int(xobject["/Width"]), int(xobject["/Height"])
                return PageImage(index, data, "JPEG", width, height, hashlib.sha256(data).hexdigest())
        picture = page.images[name].image
        if picture is None:
            raise PdfUnreadable(f"page {index}: its image {name} does not decode")
        if picture.mode not in {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}:
            picture = picture.convert("RGB")
        out = io.BytesIO()
        picture.save(out, format="PNG", compress_level=1)
        return PageImage(index, out.getvalue(), "PNG", *picture.size, pixels_sha256(picture))


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
