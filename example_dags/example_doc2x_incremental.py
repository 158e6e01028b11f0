"""
Every day, parse the images that arrived in a folder or bucket prefix, then start the DAGs that use them.

The DAG to copy for a prefix that only grows (``s3://bucket/scans/``, ``gs://...``, a folder):

1. ``list_new`` lists the prefix once (:func:`airflow_provider_doc2x.storage.listing.list_new_images`): the
   images stored since the last successful run's data interval ended (less an hour of look-back for
   uploads still in flight then) until this run's ended; every image on the first run. It hands
   them on in batches.
2. ``parse`` is mapped over the batches with ``incremental=True``: an image already parsed and
   unchanged (the look-back lists a few twice; a cleared run lists them all again) is not even
   read, and a renamed copy is read but not billed. Results land under ``output_path``.
3. ``publish`` emits the ``MARKDOWN`` Asset, the new Markdown paths in the event's extra. That
   starts ``example_doc2x_incremental_index`` (``schedule=[MARKDOWN]``: data-aware scheduling),
   which stands for an index or embedding step and reads the files the events name. No new image:
   no event, no downstream run.

``catchup=False``: the window reaches back to the last *successful* run, so a failed day or a
paused week is covered by the next run, without one run per missed day. ``max_active_runs=1``
keeps the windows in order (overlapping runs would be safe, the manifest would skip what is known,
but pointless).
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.providers.common.compat.sdk import (
    AirflowSkipException,
    Asset,
    ObjectStoragePath,
    Param,
    dag,
    task,
)

from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator
from airflow_provider_doc2x.storage.listing import list_new_images

IMAGES = Path(__file__).parent / "images"
LAKE = "file:///tmp/doc2x-incremental/lake"
#: The parsed Markdown, as downstream DAGs see it: set it to your output_path's URI.
MARKDOWN = Asset(LAKE)
#: Images per mapped parse task.
BATCH = 50
START = pendulum.datetime(2026, 1, 1, tz="UTC")


@dag(
    schedule="@daily",
    start_date=START,
    catchup=False,
    max_active_runs=1,
    tags=["example", "doc2x"],
    params={
        "prefix": Param(str(IMAGES), type="string", description="Folder or URI whose new images to parse"),
        "output_path": Param(LAKE, type="string", description="Directory or URI for the results"),
    },
)
def example_doc2x_incremental():
    @task
    def list_new(params=None, **context) -> list[list[str]]:
        """The images stored since the last successful run, in batches (none: the parse is skipped)."""
        images = list_new_images(params["prefix"], context)
        print(f"new images: {len(images)}")
        return [images[start : start + BATCH] for start in range(0, len(images), BATCH)]

    # [START howto_operator_doc2x_incremental]
    parsed = Doc2XImageParseOperator.partial(
        task_id="parse",
        output_path="{{ params.output_path }}",
        incremental=True,  # unchanged images are not read; their records come from the manifest
        deferrable=True,
        poll_interval=1.0,
    ).expand(image_path=list_new())
    # [END howto_operator_doc2x_incremental]

    @task(outlets=[MARKDOWN])
    def publish(batches: list[list[dict]], *, outlet_events=None) -> list[str]:
        """One Asset event carrying the Markdown parsed in this run (none new: no event)."""
        records = [record for number in range(len(batches)) for record in batches[number]]
        new = [record["markdown_path"] for record in records if not record["cached"]]
        if not new:
            raise AirflowSkipException("No image was parsed in this run: no asset event")
        outlet_events[MARKDOWN].extra = {"markdown_paths": new}
        print(f"published: {len(new)} Markdown files")
        return new

    publish(parsed.output)


@dag(schedule=[MARKDOWN], start_date=START, catchup=False, tags=["example", "doc2x"])
def example_doc2x_incremental_index():
    @task(inlets=[MARKDOWN], multiple_outputs=False)  # one XCom, not one per path
    def index(**context) -> dict[str, int]:
        """
        Stand-in for an index or embedding step: reads each new Markdown file the events name (those
        that started this run; a manual run takes the latest event).
        """
        triggering = context.get("triggering_asset_events") or context.get("triggering_dataset_events") or {}
        events = [event for asset_events in triggering.values() for event in asset_events]
        if not events:
            events = list(context["inlet_events"][MARKDOWN])[-1:]
        paths = [path for event in events for path in (event.extra or {}).get("markdown_paths", [])]
        words = {path: len(ObjectStoragePath(path).read_text().split()) for path in paths}
        for path, count in words.items():
            print(f"indexed: {path} ({count} words)")
        return words

    index()


example_doc2x_incremental()
example_doc2x_incremental_index()
