"""
Parse every JPEG/PNG of a folder into Markdown, one mapped Doc2X task per image.

All mapped tasks share the key of ``doc2x_default``: each hook paces its own uploads to the key's
limit; to keep many workers together under it, run the mapped tasks in a pool (see docs/production.md).
"""

from __future__ import annotations

from pathlib import Path

from airflow.providers.common.compat.sdk import Param, dag, task

from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

IMAGES = Path(__file__).parent / "images"


@dag(
    schedule=None,
    catchup=False,
    tags=["example", "doc2x"],
    params={
        "folder": Param(str(IMAGES), type="string", description="Folder of JPEG/PNG images"),
        "markdown_dir": Param("/tmp/doc2x-markdown", type="string", description="Where to save the Markdown"),
    },
)
def example_doc2x_parse_folder():
    @task
    def list_images(params=None) -> list[str]:
        folder = Path(params["folder"])
        images = sorted(
            str(path) for path in folder.iterdir() if path.suffix.lower() in {".png", ".jpg", ".jpeg"}
        )
        if not images:
            raise ValueError(f"No .png/.jpg/.jpeg image in {folder}")
        return images

    # [START howto_operator_doc2x_parse_folder]
    parsed = Doc2XImageParseOperator.partial(
        task_id="parse",
        doc2x_conn_id="doc2x_default",
        deferrable=True,
        poll_interval=1.0,
    ).expand(image_path=list_images())
    # [END howto_operator_doc2x_parse_folder]

    @task
    def save_markdown(results: list[list[dict]], params=None) -> list[str]:
        folder = Path(params["markdown_dir"])
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for records in results:
            for record in records:
                path = folder / f"{Path(record['source']).stem}.md"
                path.write_text(record["markdown"], encoding="utf-8")
                print(f"Markdown of {record['source']} (Doc2X uid {record['uid']}) is in {path}")
                written.append(str(path))
        return written

    save_markdown(parsed.output)


example_doc2x_parse_folder()
