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


#: Pixels of a page of the mixed folder's documents: US letter at 100 dpi (as the fax says; a page of
#: the report is 1 pt per pixel, as the PDF lane lays pages out).
DOCUMENT_PAGE_SIZE = (850, 1100)

#: ``report.pdf``: two scanned-in pages (JPEGs, their Markdown in their comments)...
REPORT_PAGES = [
    Page(
        title="Annual Report 2025",
        paragraphs=[
            "The archive digitised 48,000 pages this year, a third more than planned.",
            "Scanning moved from the basement to the new records centre in May.",
        ],
    ),
    Page(
        title="Pages by Department",
        paragraphs=["Each department sent its paper files in sealed boxes."],
        table=[
            ["Department", "Boxes", "Pages"],
            ["Legal", "40", "21000"],
            ["Finance", "31", "18500"],
            ["Personnel", "15", "8500"],
        ],
    ),
]
#: ...and a born-digital last page: these lines as a text layer, no picture (its Markdown is its text).
REPORT_APPENDIX = [
    "Appendix: Contacts",
    "Records centre, 4 Mill Lane, Leeds.",
    "Archive desk: extension 214.",
]
#: ``fax.tiff``: what a fax server stores, one bilevel CCITT G4 page each (their text is in the pixels only).
FAX_PAGES = [
    Page(
        title="Fax: Purchase Order 7731",
        paragraphs=[
            "To Northwind Traders, from the records office.",
            "Please deliver the items below by the end of the month.",
        ],
    ),
    Page(title="Order Lines", table=[["Item", "Qty"], ["Archive box", "200"], ["Label roll", "12"]]),
    Page(
        title="Terms",
        paragraphs=[
            "Payment within thirty days of delivery.",
            "Questions to the archive desk, extension 214.",
        ],
    ),
]
#: ``photo.webp``: a phone photo of a whiteboard, lossless WebP (converted to PNG, it loses its text chunk).
PHOTO_PAGE = Page(
    title="Whiteboard Notes",
    paragraphs=["Move the scanners to room 2 before March.", "Order toner and archive boxes."],
    figure=True,
    scanned=True,
)


def write_documents(folder: Path) -> list[Path]:
    """Write a small mixed folder of documents as users have them into ``folder``; return their paths.

    ``example_dags/documents/`` was made with it (about 320 KB); the bytes are the same on every
    run with the same Pillow, img2pdf and pypdf, so the folder can be regenerated with
    ``python -c "from pathlib import Path; from airflow_provider_doc2x.local.samples import
    write_documents; write_documents(Path('example_dags/documents'))"``. The files, and how each
    travels to Doc2X:

    - ``report.pdf``: 3 pages, the PDF API as it is. Two JPEG pages packed by img2pdf (the
      ``simple`` engine reads their Markdown from each JPEG's comment), then a text page written
      with pypdf alone (a born-digital page: its text layer is its Markdown);
    - ``fax.tiff``: 3 bilevel pages, CCITT G4, as a fax server stores them: the PDF API, every page
      packed into one PDF (the ``simple`` engine answers each page's pixel hash);
    - ``photo.webp``: a lossless WebP, converted to PNG for the image API;
    - ``letter.png`` and ``scan.jpg``: the example pages of :func:`write_examples`, the image API as
      they are.

    Each file is 1 page of the image API or a document of 3 pages of the PDF API: 3 images and 6
    PDF pages in all.
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "report.pdf": _report_pdf(),
        "fax.tiff": _fax_tiff(),
        "photo.webp": _webp(render(PHOTO_PAGE, fmt="PNG", size=(900, 700))),
        "letter.png": render(EXAMPLE_PAGES["letter.png"], fmt="PNG"),
        "scan.jpg": render(EXAMPLE_PAGES["scan.jpg"], fmt="JPEG"),
    }
    written = []
    for name, content in files.items():
        path = folder / name
        path.write_bytes(content)
        written.append(path)
    return written


def _report_pdf() -> bytes:
    """JPEG pages packed by img2pdf (1 px = 1 pt, no date: the same bytes every time), then a text page."""
    import img2pdf
    from pypdf import PdfReader, PdfWriter
    from pypdf.generic import ContentStream, DictionaryObject, NameObject

    scanned = img2pdf.convert(
        [render(page, fmt="JPEG", size=DOCUMENT_PAGE_SIZE) for page in REPORT_PAGES],
        layout_fun=img2pdf.get_fixed_dpi_layout_fun((72, 72)),
        engine=img2pdf.Engine.internal,  # its file identifier is made from the content, not at random
        nodate=True,
    )
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(scanned)))
    width, height = DOCUMENT_PAGE_SIZE
    page = writer.add_blank_page(width, height)
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),  # one of the 14 fonts every reader has
        }
    )
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
    )
    lines = b" ".join(b"(" + line.encode("ascii") + b") Tj T*" for line in REPORT_APPENDIX)
    content = ContentStream(None, writer)
    content.set_data(b"BT /F1 20 Tf 28 TL %d %d Td %s ET" % (MARGIN, height - MARGIN - 20, lines))
    page.replace_contents(content)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _fax_tiff() -> bytes:
    """The fax pages made bilevel (a plain threshold, as a fax machine does) and saved as one G4 TIFF."""
    from PIL import Image

    frames = []
    for page in FAX_PAGES:
        grey = Image.open(io.BytesIO(render(page, fmt="PNG", size=DOCUMENT_PAGE_SIZE))).convert("L")
        frames.append(
            grey.point(lambda value: 255 if value > 160 else 0).convert("1", dither=Image.Dither.NONE)
        )
    out = io.BytesIO()
    frames[0].save(
        out, format="TIFF", save_all=True, append_images=frames[1:], compression="group4", dpi=(100, 100)
    )
    return out.getvalue()


def _webp(png: bytes) -> bytes:
    """The PNG's pixels as a lossless WebP."""
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).save(out, format="WEBP", lossless=True, method=6)
    return out.getvalue()


if __name__ == "__main__":
    for written_path in write_examples(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(written_path)
