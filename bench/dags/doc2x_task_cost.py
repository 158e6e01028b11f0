"""
The DAG of ``bench/task_cost.py`` in a deployment: one deferrable ``Doc2XImageParseOperator`` task,
``parse``, over the images of the run's ``images`` param, polling every ``poll_interval`` seconds
(the bench's 0.25 s unless ``DOC2X_BENCH_POLL_INTERVAL`` says otherwise, read at parse time: the
operator's ``poll_interval`` is fixed when the DAG is built).

A run without the param parses no image: the DAG is only ever run by the bench.
"""

from __future__ import annotations

import os

from airflow.providers.common.compat.sdk import DAG, Param, task

from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

with DAG(
    "doc2x_task_cost",
    schedule=None,
    tags=["bench", "doc2x"],
    params={"images": Param([], type="array", description="The image paths the task parses")},
):

    @task
    def images(params=None) -> list[str]:
        return params["images"]

    Doc2XImageParseOperator(
        task_id="parse",
        image_path=images(),
        deferrable=True,
        poll_interval=float(os.environ.get("DOC2X_BENCH_POLL_INTERVAL", "0.25")),
        retries=0,
    )
