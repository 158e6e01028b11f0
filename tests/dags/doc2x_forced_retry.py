"""A DAG whose first tries time out while Doc2X still works, so that later tries must reconnect."""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.common.compat.sdk import DAG, Param

from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

with DAG(
    "doc2x_forced_retry",
    schedule=None,
    params={"image": Param("", type="string")},
) as dag:
    Doc2XImageParseOperator(
        task_id="parse",
        image_path="{{ params.image }}",
        deferrable=True,
        poll_interval=0.1,
        timeout=0.4,
        retries=10,
        retry_delay=timedelta(seconds=0),
    )
