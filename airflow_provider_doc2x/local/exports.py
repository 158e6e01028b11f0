"""Figures and exports of a parsed PDF, as the local server's PDF API ships them (no I/O here).

- In a page's ``md``, an engine's figure ``<img src="NAME"/>`` becomes a link to the page image on
  the local CDN, as Doc2X links ``cdn.noedgeai.com``:
  ``<img src="BASE/local/cdn/<uid>_<page_idx>.jpg?x=X&y=Y&w=W&h=H&r=0"/>``; the CDN crops the page
  image to that box (``r`` turns it by that many degrees, a multiple of 90).
- An ``md`` export is a zip of ``<filename or output>.md`` and the figures as
  ``images/<uid>_<page_idx>_<x>_<y>_<w>_<h>_<r>.jpg``, the Markdown linking them as ``images/...``;
  ``tex`` is a zip of a placeholder ``.tex`` (the Markdown in a ``verbatim`` block) with the same
  images; ``docx`` is a small Word document holding the Markdown's text.

The engines name figures ``<uid>_<page>_<x1>_<y1>_<x2>_<y2>_<n>.jpg``; :func:`figure_box` reads the
box back from such a name.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable
from urllib.parse import urlencode
from xml.sax.saxutils import escape

#: A figure in Markdown, as the engines and Doc2X write it.
FIGURE_SRC = re.compile(r'<img src="([^"]+)"\s*/>')
#: The box at the end of an engine's figure name: x1, y1, x2, y2, then the figure's number.
_FIGURE_NAME = re.compile(r"_(\d+)_(\d+)_(\d+)_(\d+)_\d+\.[A-Za-z]+$")
#: A box: x, y, width, height in the page's pixels.
Box = tuple[int, int, int, int]

FORMATS = ("md", "tex", "docx")
FORMULA_MODES = ("normal", "dollar")
DEFAULT_STEM = "output"
MEDIA_TYPES = {
    "zip": "application/zip",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
}


def figure_box(name: str, size: tuple[int, int]) -> Box:
    """The box an engine's figure name gives, or the whole page (of ``size``) for a name without one."""
    match = _FIGURE_NAME.search(name)
    if not match:
        return (0, 0, *size)
    x1, y1, x2, y2 = (int(value) for value in match.groups())
    return (x1, y1, max(1, x2 - x1), max(1, y2 - y1))


def link_figures(md: str, boxes: dict[str, Box], link: Callable[[Box], str]) -> str:
    """Replace each figure named in ``boxes`` by a link to its box; other images stay as they are."""

    def replace(match: re.Match) -> str:
        box = boxes.get(match.group(1))
        return f'<img src="{link(box)}"/>' if box is not None else match.group(0)

    return FIGURE_SRC.sub(replace, md)


def cdn_path(uid: str, page_idx: int) -> str:
    """The path of a page image on the local CDN."""
    return f"/local/cdn/{uid}_{page_idx}.jpg"


def cdn_link(base_url: str, uid: str, page_idx: int, box: Box, rotation: int = 0) -> str:
    """A figure's CDN link: the page image with its crop box in the query."""
    x, y, w, h = box
    return f"{base_url}{cdn_path(uid, page_idx)}?{urlencode({'x': x, 'y': y, 'w': w, 'h': h, 'r': rotation})}"


def image_name(uid: str, page_idx: int, box: Box, rotation: int = 0) -> str:
    """A figure's file name in an export zip (under ``images/``)."""
    x, y, w, h = box
    return f"{uid}_{page_idx}_{x}_{y}_{w}_{h}_{rotation}.jpg"


def crop(image: bytes, box: Box | None, rotation: int = 0) -> bytes:
    """Crop a page image to ``box`` (clipped to the page; None: the whole page), turn it, as JPEG bytes."""
    from PIL import Image

    picture = Image.open(io.BytesIO(image)).convert("RGB")
    if box is not None:
        x, y = min(box[0], picture.width - 1), min(box[1], picture.height - 1)
        picture = picture.crop((x, y, min(picture.width, x + box[2]), min(picture.height, y + box[3])))
    if rotation:
        picture = picture.rotate(-rotation, expand=True)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=90)
    return out.getvalue()


def export_file_name(to: str) -> str:
    """The name of an export's file on the store, as Doc2X names them (``convert_md_none.zip``)."""
    return "convert_docx_none.docx" if to == "docx" else f"convert_{to}_none.zip"


def dollar_formulas(md: str) -> str:
    r"""Write formulas with dollars: ``\(x\)`` as ``$x$`` and ``\[x\]`` as ``$$x$$``."""
    md = re.sub(r"\\\[(.+?)\\\]", lambda match: f"$${match.group(1)}$$", md, flags=re.DOTALL)
    return re.sub(r"\\\((.+?)\\\)", lambda match: f"${match.group(1)}$", md, flags=re.DOTALL)


def markdown_archive(stem: str, markdown: str, images: dict[str, bytes]) -> bytes:
    """An ``md`` export: ``STEM.md`` and ``images/NAME`` files."""
    return _zip(
        {f"{stem}.md": markdown.encode(), **{f"images/{name}": data for name, data in images.items()}}
    )


def tex_archive(stem: str, markdown: str, images: dict[str, bytes]) -> bytes:
    """A ``tex`` export (a placeholder): ``STEM.tex`` holding the Markdown verbatim, and the images."""
    body = markdown.replace(r"\end{verbatim}", "")
    head = "\\documentclass{article}\n\\begin{document}\n\\begin{verbatim}\n"
    tex = f"{head}{body}\n\\end{{verbatim}}\n\\end{{document}}\n"
    return _zip({f"{stem}.tex": tex.encode(), **{f"images/{name}": data for name, data in images.items()}})


def docx_document(markdown: str) -> bytes:
    """A ``docx`` export (a placeholder): a minimal Word document, one paragraph per Markdown line."""
    paragraphs = "".join(
        f'<w:p><w:r><w:t xml:space="preserve">{escape(line)}</w:t></w:r></w:p>'
        for line in markdown.splitlines()
    )
    word = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    package = "http://schemas.openxmlformats.org/package/2006"
    return _zip(
        {
            "[Content_Types].xml": (
                f'<?xml version="1.0" encoding="UTF-8"?><Types xmlns="{package}/content-types">'
                '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
                '<Default Extension="xml" ContentType="application/xml"/>'
                '<Override PartName="/word/document.xml" ContentType="application/'
                'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>'
            ).encode(),
            "_rels/.rels": (
                f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="{package}/relationships">'
                '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
                'relationships/officeDocument" Target="word/document.xml"/></Relationships>'
            ).encode(),
            "word/document.xml": (
                f'<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="{word}">'
                f"<w:body>{paragraphs}</w:body></w:document>"
            ).encode(),
        }
    )


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()
