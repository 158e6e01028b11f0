"""
Spend capped before it happens, and visible after: a plan, a capped parse, a usage report.

``plan`` is a dry run: it checks every image, counts what the parse would bill after the cache in
``output_path``, and returns that plan (XCom) with nothing sent. ``parse`` then sends at most
``max_pages`` pages: a run that would bill more fails before anything is sent, without retries.
``report`` reads what the parse cost (XCom key ``doc2x_usage``) and which images failed within
``allowed_failures`` (XCom key ``doc2x_failures``). The key's own cap per day is the connection
extra ``daily_page_budget``; Airflow's metrics carry the same figures as ``doc2x.*``.
"""

from __future__ import annotations

from pathlib import Path

from airflow.providers.common.compat.sdk import Param, dag, task

from airflow_provider_doc2x.failures import FAILURES_XCOM_KEY
from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator
from airflow_provider_doc2x.usage import USAGE_XCOM_KEY

IMAGES = Path(__file__).parent / "images"


@dag(
    schedule=None,
    catchup=False,
    tags=["example", "doc2x"],
    params={"output_path": Param("/tmp/doc2x-cost-lake", type="string", description="Where results go")},
)
def example_doc2x_cost_control():
    images = sorted(
        str(path) for path in IMAGES.iterdir() if path.suffix.lower() in {".png", ".jpg", ".jpeg"}
    )

    # [START howto_operator_doc2x_cost_control]
    plan = Doc2XImageParseOperator(
        task_id="plan",
        image_path=images,
        output_path="{{ params.output_path }}",
        dry_run=True,  # nothing is sent: the plan is the task's XCom
    )
    parse = Doc2XImageParseOperator(
        task_id="parse",
        image_path=images,
        output_path="{{ params.output_path }}",
        max_pages=50,  # over it, nothing is sent and the task fails without retries
        allowed_failures=0.01,  # up to 1% of the images may fail, each named
        deferrable=True,
        poll_interval=1.0,
    )
    # [END howto_operator_doc2x_cost_control]

    @task
    def report(planned: dict, ti=None) -> dict:
        usage = ti.xcom_pull(task_ids="parse", key=USAGE_XCOM_KEY)
        failures = ti.xcom_pull(task_ids="parse", key=FAILURES_XCOM_KEY) or []
        print(f"planned: {planned['pages_to_bill']} pages; billed: {usage['pages_billed']} pages")
        print(f"reused: {usage['pages_reused']} pages; failed: {len(failures)} images")
        return {"planned": planned["pages_to_bill"], **usage}

    plan >> parse  # the plan is made before anything is parsed (else it would find the results)
    report(plan.output) << parse


example_doc2x_cost_control()
