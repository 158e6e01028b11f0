"""Engines of the local Doc2X server: what turns an image into Doc2X-shaped pages.

``simple`` is fast and deterministic (the test suite's engine): it reads the image's size and any
text embedded in it (a PNG ``doc2x`` text chunk or a JPEG comment) and returns that text as the
page's Markdown (an image without text gets a line computed from its pixels, see
:func:`fallback_text`). Two directives in the embedded text drive the server the way a real document
would: ``<!-- figure: x,y,w,h -->`` crops that box into a figure of ``convert_zip``, and
``<!-- doc2x-fail: CODE -->`` makes the job fail with that error code.

The engines by name, and the ``ocr`` engine's lazy import, are in
:mod:`~airflow_provider_doc2x.local.registry`: this module imports no other engine.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import Protocol

FIGURE_DIRECTIVE = re.compile(r"<!--\s*figure:\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*-->")
FAIL_DIRECTIVE = re.compile(r"<!--\s*doc2x-fail:\s*([a-z_]+)\s*-->")
#: The PNG text chunk the simple engine reads (JPEG images carry the text as their comment).
TEXT_KEY = "doc2x"


class ImageUnreadable(Exception):
    """The bytes look like a JPEG/PNG but do not decode (Doc2X: ``parse_file_invalid``)."""


@dataclass
class EnginePage:
    """One page of a result: its size in pixels and its Doc2X Markdown."""

    width: int
    height: int
    md: str


@dataclass
class EngineResult:
    """What an engine makes of one image: its pages, the figures they name, or a failure code."""

    pages: list[EnginePage]
    #: Figure files by name, as the Markdown's ``<img src=...>`` names them.
    figures: dict[str, bytes] = field(default_factory=dict)
    #: Set when the job must fail with this Doc2X error code.
    fail_code: str | None = None


class Engine(Protocol):
    """What the server needs of an engine: a name, and a blocking ``parse`` (run in a thread)."""

    #: The name ``--engine`` chooses it by.
    name: str

    def parse(self, image: bytes, uid: str) -> EngineResult:
        """Turn one image's bytes into pages; ``uid`` names the job (figure files start with it).

        Raises:
            ImageUnreadable: the bytes do not decode as an image.
        """
        ...


def open_image(image: bytes):
    """Decode fully (a truncated file fails here, not later) or raise :class:`ImageUnreadable`."""
    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(io.BytesIO(image))
        picture.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageUnreadable(str(error)) from error
    return picture


def embedded_text(picture) -> str:
    """Return the text carried inside the image: its PNG ``doc2x`` text chunk, or its JPEG comment."""
    if picture.format == "PNG":
        return str(getattr(picture, "text", {}).get(TEXT_KEY, ""))
    comment = picture.info.get("comment", b"")
    return comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)


def pixels_sha256(picture) -> str:
    """Hash the picture's pixels as RGB bytes: the same for a PNG and for its pixels copied into a PDF."""
    return hashlib.sha256(picture.convert("RGB").tobytes()).hexdigest()


def fallback_text(picture) -> str:
    """Return the simple engine's Markdown for an image that carries no text, computed from its pixels.

    ``Image WxH (FORMAT), pixels sha256 HASH``, where HASH is the first 12 hex digits of
    :func:`pixels_sha256`. A page that a PDF holds as Flate data (a PNG packed by img2pdf) has lost
    its text chunk but not its pixels, so the image API and the PDF API answer it alike.
    """
    width, height = picture.size
    return f"Image {width}x{height} ({picture.format}), pixels sha256 {pixels_sha256(picture)[:12]}"


def media_block(name: str) -> str:
    """Return a figure's Markdown, as Doc2X writes it."""
    return f'<!-- Media -->\n\n<img src="{name}"/>\n\n<!-- Media -->'


def crop_figure(picture, box: tuple[int, int, int, int]) -> bytes:
    """Crop the ``(x, y, width, height)`` box of the picture into a figure file's JPEG bytes."""
    x, y, width, height = box
    figure = picture.convert("RGB").crop((x, y, x + width, y + height))
    out = io.BytesIO()
    figure.save(out, format="JPEG", quality=90)
    return out.getvalue()


class SimpleEngine:
    """Deterministic Markdown from the image's size and embedded text; no model, milliseconds."""

    name = "simple"

    def parse(self, image: bytes, uid: str) -> EngineResult:
        """Read the image's embedded text and obey its directives (see the module's docstring).

        Raises:
            ImageUnreadable: the bytes do not decode as an image.
        """
        picture = open_image(image)
        width, height = picture.size
        text = embedded_text(picture).strip()
        failure = FAIL_DIRECTIVE.search(text)
        if failure:
            return EngineResult(pages=[], fail_code=failure.group(1))
        if not text:
            text = fallback_text(picture)
        figures: dict[str, bytes] = {}

        def figure(match: re.Match) -> str:
            box = tuple(int(value) for value in match.groups())
            x, y, w, h = box
            name = f"{uid}_0_{x}_{y}_{x + w}_{y + h}_{len(figures)}.jpg"
            figures[name] = crop_figure(picture, box)  # type: ignore[arg-type]
            return media_block(name)

        md = FIGURE_DIRECTIVE.sub(figure, text)
        return EngineResult(pages=[EnginePage(width, height, md)], figures=figures)
