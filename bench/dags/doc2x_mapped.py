"""
The DAGs of ``bench/mapped_pool.py`` and ``bench/celery_pacing.py``: Doc2X tasks mapped over
chunks of images, sharing one key.

``doc2x_mapped_in_pool`` runs its mapped tasks in the ``doc2x`` pool, ``doc2x_mapped`` in the
default pool; both use ``doc2x_default``. ``doc2x_mapped_shared_pacing`` uses the connection
``doc2x_shared_pacing`` (the same key, paced across hosts in Redis with ``pacing_conn_id``).

The run's ``hosts`` param stands for worker hosts on one machine: each task paces its uploads with
the tasks of its own host only (its map index picks the host), as tasks on separate machines do.
``hosts`` 0 leaves each task with its worker's own ``DOC2X_PACING_DIR`` (Celery workers that each
stand for a host have one).
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.providers.common.compat.sdk import DAG, Param, task

from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator


def pace_with_own_host(context) -> None:
    params = context["params"]
    if params["hosts"] < 1:
        return
    host = context["ti"].map_index % params["hosts"]
    os.environ["DOC2X_PACING_DIR"] = os.path.join(params["pacing_dir"], f"host-{host}")


for dag_id, pool, conn_id in (
    ("doc2x_mapped_in_pool", "doc2x", "doc2x_default"),
    ("doc2x_mapped", "default_pool", "doc2x_default"),
    ("doc2x_mapped_shared_pacing", "default_pool", "doc2x_shared_pacing"),
):
    with DAG(
        dag_id,
        schedule=None,
        params={
            "chunks": Param([], type="array", description="One list of image paths per mapped task"),
            "hosts": Param(1, type="integer", description="Worker hosts to stand for (0: the workers' own)"),
            "pacing_dir": Param("/tmp/doc2x-bench-pacing", type="string"),
        },
    ):

        @task
        def chunks(params=None) -> list[list[str]]:
            return params["chunks"]

        Doc2XImageParseOperator.partial(
            task_id="parse",
            pool=pool,
            doc2x_conn_id=conn_id,
            deferrable=True,
            on_execute_callback=pace_with_own_host,
            # As in production: a new try reconnects to the uids of the last one, without paying.
            retries=2,
            retry_delay=timedelta(seconds=1),
        ).expand(image_path=chunks())
