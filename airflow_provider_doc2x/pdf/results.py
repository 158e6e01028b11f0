"""A PDF's result as each image's: its page picked by ``page_idx``, its figures kept, its links rewritten.

The PDF lane packs many images into one PDF; Doc2X answers one result for the PDF, a page per
image. This module turns that result back into what the image lanes give: one record per image
(its page's Markdown in XCom, or its folder under ``output_path``: see
:mod:`airflow_provider_doc2x.storage.results`).

Figures. A PDF result's Markdown links each figure to Doc2X's CDN
(``<img src="https://cdn.noedgeai.com/<uid>_<page_idx>.jpg?x=..&y=..&w=..&h=..&r=0"/>``), and those
links die with the result (24 h). With ``output_path``, each image's figures are stored beside its
Markdown and its links rewritten to them (``images/<uid>_<page_idx>_<x>_<y>_<w>_<h>_<r>.jpg``):

1. The PDF's Markdown export (one per PDF, only when one of its pages links a figure): the zip is
   downloaded (only from the hosts the PDF API's files live on, or the connection's own host, and
   capped), unpacked safely (:func:`~airflow_provider_doc2x.storage.archives.unpack_figures`), and each
   link matched to the zip's file by its name, or by its page and box at the end of the name
   (the zip's naming is not documented).
2. A link the export did not answer is downloaded itself (same host rule and cap).
3. A figure that neither gives keeps its link, with a warning in the log and the sidecar; the
   Markdown is written and the task goes on, as with the image lane's ``convert_zip``.

In XCom (no ``output_path``) the Markdown keeps Doc2X's links: they work for 24 hours.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import html
import logging
import posixpath
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import LANE_PDF, is_document, source_keys_of
from airflow_provider_doc2x.exceptions import Doc2XError
from airflow_provider_doc2x.storage.archives import MAX_ZIP_BYTES, MAX_ZIP_ENTRIES, Figures, unpack_figures

if TYPE_CHECKING:
    from airflow_provider_doc2x.pdf.submission import PdfCalls
    from airflow_provider_doc2x.storage.results import ResultStore

log = logging.getLogger(__name__)


#: The fixed text of an image whose PDF's result does not map back to the packed pages.
PAGE_MAP_MISMATCH = (
    "its PDF's result does not have one page per packed image, so no page is taken (a protocol error)"
)
#: The folder of a result where a PDF-lane image's figures go (as the image lane's zips have it).
FIGURES_FOLDER = "images"
#: Images of one PDF written to storage at once.
WRITES_IN_FLIGHT = 4
#: A figure link: an ``<img src=...>`` or a Markdown image, its target in group 2.
_LINK = re.compile(r"""(<img\s[^>]*?src=["']|!\[[^\]]*\]\()([^"')\s]+)""")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_BOX = ("x", "y", "w", "h", "r")


def page_map_problem(entries: list[dict[str, Any]], status: protocol.Doc2XJobStatus) -> str | None:
    """Why a PDF's result does not map back to the images packed into it, or None when it does.

    The result must have as many pages as the PDF (``pages`` of its jobs), and a page for every
    ``page_idx`` the jobs name; a document's, each of its pages once. Other jobs without
    ``page_idx`` stand for the whole PDF (the sensor's): nothing to map.
    """
    head = entries[0]
    if status.result is None:
        return None
    if is_document(head):
        # A document's result must hold each of its pages once: page_idx 0 to pages - 1.
        expected = head.get("pages")
        numbered = sorted(page.page_idx for page in status.result.pages)
        if expected is not None and numbered != list(range(expected)):
            return f"its result has {len(numbered)} pages ({_span(numbered)}), the document {expected}"
        return None
    if head.get("page_idx") is None:
        return None
    pages = status.result.pages
    expected = head.get("pages")
    if expected is not None and len(pages) != expected:
        return f"its result has {len(pages)} pages, the PDF {expected}"
    indices = {page.page_idx for page in pages}
    missing = sorted({entry["page_idx"] for entry in entries} - indices)
    if missing:
        return f"its result has no page_idx {', '.join(map(str, missing[:10]))}"
    return None


def _span(indices: list[int]) -> str:
    if not indices:
        return "none"
    return f"page_idx {indices[0]} to {indices[-1]}" + (
        ", some twice" if len(set(indices)) < len(indices) else ""
    )


#: The marker before each page of a document's Markdown: an HTML comment, invisible when rendered,
#: that a reader or a chunker splits on (``page`` counts from 1, as the source's pages do).
PAGE_MARKER = "<!-- page {page} -->"


def document_markdown(pages: Sequence[protocol.Doc2XPage]) -> str:
    """A document's Markdown: its pages in order, each after its marker (:data:`PAGE_MARKER`)."""
    ordered = sorted(pages, key=lambda page: page.page_idx)
    return "\n\n".join(f"{PAGE_MARKER.format(page=page.page_idx + 1)}\n\n{page.md}" for page in ordered)


def document_record(entry: dict[str, Any], result: protocol.Doc2XResult) -> dict[str, Any]:
    """What XCom holds for a document kept whole: every page with its number in the source, the marked Markdown."""
    ordered = sorted(result.pages, key=lambda page: page.page_idx)
    return {
        "source": entry["source"],
        "uid": result.uid,
        "sha256": entry.get("sha256"),
        "document": True,
        "pages": [{"page": page.page_idx + 1, **page.to_dict()} for page in ordered],
        "markdown": document_markdown(ordered),
        "has_figures": bool(figure_links(result.markdown)),
        **source_keys_of(entry),
    }


def figure_links(markdown: str) -> list[str]:
    """The absolute http(s) links of a page's figures, in order, each once (as written: maybe ``&amp;``)."""
    seen: dict[str, None] = {}
    for match in _LINK.finditer(markdown):
        target = match.group(2)
        if target.lower().startswith(("https://", "http://")):
            seen.setdefault(target, None)
    return list(seen)


def figure_name(url: str, page_idx: int | None = None) -> str:
    """The file name a figure link is stored under, of plain characters only.

    ``<name>_<x>_<y>_<w>_<h>_<r>.jpg`` for a crop of a page image (what Doc2X's export names it),
    ``<name>.jpg`` for a whole image, and a short hash of the link for any other query.
    """
    parts = urlsplit(url)
    base = posixpath.basename(parts.path) or "figure"
    stem, suffix = posixpath.splitext(base)
    suffix = suffix.lower() if suffix.lower() in _IMAGE_SUFFIXES else ".jpg"
    stem = _UNSAFE.sub("_", stem)[:80].strip("._") or (
        f"page_{page_idx}" if page_idx is not None else "figure"
    )
    box = _box(parts.query)
    if box is not None:
        return f"{stem}_{'_'.join(map(str, box))}{suffix}"
    if parts.query:
        return f"{stem}_{hashlib.sha256(url.encode()).hexdigest()[:10]}{suffix}"
    return f"{stem}{suffix}"


def _box(query: str) -> tuple[int, ...] | None:
    values = parse_qs(query)
    try:
        return tuple(int(values[key][0]) for key in _BOX)
    except (KeyError, ValueError, IndexError):
        return None


class PdfFigures:
    """The figures of one PDF's pages: from its Markdown export, else each linked file downloaded.

    The export is asked for once, when a page first needs it.

    :param calls: the PDF API's calls on the task's connection (``hook.pdf``: they check hosts and cap sizes).
    :param uid: the PDF's uid.
    :param max_entries: most entries of the export zip.
    :param max_bytes: most bytes unpacked from it.
    """

    def __init__(
        self,
        calls: PdfCalls,
        uid: str,
        *,
        max_entries: int = MAX_ZIP_ENTRIES,
        max_bytes: int = MAX_ZIP_BYTES,
    ) -> None:
        """Nothing is asked until a page with figures comes."""
        self.calls = calls
        self.uid = uid
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._export: asyncio.Future[dict[str, bytes]] | None = None
        self.export_warnings: list[str] = []

    async def exported(self) -> dict[str, bytes]:
        """The export zip's image files by base name (empty when the export failed: said in the warnings)."""
        if self._export is None:
            self._export = asyncio.ensure_future(self._fetch_export())
        return await asyncio.shield(self._export)

    async def _fetch_export(self) -> dict[str, bytes]:
        try:
            url = await self.calls.aexport_markdown(self.uid)
            data = await self.calls.adownload(url)
        except Doc2XError as error:
            self.export_warnings.append(
                f"the Markdown export of PDF {self.uid} failed ({error.summary}, code {error.failure_code}); "
                "its figures are downloaded from their links instead"
            )
            log.warning("%s: %s", self.export_warnings[-1], error)
            return {}
        # The same safe unpacking as the image lane's convert_zip (which comes as base64).
        figures = await asyncio.to_thread(
            unpack_figures,
            base64.b64encode(data).decode(),
            source=f"the export of PDF {self.uid}",
            max_entries=self.max_entries,
            max_bytes=self.max_bytes,
        )
        self.export_warnings.extend(figures.warnings)
        return {
            posixpath.basename(path): content
            for path, content in figures.files.items()
            if path.lower().endswith(_IMAGE_SUFFIXES)
        }

    async def page(self, page: protocol.Doc2XPage) -> tuple[str, Figures]:
        """The page's Markdown with its figure links pointing at stored files, and those files."""
        links = figure_links(page.md)
        figures = Figures()
        if not links:
            return page.md, figures
        exported = await self.exported()
        figures.warnings.extend(self.export_warnings)
        targets: dict[str, str] = {}
        for link in links:
            url = html.unescape(link)
            name = figure_name(url, page.page_idx)
            data = exported.get(name) or _by_box(exported, name, page.page_idx)
            if data is None:
                try:
                    data = await self.calls.adownload(url)
                except Doc2XError as error:
                    figures.warnings.append(
                        f"figure {protocol.redact_url(url)} of PDF {self.uid} page {page.page_idx} could not be "
                        f"downloaded ({error.summary}, code {error.failure_code}); its link is kept"
                    )
                    log.warning("%s: %s", figures.warnings[-1], error)
                    continue
            path = f"{FIGURES_FOLDER}/{name}"
            figures.files[path] = data
            targets[link] = path
        markdown = _LINK.sub(
            lambda match: match.group(1) + targets.get(match.group(2), match.group(2)), page.md
        )
        return markdown, figures


def _by_box(exported: dict[str, bytes], name: str, page_idx: int) -> bytes | None:
    """The export's file for a crop whose name ends with the same page and box, if exactly one does."""
    stem, _ = posixpath.splitext(name)
    box = stem.split("_")[-5:]
    if len(box) != 5 or not all(part.lstrip("-").isdigit() for part in box):
        return None
    ending = "_" + "_".join([str(page_idx), *box])
    found = [data for key, data in exported.items() if posixpath.splitext(key)[0].endswith(ending)]
    return found[0] if len(found) == 1 else None


def page_record(
    source: str, digest: str | None, result: protocol.Doc2XResult, *, page_idx: int | None = None
) -> dict[str, Any]:
    """What XCom holds for a PDF-lane image kept whole (or a whole PDF, without ``page_idx``).

    Its page(s) and Markdown, whose figure links point at Doc2X's CDN (they work for 24 hours).
    """
    record: dict[str, Any] = {
        "source": source,
        "uid": result.uid,
        "sha256": digest,
        "pages": [
            {"page": 1 if page_idx is not None else page.page_idx + 1, **page.to_dict()}
            for page in result.pages
        ],
        "markdown": result.markdown,
        "has_figures": bool(figure_links(result.markdown)),
    }
    if page_idx is not None:
        record["page_idx"] = page_idx
    return record


async def pdf_records(
    calls: PdfCalls,
    results: ResultStore | None,
    status: protocol.Doc2XJobStatus,
    entries: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Each image's record from its PDF's finished status, in the order of ``entries`` (one uid's jobs).

    An image whose page is missing comes back as its failed job.

    Without ``results`` the record holds the page (XCom); with it, each content is written once
    (its figures fetched, see :class:`PdfFigures`) and the record holds its paths.
    """
    whole = status.result
    assert whole is not None
    pages = {page.page_idx: page for page in whole.pages}
    figures = PdfFigures(calls, status.uid) if results is not None else None
    turns = asyncio.Semaphore(WRITES_IN_FLIGHT)
    written: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def write(entry: dict[str, Any], page: protocol.Doc2XPage) -> dict[str, Any]:
        assert results is not None
        assert figures is not None
        async with turns:
            markdown, files = await figures.page(page)
            result = protocol.Doc2XResult(status.uid, (dataclasses.replace(page, md=markdown),))
            return await asyncio.to_thread(
                results.write,
                entry["source"],
                entry["sha256"],
                result,
                figures=files,
                extra={"lane": LANE_PDF, "page_idx": page.page_idx},
            )

    async def write_document(entry: dict[str, Any]) -> dict[str, Any]:
        """A document's pages, their figures stored and links rewritten, in one folder with its marked Markdown."""
        assert results is not None
        assert figures is not None
        async with turns:
            pages, files = [], Figures()
            for page in sorted(whole.pages, key=lambda page: page.page_idx):
                markdown, found = await figures.page(page)
                files.files.update(found.files)
                files.warnings.extend(warning for warning in found.warnings if warning not in files.warnings)
                pages.append(dataclasses.replace(page, md=markdown))
            return await asyncio.to_thread(
                results.write,
                entry["source"],
                entry["sha256"],
                protocol.Doc2XResult(status.uid, tuple(pages)),
                figures=files,
                extra={"lane": LANE_PDF, **source_keys_of(entry), "document": True},
                markdown=document_markdown(pages),
            )

    async def one(entry: dict[str, Any]) -> dict[str, Any]:
        source, digest = entry["source"], entry.get("sha256")
        page_idx = entry.get("page_idx")
        if is_document(entry):
            if results is None or not digest:
                return document_record(entry, whole)
            if digest not in written:
                written[digest] = asyncio.ensure_future(write_document(entry))
            return {**await asyncio.shield(written[digest]), "source": source}
        if page_idx is None:  # a whole PDF (the sensor's)
            return page_record(source, digest, whole)
        page = pages.get(page_idx)
        if page is None:
            return {
                **entry,
                "status": protocol.STATUS_FAILED,
                "code": "protocol_error",
                "message": PAGE_MAP_MISMATCH,
            }
        if results is None or not digest:
            return page_record(source, digest, protocol.Doc2XResult(status.uid, (page,)), page_idx=page_idx)
        if digest not in written:
            written[digest] = asyncio.ensure_future(write(entry, page))
        record = await asyncio.shield(written[digest])
        return {**record, "source": source, "page_idx": page_idx}

    return list(await asyncio.gather(*(one(entry) for entry in entries)))
