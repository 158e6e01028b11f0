"""
Parse a folder of document images into storage, then hand the Markdown paths to a downstream task.

Each image gets a folder under ``output_path`` with its Markdown, its figures (links resolve) and
a JSON sidecar; XCom carries only paths. Run it twice: the second run finds every result in storage
and submits nothing (set ``overwrite=True`` to parse again). ``output_path`` may be any
ObjectStoragePath URI (``s3://bucket/lake/doc2x``, ``gs://...``, ``file:///...``) or a directory.
"""

from __future__ import annotations

from pathlib import Path

from airflow.providers.common.compat.sdk import Asset, ObjectStoragePath, Param, dag, task

from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

IMAGES = Path(__file__).parent / "images"
LAKE = "file:///tmp/doc2x-lake"


@dag(
    schedule=None,
    catchup=False,
    tags=["example", "doc2x"],
    params={
        "folder": Param(str(IMAGES), type="string", description="Folder of JPEG/PNG images"),
        "output_path": Param(LAKE, type="string", description="Directory or URI for the results"),
    },
)
def example_doc2x_parse_to_storage():
    @task
    def list_images(params=None) -> list[str]:
        folder = Path(params["folder"])
        return sorted(
            str(path) for path in folder.iterdir() if path.suffix.lower() in {".png", ".jpg", ".jpeg"}
        )

    # [START howto_operator_doc2x_parse_to_storage]
    parsed = Doc2XImageParseOperator(
        task_id="parse",
        image_path=list_images(),
        output_path="{{ params.output_path }}",
        deferrable=True,
        poll_interval=1.0,
        outlets=[Asset(LAKE)],
    )
    # [END howto_operator_doc2x_parse_to_storage]

    @task(multiple_outputs=False)  # one XCom, not one per source path
    def index(records: list[dict]) -> dict[str, int]:
        """A downstream consumer: read each Markdown file from storage by the path in XCom."""
        words = {}
        for record in records:
            markdown = ObjectStoragePath(record["markdown_path"]).read_text()
            words[record["source"]] = len(markdown.split())
            state = "reused" if record["cached"] else "parsed"
            print(
                f"{state}: {record['source']} -> {record['markdown_path']} ({len(record['figure_paths'])} figures)"
            )
        return words

    index(parsed.output)


example_doc2x_parse_to_storage()
