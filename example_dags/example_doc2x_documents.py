"""
Parse a folder of documents as people have them, whatever their format, into storage.

The folder mixes what arrives in a records office: a PDF report, a fax as a multi-page TIFF, a phone
photo as a WebP, a PNG letter and a JPEG scan. The operator knows each file by its content (its
magic bytes), not its name, and sends it the way Doc2X takes it: a JPEG or PNG as it is through the
image API; a WebP (or BMP, GIF, one-page TIFF, HEIC) converted losslessly to PNG; a PDF as it is
through the PDF API; a multi-page TIFF packed losslessly into one PDF, every page kept (the fax's G4
pages embedded as they are). Every file is checked before anything is sent: a broken, encrypted or
oversized one fails the task, named, with nothing billed.

A PDF or a multi-page TIFF is one *document*: one record and one Markdown file, in which each page
follows its marker ``<!-- page N -->``, numbered as in the source. The ``pages`` task splits each
document's Markdown on those markers, as a chunker would. Run it twice: the second run finds every
result in storage and bills nothing.
"""

from __future__ import annotations

from pathlib import Path

from airflow.providers.common.compat.sdk import Asset, ObjectStoragePath, Param, dag, task

from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

DOCUMENTS = Path(__file__).parent / "documents"
LAKE = "file:///tmp/doc2x-documents-lake"


@dag(
    schedule=None,
    catchup=False,
    tags=["example", "doc2x"],
    params={
        "folder": Param(str(DOCUMENTS), type="string", description="Folder of documents, any format"),
        "output_path": Param(LAKE, type="string", description="Directory or URI for the results"),
    },
)
def example_doc2x_documents():
    @task
    def list_documents(params=None) -> list[str]:
        """Every file of the folder, whatever its name says: the operator knows a file by its content."""
        folder = Path(params["folder"])
        documents = sorted(
            str(path) for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")
        )
        if not documents:
            raise ValueError(f"No file in {folder}")
        return documents

    # [START howto_operator_doc2x_documents]
    parsed = Doc2XImageParseOperator(
        task_id="parse",
        image_path=list_documents(),
        output_path="{{ params.output_path }}",
        deferrable=True,
        poll_interval=1.0,
        outlets=[Asset(LAKE)],
    )
    # [END howto_operator_doc2x_documents]

    @task(multiple_outputs=False)  # one XCom, not one per source path
    def pages(records: list[dict]) -> dict[str, int]:
        """Read each record's Markdown from storage and split a document's on its page markers."""
        import re

        from airflow_provider_doc2x.pdf.results import PAGE_MARKER

        marker = re.compile(re.escape(PAGE_MARKER).replace(r"\{page\}", r"(\d+)"))
        counts = {}
        for record in records:
            markdown = ObjectStoragePath(record["markdown_path"]).read_text()
            if record.get("document"):
                parts = marker.split(markdown)  # ["", "1", page 1's Markdown, "2", page 2's, ...]
                chunks = [(int(parts[i]), parts[i + 1].strip()) for i in range(1, len(parts), 2)]
            else:
                chunks = [(1, markdown.strip())]
            fmt = record.get("source_format", "jpeg/png")  # a JPEG or PNG sent as it is has none
            travel = {"pdf": "packed into a PDF", "png": "converted to PNG"}.get(
                record.get("converted"), "as it is"
            )
            state = "reused" if record["cached"] else "parsed"
            plural = "" if len(chunks) == 1 else "s"
            print(f"{state}: {record['source']} ({fmt}, {travel}): {len(chunks)} page{plural}")
            for number, text in chunks:
                first_line = text.splitlines()[0] if text else "(blank page)"
                print(f"  page {number}: {first_line}")
            counts[record["source"]] = len(chunks)
        return counts

    pages(parsed.output)


example_doc2x_documents()
