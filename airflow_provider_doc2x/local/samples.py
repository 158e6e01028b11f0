"""Document-like images with known text, rendered here (the example DAGs' samples and the tests' inputs).

Each page is drawn as a person would see it (headings, paragraphs, a grid table, a figure) and also
carries its Markdown in a ``doc2x`` text chunk, which is what the ``simple`` engine answers: so the
expected Markdown of every sample is known exactly.

``python -m airflow_provider_doc2x.local.samples DIR`` writes the example pages into DIR.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

from airflow_provider_doc2x.local.engines import TEXT_KEY

PAGE_SIZE = (1000, 1400)
MARGIN = 80


@dataclass
class Section:
    """A further heading of a page and the paragraphs under it."""

    heading: str
    paragraphs: list[str] = field(default_factory=list)


@dataclass
class Page:
    """A page to draw: a title, paragraphs, maybe a ruled table, a figure and further sections."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    table: list[list[str]] = field(default_factory=list)
    figure: bool = False
    #: Make it look scanned: slightly tilted, blurred, speckled, saved as a lossy JPEG.
    scanned: bool = False
    #: Headings after the title's paragraphs, drawn like the title, each with its own paragraphs.
    sections: list[Section] = field(default_factory=list)

    @property
    def outline(self) -> list[Section]:
        """Every heading with its paragraphs, the title's first: the page's text in reading order."""
        return [Section(self.title, self.paragraphs), *self.sections]


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    return [*lines, line] if line else lines


def render(page: Page, *, fmt: str = "PNG", size: tuple[int, int] = PAGE_SIZE) -> bytes:
    """Draw the page and embed its Markdown; return PNG or JPEG bytes."""
    from PIL import Image, ImageDraw, PngImagePlugin

    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    width = size[0] - 2 * MARGIN
    y = MARGIN
    markdown: list[str] = []
    heading, body = _font(44), _font(26)
    for number, section in enumerate(page.outline):
        if number:
            y += 16  # a little more air above a section than between paragraphs
        markdown.append(f"# {section.heading}")
        draw.text((MARGIN, y), section.heading, fill="black", font=heading)
        y += 90
        for paragraph in section.paragraphs:
            for line in _wrap(draw, paragraph, body, width):
                draw.text((MARGIN, y), line, fill="black", font=body)
                y += 36
            y += 24
            markdown.append(paragraph)
    if page.table:
        column = width // len(page.table[0])
        for row_index, row in enumerate(page.table):
            for col_index, cell in enumerate(row):
                box = (MARGIN + col_index * column, y, MARGIN + (col_index + 1) * column, y + 50)
                draw.rectangle(box, outline="black", width=2)
                draw.text((box[0] + 12, y + 10), cell, fill="black", font=body)
            y += 50
            if row_index == 0:
                markdown.append("| " + " | ".join(row) + " |")
                markdown[-1] += "\n|" + "---|" * len(row)
            else:
                markdown[-1] += "\n| " + " | ".join(row) + " |"
        y += 40
    if page.figure:
        box = (MARGIN, y, MARGIN + 360, y + 240)
        draw.rectangle(box, fill=(220, 235, 250), outline="navy", width=3)
        draw.ellipse((box[0] + 40, box[1] + 40, box[0] + 200, box[1] + 200), fill=(240, 120, 60))
        draw.polygon(
            [(box[0] + 220, box[3] - 30), (box[2] - 30, box[3] - 30), (box[2] - 90, box[1] + 40)],
            fill="green",
        )
        markdown.append(f"<!-- figure: {box[0]},{box[1]},{box[2] - box[0]},{box[3] - box[1]} -->")
    text = "\n\n".join(markdown)
    if page.scanned:
        picture = _scanned(picture)
    out = io.BytesIO()
    if fmt.upper() == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(TEXT_KEY, text)
        picture.save(out, format="PNG", pnginfo=info, optimize=True)
    else:
        picture.save(out, format="JPEG", quality=70 if page.scanned else 85, comment=text.encode())
    return out.getvalue()


def _scanned(picture):
    """A fixed, repeatable imitation of a desk scan: 0.6 degree tilt, blur, grey paper, speckle."""
    import random

    from PIL import Image, ImageFilter

    noise_source = random.Random(42)
    tilted = picture.rotate(0.6, resample=Image.Resampling.BICUBIC, expand=False, fillcolor="white")
    blurred = tilted.filter(ImageFilter.GaussianBlur(0.9))
    paper = Image.new("RGB", picture.size, (236, 233, 225))
    scan = Image.blend(blurred, paper, 0.12)
    speckle = scan.load()
    width, height = scan.size
    for _ in range(width * height // 150):
        x, y = noise_source.randrange(width), noise_source.randrange(height)
        shade = noise_source.randrange(120, 200)
        speckle[x, y] = (shade, shade, shade)
    return scan


EXAMPLE_PAGES = {
    "invoice.png": Page(
        title="Invoice 2026-0042",
        paragraphs=[
            "Billed to Northwind Traders, 12 Harbour Road, Portsmouth.",
            "Payment is due within thirty days of the invoice date.",
        ],
        table=[["Item", "Qty", "Price"], ["Scanner", "2", "310.00"], ["Toner", "5", "42.50"]],
    ),
    "report.jpg": Page(
        title="Quarterly Report",
        paragraphs=[
            "Revenue grew by eleven percent over the quarter, led by the document services line.",
            "The figure below shows the share of each region.",
        ],
        figure=True,
    ),
    "scan.jpg": Page(
        title="Shipping Manifest",
        paragraphs=[
            "Consignment of archive boxes from the Leeds office to the central records centre.",
            "All boxes were sealed and counted at departure and on arrival.",
        ],
        table=[
            ["Box", "Contents", "Pages"],
            ["A-101", "Contracts", "2400"],
            ["A-102", "Invoices", "1850"],
            ["A-103", "Letters", "960"],
        ],
        scanned=True,
    ),
    "letter.png": Page(
        title="Letter of Intent",
        paragraphs=[
            "We intend to digitise the archive of scanned contracts before the end of the year.",
            "Each page will be converted to Markdown and indexed for search.",
        ],
    ),
}

#: Pages only the tests read (``write_examples`` leaves them out): a scanned memo of several sections.
TEST_PAGES = {
    "memo.jpg": Page(
        title="Records Office Memo",
        paragraphs=[
            "To all staff of the records office, from the head of archives, on the move to digital files."
        ],
        sections=[
            Section(
                "Scanning Schedule",
                [
                    "Scanning of the paper archive starts on the first Monday of March "
                    "and runs for six weeks.",
                    "Each team scans its own boxes in the order given on the shipping manifest.",
                ],
            ),
            Section(
                "Handling of Originals",
                [
                    "Staples and clips are removed before a page goes through the feeder, "
                    "and torn pages are copied by hand.",
                    "Originals go back into their box, which is sealed and kept on site for one year.",
                ],
            ),
            Section(
                "Questions and Support",
                [
                    "Send any question about the schedule to the archive desk by mail "
                    "or telephone on extension 214."
                ],
            ),
        ],
        scanned=True,
    ),
}


def write_examples(folder: Path) -> list[Path]:
    """Render the example pages into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, page in EXAMPLE_PAGES.items():
        path = folder / name
        path.write_bytes(render(page, fmt="JPEG" if name.endswith(".jpg") else "PNG"))
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_examples(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(written_path)
