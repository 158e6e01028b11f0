"""
A manual clear in a real Airflow 3.3 deployment (LocalExecutor, API server, scheduler,
dag-processor and triggerer as their own processes): the task is cleared through the REST API, as
the UI's Clear button does, while Doc2X is still processing its jobs. The clear keeps the task
state store, so the new try reconnects to the recorded jobs and nothing is uploaded or billed again.
"""

from __future__ import annotations

import re

import pytest

from airflow_provider_doc2x.journal import STATE_KEY_PREFIX, recorded_images
from tests.helpers import HAS_TASK_STATE_STORE, STILL_PROCESSING, wait_until
from tests.helpers.deployment import Deployment

pytestmark = [
    pytest.mark.serial,
    pytest.mark.xdist_group("deployments"),
    pytest.mark.skipif(
        not HAS_TASK_STATE_STORE, reason="a clear keeps the task state store from Airflow 3.3 on"
    ),
]

DAG_ID = "example_doc2x_parse_to_storage"
PAGES = 4  # the example images


@pytest.fixture(scope="module")
def deployment(local_server, tmp_path_factory):
    airflow = Deployment(tmp_path_factory.mktemp("deployment-clear"), local_server.connection_json())
    yield airflow
    airflow.stop()


def recorded_uids(deployment: Deployment, run_id: str) -> dict[str, str]:
    """The uid each image's content has in the parse task's state store, read through the REST API."""
    answer = deployment.api.get(
        f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/parse/state-store", params={"limit": 100}
    )
    answer.raise_for_status()
    stored = {entry["key"]: entry["value"] for entry in answer.json()["task_state_store"]}
    return {
        STATE_KEY_PREFIX + digest: value["uid"]
        for digest, value in recorded_images(stored.get).items()
        if value.get("uid")
    }


def scheduler_saw_the_worker_exit(deployment: Deployment, run_id: str, try_number: int) -> bool:
    """
    Whether the scheduler has taken the executor's report of the worker that deferred this try.

    Airflow 3.3.2's scheduler fails a resumed task if that report reaches it only after the trigger
    fired (apache/airflow#67287): the jobs are let finish only once it has been taken.
    """
    log = (deployment.home / "scheduler.log").read_text(errors="replace")
    return (
        f"Received executor event with state success for task instance TaskInstanceKey(dag_id='{DAG_ID}', "
        f"task_id='parse', run_id='{run_id}', try_number={try_number}," in log
    )


def test_a_clear_while_doc2x_processes_reconnects_and_uploads_nothing_again(
    deployment, local_server, tmp_path
):
    local_server.reset()
    local_server.configure(processing_time=STILL_PROCESSING)
    run_id = deployment.trigger(DAG_ID, {"output_path": str(tmp_path / "lake")})
    wait_until(lambda: deployment.task_state(run_id, "parse") == "deferred", timeout=120, interval=0.2)
    first = deployment.task_instance(run_id, "parse")
    wait_until(lambda: scheduler_saw_the_worker_exit(deployment, run_id, first["try_number"]), timeout=60)
    uids = recorded_uids(deployment, run_id)
    assert len(uids) == PAGES  # every job recorded before the task deferred
    before = local_server.stats()
    assert (before["requests"]["submit"], before["billed_total"], before["jobs"]) == (PAGES, PAGES, PAGES)

    # The UI's Clear on the parse task: a new try, Doc2X still processing every job.
    cleared = deployment.api.post(
        f"/api/v2/dags/{DAG_ID}/clearTaskInstances",
        json={
            "dry_run": False,
            "dag_run_id": run_id,
            "task_ids": ["parse"],
            "only_failed": False,
            "include_downstream": False,
        },
    )
    cleared.raise_for_status()
    assert [ti["task_id"] for ti in cleared.json()["task_instances"]] == ["parse"]

    def deferred_again() -> dict | None:
        ti = deployment.task_instance(run_id, "parse")
        return ti if ti.get("id") != first["id"] and ti.get("state") == "deferred" else None

    second = wait_until(deferred_again, timeout=180, interval=0.2, message="the cleared task to defer again")
    assert second["try_number"] > first["try_number"]
    assert recorded_uids(deployment, run_id) == uids  # the clear kept the state store
    log = deployment.task_logs(run_id, "parse")[second["try_number"]]
    reconnected = re.findall(r"Reconnected (\S+) to Doc2X job (\S+) \('processing'\)", log)
    assert sorted(uid for _, uid in reconnected) == sorted(uids.values()), log[-4000:]

    wait_until(lambda: scheduler_saw_the_worker_exit(deployment, run_id, second["try_number"]), timeout=60)
    local_server.configure(processing_time=0)  # Doc2X finishes the jobs the new try waits for
    deployment.wait_for_run(run_id)
    markdown = sorted((tmp_path / "lake").glob("*/*.md"))
    assert [path.stem for path in markdown] == ["invoice", "letter", "report", "scan"]
    assert markdown[0].read_text().startswith("# Invoice 2026-0042")
    after = local_server.stats()
    assert after["requests"]["submit"] == PAGES  # the clear uploaded nothing again
    assert after["billed_total"] == PAGES
    assert after["max_billed_per_image"] == 1
