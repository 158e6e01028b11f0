"""
The DAGs of ``bench/backfill.py``: an archive's folders through the PDF lane, one mapped task per
folder, and the same shape with tasks that do nothing (what the start of a task costs, which the
bench takes off its figures).

- ``doc2x_backfill``: ``folders`` returns the run's ``folders`` param; ``list``, mapped over them,
  lists each folder's images (:func:`~airflow_provider_doc2x.storage.listing.list_images`);
  ``parse``, mapped over the listings, is a deferrable ``Doc2XImageParseOperator(method="pdf")``
  that writes its results under the run's ``output_path`` (so XCom holds paths, not Markdown, as
  a backfill of an archive would). ``poll_interval`` is ``DOC2X_BENCH_POLL_INTERVAL`` (2 s, the
  operator's default, unless set), read at parse time: it is fixed when the DAG is built.
- ``doc2x_backfill_xcom``: the same, with the records (the Markdown in them) in XCom: what the
  lane itself costs, without writing three files per image.
- ``doc2x_backfill_empty``: ``folders``, then ``nothing`` mapped over them. Both DAGs live in this
  one file, so a task of either parses the same file when it starts.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.providers.common.compat.sdk import DAG, Param, task

from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

PARAMS = {
    "folders": Param([], type="array", description="One folder of images per mapped task"),
    "output_path": Param("/tmp/doc2x-backfill", type="string", description="Where results are written"),
}


@task
def folders(params=None) -> list[str]:
    return params["folders"]


def backfill(dag_id: str, *, files: bool) -> DAG:
    """The backfill's DAG: results under the run's ``output_path`` (``files``), or in XCom."""
    with DAG(dag_id, schedule=None, tags=["bench", "doc2x"], params=PARAMS) as dag:

        @task(task_id="list")
        def listing(folder: str) -> list[str]:
            from airflow_provider_doc2x.storage.listing import list_images

            return list_images(folder)

        Doc2XImageParseOperator.partial(
            task_id="parse",
            method="pdf",
            deferrable=True,
            output_path="{{ params.output_path }}" if files else None,
            poll_interval=float(os.environ.get("DOC2X_BENCH_POLL_INTERVAL", "2")),
            # As in production: a new try reconnects to the PDFs of the last one, without paying.
            retries=2,
            retry_delay=timedelta(seconds=1),
        ).expand(image_path=listing.expand(folder=folders()))
    return dag


backfill("doc2x_backfill", files=True)
backfill("doc2x_backfill_xcom", files=False)


with DAG("doc2x_backfill_empty", schedule=None, tags=["bench", "doc2x"], params=PARAMS):

    @task
    def nothing(folder: str) -> None:
        """Start, do nothing, end: Airflow's own cost of a task."""

    nothing.expand(folder=folders())
