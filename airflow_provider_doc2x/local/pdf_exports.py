r"""The exports asked of finished PDF tasks on the local server: each uid's latest, its file, its url.

``POST /api/v2/convert/parse`` asks for an export of a task that succeeded (see
:mod:`~airflow_provider_doc2x.local.pdf_service` for its parameters); only the uid's latest export
is kept. ``GET /api/v2/convert/parse/result?uid=`` shows it ``processing`` for ``export_seconds``,
then ``success`` with a presigned GET url, ``/local/s3/objects/<uid>/convert_md_none.zip?X-Amz-...``
(its ``&`` written ``\u0026`` with ``export_url_escaped``), which serves the file while the task's
result lives. The files themselves are built by :mod:`~airflow_provider_doc2x.local.exports`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

from airflow_provider_doc2x.local.exports import (
    crop,
    docx_document,
    dollar_formulas,
    export_file_name,
    markdown_archive,
    tex_archive,
)
from airflow_provider_doc2x.local.host import Host
from airflow_provider_doc2x.local.objectstore import Presigner
from airflow_provider_doc2x.local.pdf_tasks import PROCESSING, SUCCESS, PdfTask
from airflow_provider_doc2x.local.pdfdoc import PageImage

#: The store's path of an export's file (a route, with ``uid`` and ``name``).
EXPORT_ROUTE = "/local/s3/objects/{uid}/{name}"


@dataclass
class Export:
    """A uid's latest export: what was asked, when, and its file once built."""

    uid: str
    to: str
    formula_mode: str
    stem: str
    requested: float
    file_name: str
    url: str | None = None


class PdfExports:
    """The exports of one server's PDF tasks, and the files built for them.

    Args:
        host: the server around them (its knobs).
        presigner: signs the download urls, as the store checks them.
    """

    def __init__(self, host: Host, presigner: Presigner) -> None:
        """Start with no exports."""
        self.host = host
        self.presigner = presigner
        self.start()

    def start(self) -> None:
        """Forget every export and file, and zero the count."""
        self.exports: dict[str, Export] = {}
        #: Export files by (uid, file name), for the store's GETs.
        self.files: dict[tuple[str, str], bytes] = {}
        self.counts: Counter[str] = Counter()

    def ask(self, task: PdfTask, to: str, formula_mode: str, stem: str) -> None:
        """Record an export asked of a task that succeeded, in place of its earlier one."""
        self.exports[task.uid] = Export(
            task.uid,
            to,
            formula_mode,
            stem,
            requested=time.monotonic(),
            file_name=export_file_name(to),
        )
        self.counts["exports"] += 1

    def latest(self, uid: str) -> Export | None:
        """The uid's latest export, if one was asked."""
        return self.exports.get(uid)

    async def state(self, task: PdfTask, export: Export, base_url: str) -> dict[str, str]:
        """The convert result call's ``data``: ``processing``, then ``success`` with the file's url.

        The file is built, and its url signed, the first time the export shows ``success``.
        """
        config = self.host.config
        if time.monotonic() < export.requested + config.export_seconds:
            return {"status": PROCESSING, "url": ""}
        if export.url is None:
            self.files[(task.uid, export.file_name)] = await asyncio.to_thread(self.build, task, export)
            path = EXPORT_ROUTE.format(uid=task.uid, name=export.file_name)
            export.url = self.presigner.url(base_url, "GET", path, expires=config.result_ttl)
        url = export.url.replace("&", "\\u0026") if config.export_url_escaped else export.url
        return {"status": SUCCESS, "url": url}

    def build(self, task: PdfTask, export: Export) -> bytes:
        """Build an export's file. Blocking: run it in a thread."""
        assert task.document is not None
        pages = [task.pages[index] for index in range(task.page_count)]
        markdown = "\n\n".join(page.export_md for page in pages if page.export_md)
        if export.formula_mode == "dollar":
            markdown = dollar_formulas(markdown)
        if export.to == "docx":
            return docx_document(markdown)
        images: dict[str, bytes] = {}
        for page in pages:
            if page.figures:
                image: PageImage = task.document.page(page.index)
                for name, box in page.figures.items():
                    images[name] = crop(image.data, box, 0)
        if export.to == "tex":
            return tex_archive(export.stem, markdown, images)
        return markdown_archive(export.stem, markdown, images)

    def forget(self, uid: str) -> None:
        """Forget a uid's export and its files (its task expired)."""
        self.exports.pop(uid, None)
        for key in [key for key in self.files if key[0] == uid]:
            del self.files[key]
