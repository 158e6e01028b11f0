"""
The DAG the single-task benches run with ``airflow dags test`` (``bench/_airflow.py``): one
``Doc2XImageParseOperator`` task, ``parse``, built from the JSON spec file named by
``DOC2X_BENCH_SPEC``.

The spec is read when the file is parsed (in the ``airflow dags test`` process, which runs the task
too), because the operator's non-templated arguments (``deferrable``, ``method``, ...) are fixed
when the DAG is built, as in a user's DAG file:

- ``operator``: the operator's keyword arguments (``image_path``, ``deferrable``, ``method``,
  ``output_path``, ``incremental``, ``poll_interval``, ...);
- ``prefix`` (optional): a folder or ``ObjectStoragePath`` URI that an upstream task, ``list``,
  lists with :func:`airflow_provider_doc2x.storage.listing.list_images`; its XCom is the ``parse`` task's
  ``image_path``, as in a daily DAG over a bucket prefix.

Without ``DOC2X_BENCH_SPEC`` (a deployment's dag-processor parsing ``bench/dags``) the DAG parses
with no image and is never run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from airflow.providers.common.compat.sdk import DAG, task

from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

SPEC = (
    json.loads(Path(os.environ["DOC2X_BENCH_SPEC"]).read_text()) if "DOC2X_BENCH_SPEC" in os.environ else {}
)

with DAG("doc2x_bench", schedule=None, tags=["bench", "doc2x"]):
    arguments = dict(SPEC.get("operator", {"image_path": []}))
    if SPEC.get("prefix"):

        @task(task_id="list")
        def listing(prefix: str) -> list[str]:
            from airflow_provider_doc2x.storage.listing import list_images

            images = list_images(prefix)
            print(f"listed: {len(images)} images")
            return images

        arguments["image_path"] = listing(SPEC["prefix"])
    Doc2XImageParseOperator(task_id="parse", retries=0, **arguments)
