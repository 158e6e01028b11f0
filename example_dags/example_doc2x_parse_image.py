"""
Parse one document image into Markdown with Doc2X, waiting in the triggerer (no worker held).

Uses the ``doc2x_default`` connection; point it at the local server for a try without a key::

    python -m airflow_provider_doc2x.local --port 8765 &
    export AIRFLOW_CONN_DOC2X_DEFAULT='{"conn_type": "doc2x", "host": "http://127.0.0.1:8765", "password": "sk-local"}'
    airflow dags test example_doc2x_parse_image
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
        "image": Param(str(IMAGES / "invoice.png"), type="string", description="Path or URI of a JPEG/PNG"),
        "markdown_dir": Param("/tmp/doc2x-markdown", type="string", description="Where to save the Markdown"),
    },
)
def example_doc2x_parse_image():
    # [START howto_operator_doc2x_parse_image]
    parse = Doc2XImageParseOperator(
        task_id="parse",
        image_path="{{ params.image }}",
        doc2x_conn_id="doc2x_default",
        deferrable=True,
        poll_interval=1.0,
        timeout=600,
    )
    # [END howto_operator_doc2x_parse_image]

    @task
    def save_markdown(records: list[dict], params=None) -> list[str]:
        """Write each image's Markdown beside the others, and say where."""
        folder = Path(params["markdown_dir"])
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for record in records:
            path = folder / f"{Path(record['source']).stem}.md"
            path.write_text(record["markdown"], encoding="utf-8")
            print(f"Markdown of {record['source']} (Doc2X uid {record['uid']}) is in {path}")
            written.append(str(path))
        return written

    save_markdown(parse.output)


example_doc2x_parse_image()
