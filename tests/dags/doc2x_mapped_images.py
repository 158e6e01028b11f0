"""One Doc2X task per list of images (``.partial().expand()``), the conn id rendered from a template."""

from __future__ import annotations

from airflow.providers.common.compat.sdk import DAG, Param, task

from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

with DAG(
    "doc2x_mapped_images",
    schedule=None,
    params={"chunks": Param([], type="array", description="One list of image paths per mapped task")},
) as dag:

    @task
    def chunks(params=None) -> list[list[str]]:
        return params["chunks"]

    Doc2XImageParseOperator.partial(
        task_id="parse",
        poll_interval=0.1,
        deferrable=True,
        doc2x_conn_id="{{ 'doc2x_' ~ 'default' }}",
    ).expand(image_path=chunks())
