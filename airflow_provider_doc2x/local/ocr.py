"""The ``ocr`` engine of the local server: real offline OCR, Doc2X-shaped Markdown.

Text comes from RapidOCR (PP-OCR models shipped inside its wheel, run by onnxruntime: no network,
no key). Layout comes from the page itself, with OpenCV: ruled tables from their grid lines (each
cell's text placed by its position), figures from the ink that is neither text nor table, headings
from text noticeably taller than the body, paragraphs from the vertical gaps between lines; blocks
in reading order, top to bottom.

Why not the ``rapid-layout`` model: it pulls ``opencv-python`` while RapidOCR pulls
``opencv-python-headless``, and the two write the same ``cv2`` package, so whichever installs last
silently replaces the other. Analysing the grid lines needs only the headless build, and places
text in ruled cells exactly. Install with ``pip install "airflow-provider-doc2x[ocr]"``.

Word spacing on scans: the recogniser writes a space only where it sees paper between two words,
and at body size that gap is one or two of its output columns wide. A desk scan blurs the type into
the gap and its speckle lands in it: together they make the gap read as part of a letter
("boxesfrom", "# ShippingManifest"), where either alone loses few spaces and the tilt none (the
detector's boxes follow tilted lines and each line is cut out straight, so deskewing the page first
changes nothing). So the speckle is removed before recognition, with a 3x3 median that drops
isolated dots and keeps strokes; and each line is recognised on its own, because in a batch the
shorter lines are padded with grey out to the longest one's width, which tips the reading of narrow
gaps. On scanned renderings of the sample pages under five noise patterns, words ran together 9 to
15 times a set as shipped, 5 to 7 with lines read alone, once with the median alone, never with both.
RapidOCR's word boxes can't help (they split text already decoded and bring no lost space back), nor
can upscaling (every line is resized to the recogniser's 48-pixel height); stretching lines wider
made it worse.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from statistics import median
from typing import Any

from airflow_provider_doc2x.local.engines import EnginePage, EngineResult, media_block, open_image

log = logging.getLogger(__name__)


@dataclass
class Line:
    """One line of OCR'd text and its box."""

    x0: float
    y0: float
    x1: float
    y1: float
    text: str

    @property
    def height(self) -> float:
        """The box's height in pixels."""
        return self.y1 - self.y0

    @property
    def glyph(self) -> float:
        """Width per character: a size of the type that the box's vertical padding does not blur."""
        return (self.x1 - self.x0) / max(len(self.text), 1)

    @property
    def center(self) -> tuple[float, float]:
        """The box's centre: what places a line in a table cell or a figure."""
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2


@dataclass
class Block:
    """A block of the page's Markdown, and how far down the page it starts (blocks are ordered by it)."""

    top: float
    markdown: str


Box = tuple[int, int, int, int]  # x0, y0, x1, y1


class OcrEngine:
    """RapidOCR plus grid and ink analysis; built once per server process (loading takes a second)."""

    name = "ocr"

    def __init__(self, threads: int | None = None) -> None:
        from rapidocr import RapidOCR

        threads = threads or int(os.environ.get("DOC2X_OCR_THREADS", "0")) or -1
        self._ocr = RapidOCR(
            params={
                "Global.log_level": "warning",
                "EngineConfig.onnxruntime.intra_op_num_threads": threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1 if threads > 0 else -1,
                # One line per run: no grey padding out to a longer neighbour (see the module's
                # docstring); on a CPU it also saves computing the padded columns.
                "Rec.rec_batch_num": 1,
            }
        )
        logging.getLogger("RapidOCR").setLevel(logging.WARNING)

    def parse(self, image: bytes, uid: str) -> EngineResult:
        """Read the page: tables, figures, headings and paragraphs, top to bottom."""
        import numpy as np

        picture = open_image(image).convert("RGB")
        pixels = np.array(picture)
        lines = self._read_lines(pixels)
        ink = _ink_mask(pixels)
        blocks: list[Block] = []
        tables = []
        for table in _find_tables(ink):
            inside = [line for line in lines if _contains(table.box, line.center)]
            cells = table.cells(inside)
            # A grid whose cells are mostly empty is a drawing (a framed chart), not a table.
            if sum(bool(cell) for row in cells for cell in row) < 0.5 * sum(len(row) for row in cells):
                continue
            tables.append(table)
            lines = [line for line in lines if line not in inside]
            blocks.append(Block(table.box[1], table.markdown(cells)))
        figures: dict[str, bytes] = {}
        for box in _find_figures(ink, lines, [table.box for table in tables]):
            name = f"{uid}_0_{box[0]}_{box[1]}_{box[2]}_{box[3]}_{len(figures)}.jpg"
            crop = io.BytesIO()
            picture.crop(box).save(crop, format="JPEG", quality=90)
            figures[name] = crop.getvalue()
            lines = [line for line in lines if not _contains(box, line.center)]
            blocks.append(Block(box[1], media_block(name)))
        blocks.extend(_text_blocks(lines))
        markdown = "\n\n".join(block.markdown for block in sorted(blocks, key=lambda block: block.top))
        return EngineResult(pages=[EnginePage(picture.width, picture.height, markdown)], figures=figures)

    def _read_lines(self, pixels) -> list[Line]:
        import cv2

        # Scanner speckle in the gaps between words reads as ink and joins the words (see the
        # module's docstring); a 3x3 median removes isolated dots and keeps strokes, which are wider.
        despeckled = cv2.medianBlur(pixels, 3)
        output: Any = self._ocr(despeckled)  # a RapidOCROutput: boxes and texts of the whole pipeline
        if output.boxes is None or output.txts is None:
            return []
        lines = []
        for box, text in zip(output.boxes, output.txts, strict=True):
            xs, ys = [point[0] for point in box], [point[1] for point in box]
            if text.strip():
                lines.append(Line(min(xs), min(ys), max(xs), max(ys), text.strip()))
        return sorted(lines, key=lambda line: (line.y0, line.x0))


def _ink_mask(pixels):
    """Dark or coloured pixels (text, rules, figures) as 255, paper as 0; robust to scan noise."""
    import cv2

    gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    gray = cv2.GaussianBlur(gray, (3, 3), 0)
    saturation = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)[:, :, 1]
    dark = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, 31, 15)
    coloured = (saturation > 60).astype("uint8") * 255
    return cv2.bitwise_or(dark, coloured)


@dataclass
class Table:
    """A ruled table found on the page: its box and the positions of its rules."""

    box: Box
    rows: list[float]  # y of each horizontal rule, top to bottom
    cols: list[float]  # x of each vertical rule, left to right

    def cells(self, lines: list[Line]) -> list[list[str]]:
        """The text of each cell, placed by the centre of each OCR line."""
        cells = [["" for _ in range(len(self.cols) - 1)] for _ in range(len(self.rows) - 1)]
        for line in sorted(lines, key=lambda line: (line.y0, line.x0)):
            x, y = line.center
            row = next((i for i in range(len(self.rows) - 1) if self.rows[i] <= y < self.rows[i + 1]), None)
            col = next((j for j in range(len(self.cols) - 1) if self.cols[j] <= x < self.cols[j + 1]), None)
            if row is not None and col is not None:
                cells[row][col] = f"{cells[row][col]} {line.text}".strip()
        return cells

    @staticmethod
    def markdown(cells: list[list[str]]) -> str:
        """The cells as a pipe table, its first non-empty row as the header."""
        rows = [row for row in cells if any(row)]
        if not rows:
            return ""
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        return "\n".join(out)


def _rule_positions(profile, threshold: float) -> list[float]:
    """Centres of the runs of a projection profile above ``threshold`` (one per ruled line)."""
    positions, start = [], None
    for index, value in enumerate([*profile, 0]):
        if value >= threshold and start is None:
            start = index
        elif value < threshold and start is not None:
            positions.append((start + index - 1) / 2)
            start = None
    return positions


def _find_tables(ink) -> list[Table]:
    """Ruled tables: long horizontal and vertical strokes that cross, with at least 2x2 cells."""
    import cv2

    height, width = ink.shape
    horizontal = cv2.morphologyEx(
        ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (max(width // 25, 15), 1))
    )
    vertical = cv2.morphologyEx(
        ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (1, max(height // 60, 12)))
    )
    grid = cv2.dilate(cv2.bitwise_or(horizontal, vertical), cv2.getStructuringElement(cv2.MORPH_RECT, (5, 5)))
    contours, _ = cv2.findContours(grid, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    tables = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        if w < width // 5 or h < 30:
            continue
        rows = _rule_positions((horizontal[y : y + h, x : x + w] > 0).sum(axis=1), 0.5 * w)
        cols = _rule_positions((vertical[y : y + h, x : x + w] > 0).sum(axis=0), 0.5 * h)
        if len(rows) >= 3 and len(cols) >= 3:
            tables.append(Table((x, y, x + w, y + h), [y + r for r in rows], [x + c for c in cols]))
    return tables


def _find_figures(ink, lines: list[Line], tables: list[Box]) -> list[Box]:
    """Large blobs of ink that no text line or table explains: pictures, charts, drawings."""
    import cv2
    import numpy as np

    height, width = ink.shape
    rest = ink.copy()
    for line in lines:
        pad = max(2, int(line.height * 0.3))
        rest[
            max(0, int(line.y0) - pad) : int(line.y1) + pad, max(0, int(line.x0) - pad) : int(line.x1) + pad
        ] = 0
    for x0, y0, x1, y1 in tables:
        rest[y0:y1, x0:x1] = 0
    rest = cv2.morphologyEx(rest, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))  # scan speckle
    rest = cv2.dilate(rest, cv2.getStructuringElement(cv2.MORPH_RECT, (15, 15)))
    contours, _ = cv2.findContours(rest, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    figures = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        if w * h >= 0.01 * width * height and w > 40 and h > 40:
            figures.append((max(0, x), max(0, y), min(width, x + w), min(height, y + h)))
    return sorted(figures, key=lambda box: (box[1], box[0]))


def _text_blocks(lines: list[Line]) -> list[Block]:
    """Headings (type much larger than the body's) and paragraphs (lines separated by small gaps)."""
    if not lines:
        return []
    body = median(line.height for line in lines)
    body_glyph = median(line.glyph for line in lines)
    blocks: list[Block] = []
    paragraph: list[Line] = []

    def flush() -> None:
        if paragraph:
            blocks.append(Block(paragraph[0].y0, " ".join(line.text for line in paragraph)))
            paragraph.clear()

    for line in sorted(lines, key=lambda line: (line.y0, line.x0)):
        if line.glyph > 1.35 * body_glyph:
            flush()
            blocks.append(Block(line.y0, f"# {line.text}"))
            continue
        if paragraph and line.y0 - paragraph[-1].y1 > 0.35 * body:
            flush()
        paragraph.append(line)
    flush()
    return blocks


def _contains(box: Box, point: tuple[float, float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]
