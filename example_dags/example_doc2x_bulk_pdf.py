"""
Parse a large folder of document images through Doc2X's PDF API: the bulk lane.

Doc2X's image API takes 30 images per 30 seconds per key, and the vendor says that cannot be
raised; for large batches it points to its PDF API instead. With ``method="pdf"`` the operator packs
the images (grouped by aspect ratio, losslessly: a JPEG is embedded byte for byte) into PDFs of up
to ``pdf_max_pages`` pages, keeps a few PDFs in flight (the connection's ``pdf_max_in_flight`` and
``pdf_max_pages_in_flight``), and maps each PDF's pages back to the images. Each image still costs
one page of quota, and the records, the storage layout under ``output_path``, the cache and the
lineage are those of the image lanes; each record also names the image's ``page_idx`` in its PDF
(whose uid is the record's ``uid``).

The task defers while Doc2X works and comes back to submit the next PDFs; a PDF that fails as a
whole has its images tried again in smaller PDFs, then through the image lane (the log says they
may be billed again). Figures are fetched through the PDF's Markdown export and stored beside each
image's Markdown, so that no link points at Doc2X's CDN (whose links die within 24 hours).
"""

from __future__ import annotations

from pathlib import Path

from airflow.providers.common.compat.sdk import Asset, ObjectStoragePath, Param, dag, task

from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

IMAGES = Path(__file__).parent / "images"
LAKE = "file:///tmp/doc2x-bulk-lake"


@dag(
    schedule=None,
    catchup=False,
    tags=["example", "doc2x"],
    params={
        "folder": Param(str(IMAGES), type="string", description="Folder of JPEG/PNG images"),
        "output_path": Param(LAKE, type="string", description="Directory or URI for the results"),
    },
)
def example_doc2x_bulk_pdf():
    @task
    def list_images(params=None) -> list[str]:
        folder = Path(params["folder"])
        images = sorted(
            str(path) for path in folder.iterdir() if path.suffix.lower() in {".png", ".jpg", ".jpeg"}
        )
        if not images:
            raise ValueError(f"No .png/.jpg/.jpeg image in {folder}")
        return images

    # [START howto_operator_doc2x_bulk_pdf]
    parsed = Doc2XImageParseOperator(
        task_id="parse",
        image_path=list_images(),
        output_path="{{ params.output_path }}",
        method="pdf",
        pdf_max_pages=200,
        deferrable=True,
        poll_interval=2.0,
        outlets=[Asset(LAKE)],
    )
    # [END howto_operator_doc2x_bulk_pdf]

    @task(multiple_outputs=False)  # one XCom, not one per source path
    def report(records: list[dict]) -> dict[str, int]:
        """Read each image's Markdown from storage, and say where each came from."""
        words = {}
        for record in records:
            markdown = ObjectStoragePath(record["markdown_path"]).read_text()
            words[record["source"]] = len(markdown.split())
            where = (
                f"page {record['page_idx']} of PDF {record['uid']}"
                if "page_idx" in record
                else f"image job {record['uid']}"
            )
            state = "reused" if record["cached"] else "parsed"
            print(
                f"{state}: {record['source']} ({where}) -> {record['markdown_path']} "
                f"({len(record['figure_paths'])} figures)"
            )
        return words

    report(parsed.output)


example_doc2x_bulk_pdf()
