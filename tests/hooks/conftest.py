"""The hook's PDF tests share one server set-up and their PDFs."""

from __future__ import annotations

import pytest

from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.pdf.packing import pack_images


@pytest.fixture
def pages(tmp_path):
    """Write JPEG pages with known titles (the local engine answers their Markdown); return their paths."""

    def write(*titles: str, size=(400, 300)):
        paths = []
        for title in titles:
            path = tmp_path / f"{title.replace(' ', '-')}.jpg"
            path.write_bytes(render(Page(title=title), fmt="JPEG", size=size))
            paths.append(path)
        return paths

    return write


@pytest.fixture
def packed(pages):
    """Pack pages with these titles into one PDF; return it (cleaned up after the test)."""
    results = []

    def pack(*titles: str):
        result = pack_images(pages(*titles))
        results.append(result)
        (pdf,) = result.pdfs
        return pdf

    yield pack
    for result in results:
        result.cleanup()


@pytest.fixture
def two_page_pdf(packed):
    """A PDF of two pages packed from rendered images."""
    return packed("Page One", "Page Two")
