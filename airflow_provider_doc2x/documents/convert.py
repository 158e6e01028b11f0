"""Rasters Doc2X does not take, turned into what it takes: a lossless PNG, or a PDF of every page.

Doc2X's image API takes one JPEG or PNG of at most 7 MB; its PDF API takes PDFs. So a WebP, BMP,
GIF, single-page TIFF or HEIF image becomes a PNG (:func:`to_png`), and a multi-page TIFF, or a
raster too large for the image API, becomes a PDF with one page per page of it (:func:`document_pdf`).

Both check the page and pixel limits from the file's header before a pixel is decoded (see
:mod:`~airflow_provider_doc2x.documents.readers`), and refuse a cut or corrupt file with a
``Doc2XInputError`` naming it. Nothing is resampled: a page keeps its pixels, and a PDF page is as
many points as its image is pixels (1 px = 1 pt), so Doc2X's coordinates map back to the file's
pixels as they are stored (an EXIF orientation is not applied, as the PDF lane does not).
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

from airflow_provider_doc2x.documents.checks import (
    BYTES_EXTRA,
    DEFAULT_LIMITS,
    DocumentLimits,
    byte_size,
    check_pixels,
    corrupt,
    count_pdf_pages,
    decoding,
    noun,
    open_document,
    opened_image,
    page_sizes,
    refuse,
)
from airflow_provider_doc2x.documents.formats import JPEG, PNG, RASTER_FORMATS, TIFF
from airflow_provider_doc2x.pdf.packing import _img2pdf, _layout

log = logging.getLogger(__name__)

#: Modes a PNG holds as they are (Pillow writes ``I;16B`` as 16-bit grey too).
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"})
#: Modes turned into a PNG mode without losing a value.
_LOSSLESS_MODES = {"PA": "RGBA", "La": "LA", "RGBa": "RGBA", "RGBX": "RGB", "I;16L": "I;16", "I;16N": "I;16"}
#: Modes img2pdf embeds without a soft mask (a frame's bits per sample are checked apart).
_IMG2PDF_MODES = frozenset({"1", "L", "RGB", "CMYK", "P"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_MAX_16_BIT = 65535


def to_png(
    path: str | os.PathLike, fmt: str, *, source: str, limits: DocumentLimits = DEFAULT_LIMITS
) -> bytes:
    """The first frame of a raster as a lossless PNG, in memory.

    For a WebP, BMP, GIF, single-page TIFF or HEIF image (a JPEG or PNG converts too). The pixel
    limit is checked from the header before anything is decoded; the frame is decoded once and
    encoded once (PNG, Pillow's default compression). A multi-page TIFF is not cut to its first
    page here: :func:`document_pdf` takes every page of it.

    Modes: ``1``, ``L``, ``LA``, ``P`` (palette and transparency kept), ``RGB``, ``RGBA`` and 16-bit
    grey (``I;16``) are kept as they are. Modes a PNG cannot hold are converted: premultiplied or
    padded ones (``PA``, ``La``, ``RGBa``, ``RGBX``) and 16-bit grey of another byte order without
    loss; ``CMYK``, ``YCbCr`` and ``HSV`` to ``RGB`` by Pillow's own formulas (no colour
    management: a CMYK profile is dropped, not applied); ``LAB`` to ``RGB`` through Pillow's
    ImageCms (sRGB); 32-bit integers (``I``) to 16-bit grey, without loss when every value fits
    in 0 to 65535, else stretched from their range to 0-65535; floats (``F``) stretched from their
    range to 0-65535.

    A cut or corrupt file is refused, naming ``source``. Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES``,
    if a DAG sets it, makes Pillow pad a cut image instead of failing; a JPEG, PNG or WebP is
    still checked whole from its header first.
    """
    if fmt not in RASTER_FORMATS:
        raise ValueError(f"to_png reads a raster, not {fmt!r}")
    with open_document(path, source) as (handle, size):
        sizes = page_sizes(handle, fmt, size, source=source, limits=limits)
        if len(sizes) > 1:
            raise ValueError(f"{source} has more than one page: document_pdf converts every page of it")
        with opened_image(handle, fmt, source, limits) as image:
            with decoding(fmt, source, limits):
                image.load()
            frame = png_ready(image)
            output = io.BytesIO()
            frame.save(output, "PNG")
    return output.getvalue()


def png_ready(image: Any) -> Any:
    """The decoded frame in a mode a PNG holds, converted only when it must be (see :func:`to_png`)."""
    mode = image.mode
    if mode in _PNG_MODES:
        return image
    if mode in _LOSSLESS_MODES:
        return image.convert(_LOSSLESS_MODES[mode])
    if mode in ("I", "F"):
        return _as_16_bit(image)
    if mode == "LAB":
        from PIL import ImageCms

        return ImageCms.profileToProfile(
            image, ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    # CMYK, YCbCr, HSV and the rest: Pillow's own formulas. A profile described the old colour
    # space; kept, it would mislabel the RGB pixels.
    converted = image.convert("RGB")
    converted.info.pop("icc_profile", None)
    return converted


def _as_16_bit(image: Any) -> Any:
    """32-bit integers or floats as 16-bit grey: as they are when they fit, else stretched to 0-65535."""
    low, high = image.getextrema()
    if image.mode == "I" and low >= 0 and high <= _MAX_16_BIT:
        return image.convert("I;16")
    scale = _MAX_16_BIT / (high - low) if high > low else 0.0
    stretched = image.point(lambda value: (value - low) * scale)
    return stretched.convert("I").convert("I;16")


def document_pdf(
    path: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    *,
    source: str,
    limits: DocumentLimits = DEFAULT_LIMITS,
) -> int:
    """Write a PDF of every page of a raster document to ``out``; answer its page count.

    For a multi-page TIFF (every page, in order, none dropped) or one raster (a JPEG or PNG over
    the image API's 7 MB, or any other raster too large for it; an animation gives its first
    frame). ``out`` is a private path the caller made; it is overwritten.

    Lossless, as :mod:`~airflow_provider_doc2x.pdf.packing` packs: img2pdf (its internal engine,
    1 px = 1 pt, no rotation, no date) first takes the file itself: a JPEG is embedded unchanged,
    a PNG's compressed data copied, a TIFF's CCITT G4 pages embedded as they are and its other
    pages flate-encoded from their decoded pixels. When a page has an alpha channel (img2pdf would
    add a soft mask) or a mode or depth img2pdf does not take, or img2pdf fails, each page is
    instead decoded in turn, its alpha channel flattened onto white (Doc2X reads pages:
    transparency means nothing to it, and a soft mask may render on black), made a PNG as
    :func:`to_png` does, and img2pdf packs those PNGs.

    Page and pixel limits are checked from the header before anything is decoded; a PDF over the
    limit's bytes is refused once written. Memory: img2pdf holds the file and the PDF it builds;
    pages are decoded one at a time.
    """
    if fmt not in RASTER_FORMATS:
        raise ValueError(f"document_pdf reads a raster, not {fmt!r}")
    with open_document(path, source) as (handle, size):
        pages = len(page_sizes(handle, fmt, size, source=source, limits=limits)) or 1
        with opened_image(handle, fmt, source, limits) as image:
            direct = all(_embeds_as_is(image, fmt, source, limits, page) for page in range(pages))
    if direct and not _write_directly(path, fmt, out, source):
        direct = False
    if not direct:
        _write_flattened(path, fmt, out, pages, source, limits)
    written = os.path.getsize(out)
    if written > limits.max_pdf_bytes:
        raise refuse(
            f"The PDF made from {noun(fmt)} {source} is {byte_size(written)}, over the limit of "
            f"{byte_size(limits.max_pdf_bytes)}: split the document, or raise the limit with the Doc2X "
            f"connection's extra {BYTES_EXTRA}",
            source=source,
            code="parse_file_too_large",
        )
    with open(out, "rb") as pdf:
        written_pages = count_pdf_pages(pdf, source, limits)
    if written_pages != pages:
        raise corrupt(
            fmt, source, f"{pages} pages were read from it but the PDF made from it has {written_pages}"
        )
    return pages


def _embeds_as_is(image: Any, fmt: str, source: str, limits: DocumentLimits, page: int) -> bool:
    """Whether img2pdf takes this page as it is: no alpha, a mode and depth it embeds (headers only)."""
    if fmt == JPEG:
        return True
    with decoding(fmt, source, limits, page=page + 1):
        image.seek(page)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return False
    if fmt == PNG:
        return True  # img2pdf copies a PNG's compressed data, whatever its depth
    bits = image.tag_v2.get(258, (1,)) if fmt == TIFF else (8,)
    if max(bits if isinstance(bits, tuple) else (bits,)) > 8:
        return False  # Pillow would reduce it to 8 bits for img2pdf, and img2pdf refuses it
    return image.mode in _IMG2PDF_MODES


def _write_directly(path: str | os.PathLike, fmt: str, out: str | os.PathLike, source: str) -> bool:
    """img2pdf over the file itself; False (and nothing promised about ``out``) when img2pdf refuses it."""
    img2pdf = _img2pdf()
    try:
        with open(out, "wb") as output:
            img2pdf.convert(
                os.fspath(path),
                outputstream=output,
                engine=img2pdf.Engine.internal,
                layout_fun=_layout(),
                rotation=img2pdf.Rotation.none,
                first_frame_only=fmt != TIFF,
                nodate=True,
            )
    except MemoryError:
        raise
    except Exception as error:  # img2pdf raises bare Exception, ValueError and its own classes alike
        log.info(
            "img2pdf does not take %s as it is (%s: %s); its pages are converted one by one",
            source,
            type(error).__name__,
            error,
        )
        return False
    return True


def _write_flattened(
    path: str | os.PathLike, fmt: str, out: str | os.PathLike, pages: int, source: str, limits: DocumentLimits
) -> None:
    """Each page decoded in turn, flattened onto white, made a PNG; img2pdf packs the PNGs."""
    pngs: list[bytes] = []
    with open_document(path, source) as (handle, _), opened_image(handle, fmt, source, limits) as image:
        for page in range(pages):
            with decoding(fmt, source, limits, page=page + 1):
                image.seek(page)
                check_pixels(fmt, source, image.width, image.height, limits, page=page + 1)
                image.load()
                frame = png_ready(_flattened(image))
                output = io.BytesIO()
                frame.save(output, "PNG")
            pngs.append(output.getvalue())
            del frame
    img2pdf = _img2pdf()
    try:
        with open(out, "wb") as pdf:
            img2pdf.convert(
                *pngs,
                outputstream=pdf,
                engine=img2pdf.Engine.internal,
                layout_fun=_layout(),
                rotation=img2pdf.Rotation.none,
                nodate=True,
            )
    except MemoryError:
        raise
    except Exception as error:  # as above: img2pdf's errors share no base class
        raise corrupt(
            fmt, source, f"img2pdf cannot pack its pages: {type(error).__name__}: {error}"
        ) from error


def _flattened(image: Any) -> Any:
    """The frame with any alpha channel composited onto white; a frame without one as it is."""
    from PIL import Image

    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "RGBa"):
        image = image.convert("RGBA")
    elif image.mode == "La":
        image = image.convert("LA")
    if image.mode not in ("RGBA", "LA"):
        return image
    base = image.mode[0] if image.mode == "LA" else "RGB"
    page = Image.new(base, image.size, "white")
    page.paste(image.convert(base), mask=image.getchannel("A"))
    return page
