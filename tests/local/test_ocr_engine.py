"""
The offline OCR engine reads the pixels of pages whose text is known: character error rate at most
2% on a clean page and 1% to 3% on scanned-looking ones, with the headings (words kept apart), the
paragraphs, the table and the figure found. Skipped when the ``ocr`` extra is not installed
(``.ci/run`` installs it on the newest Airflow line).
"""

from __future__ import annotations

import io
import re
import socket
import zipfile

import pytest

pytest.importorskip("rapidocr", reason="the ocr extra is not installed")

from airflow_provider_doc2x.local.samples import EXAMPLE_PAGES, TEST_PAGES, Page, render


def known_text(page: Page) -> str:
    """The page's words in reading order: each heading and its paragraphs, then the table's cells."""
    sections = [text for section in page.outline for text in (section.heading, *section.paragraphs)]
    return " ".join([*sections, *(cell for row in page.table for cell in row)])


def plain(markdown: str) -> str:
    """The words of the Markdown, without its syntax, in one line."""
    text = re.sub(r"<!-- Media -->|<img[^>]*>|^#+ |\|---.*$", " ", markdown, flags=re.MULTILINE)
    return " ".join(text.replace("|", " ").split())


def character_error_rate(expected: str, got: str) -> float:
    """Levenshtein distance over the expected length (spaces folded)."""
    expected, got = " ".join(expected.split()), " ".join(got.split())
    previous = list(range(len(got) + 1))
    for i, wanted in enumerate(expected, start=1):
        current = [i]
        for j, seen in enumerate(got, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (wanted != seen)))
        previous = current
    return previous[-1] / len(expected)


@pytest.fixture(scope="module")
def engine():
    from airflow_provider_doc2x.local.ocr import OcrEngine

    return OcrEngine()


def test_models_load_and_run_without_the_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the ocr engine tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    from airflow_provider_doc2x.local.ocr import OcrEngine

    result = OcrEngine().parse(render(EXAMPLE_PAGES["letter.png"]), "uid-offline")
    assert "Letter" in result.pages[0].md


@pytest.mark.parametrize(("name", "limit"), [("invoice.png", 0.02), ("scan.jpg", 0.01)])
def test_character_error_rate_heading_and_table(engine, name, limit):
    page = EXAMPLE_PAGES[name]
    image = render(page, fmt="JPEG" if name.endswith(".jpg") else "PNG")
    markdown = engine.parse(image, "uid-1").pages[0].md
    error_rate = character_error_rate(known_text(page), plain(markdown))
    assert error_rate <= limit, f"CER {error_rate:.3f} over {limit} for {name}:\n{markdown}"
    assert markdown.splitlines()[0] == f"# {page.title}"
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == len(page.table) + 1  # header, rule, rows
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == page.table[0]


def test_a_scanned_page_of_several_sections_keeps_its_headings_and_paragraphs(engine):
    page = TEST_PAGES["memo.jpg"]
    image = render(page, fmt="JPEG")
    from PIL import Image

    # The Markdown the simple engine answers for this page, from the JPEG's comment.
    expected = Image.open(io.BytesIO(image)).info["comment"].decode().split("\n\n")
    assert expected == [
        text for section in page.outline for text in (f"# {section.heading}", *section.paragraphs)
    ]
    markdown = engine.parse(image, "uid-3").pages[0].md
    error_rate = character_error_rate(known_text(page), plain(markdown))
    assert error_rate < 0.03, f"CER {error_rate:.3f} for the memo:\n{markdown}"
    blocks = markdown.split("\n\n")
    assert [block for block in blocks if block.startswith("# ")] == [
        f"# {section.heading}" for section in page.outline
    ]
    assert [block.startswith("# ") for block in blocks] == [text.startswith("# ") for text in expected]


def test_a_figure_is_cropped_into_convert_zip_and_linked(engine):
    from airflow_provider_doc2x.local.image_service import convert_zip

    result = engine.parse(render(EXAMPLE_PAGES["report.jpg"], fmt="JPEG"), "uid-2")
    assert len(result.figures) == 1
    (name,) = result.figures
    assert f'<img src="{name}"/>' in result.pages[0].md
    archive = zipfile.ZipFile(io.BytesIO(__import__("base64").b64decode(convert_zip(result.figures))))
    assert archive.namelist() == [f"images/{name}"]
    assert archive.read(f"images/{name}").startswith(b"\xff\xd8\xff")
