"""
The provider in a deployment shaped like production, all on loopback: PostgreSQL as the metadata
database, Redis as the Celery broker, a Redis of its own as the pacing store, CeleryExecutor with
three workers that each stand for a host (hostname, pacing folder, temporary folder), two
triggerers, a scheduler, a dag-processor and the API server
(``tests.helpers.deployment.CeleryDeployment``). Runs are started and watched through Airflow's REST
API; the local Doc2X server counts what it billed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from airflow_provider_doc2x.journal import recorded_images
from tests.helpers import AIRFLOW_VERSION, REPO, STILL_PROCESSING, wait_until
from tests.helpers.deployment import CeleryDeployment

MISSING = CeleryDeployment.missing() if AIRFLOW_VERSION >= (3, 3) else None
pytestmark = [
    pytest.mark.serial,
    pytest.mark.xdist_group("deployments"),
    pytest.mark.skipif(AIRFLOW_VERSION < (3, 3), reason="the Celery deployment tests run Airflow 3.3"),
    pytest.mark.skipif(MISSING is not None, reason=f"cannot deploy with Celery here: {MISSING}"),
]

DAG_ID = "example_doc2x_parse_to_storage"
EXAMPLE_IMAGES = REPO / "example_dags" / "images"
PAGES = 4  # the example images
UPLOADS_SIDE_BY_SIDE = 3  # the connection's max_concurrent_uploads

#: bench/dags: parse tasks mapped over chunks of images, on the connection ``doc2x_shared_pacing``
#: (the key's uploads paced across hosts in the Redis named by its ``pacing_conn_id``).
MAPPED_DAG_ID = "doc2x_mapped_shared_pacing"
#: The key's limit, scaled down: images per window of seconds, at the local server and in the connection.
PACED_LIMIT, PACED_WINDOW = 10, 2.0
#: What each limiter logs (once, as a warning) when the pacing store fails (pacing/redis_window.py).
PACING_STORE_FAILED = f"Doc2X pacing: the Redis connection {CeleryDeployment.pacing_conn_id!r} failed"


@pytest.fixture(scope="module")
def deployment(local_server, tmp_path_factory):
    # One DAGs folder for the example DAGs and the bench's mapped DAGs (Airflow follows the links).
    dags = tmp_path_factory.mktemp("dags")
    (dags / "example_dags").symlink_to(REPO / "example_dags", target_is_directory=True)
    (dags / "bench_dags").symlink_to(REPO / "bench" / "dags", target_is_directory=True)
    airflow = CeleryDeployment(
        tmp_path_factory.mktemp("celery-deployment"),
        local_server.connection_json(max_concurrent_uploads=UPLOADS_SIDE_BY_SIDE),
        dags_folder=dags,
        separate_pacing_redis=True,  # the pacing store can stop while the broker goes on
        env={
            # As production should: a task whose host dies is tried again, and reconnects to its jobs.
            "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "2",
            "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "1",
            # The same key, paced in the pacing store; while hosts pace alone their 429s are retried.
            "AIRFLOW_CONN_DOC2X_SHARED_PACING": local_server.connection_json(
                rate_limit_images=PACED_LIMIT,
                rate_limit_window=PACED_WINDOW,
                pacing_conn_id=CeleryDeployment.pacing_conn_id,
                max_retries=30,
            ),
        },
    )
    yield airflow
    airflow.stop()


@pytest.fixture
def restart_killed(deployment):
    """Components the test kills are started again afterwards, for the tests that follow."""
    killed: list[str] = []
    yield killed
    for name in killed:
        if name not in deployment.processes:
            deployment.start(name)
    wait_until(deployment.healthy, timeout=120, interval=0.5, message="the deployment to be whole again")


def run_example(deployment, folder: Path, lake: Path) -> str:
    return deployment.trigger(DAG_ID, {"folder": str(folder), "output_path": str(lake)})


def images(make_image, folder: Path, count: int) -> list[Path]:
    """``count`` distinct pages in ``folder`` (each bills on its own)."""
    made = [make_image(f"page-{number:02d}.png", f"Page {number}") for number in range(count)]
    folder.mkdir(exist_ok=True)
    return [path.rename(folder / path.name) for path in made]


def test_the_example_dag_runs_on_celery_and_postgres_and_the_worker_lets_go(
    deployment, local_server, tmp_path
):
    local_server.reset()
    # Doc2X works until the test has seen the worker let go (on a loaded host, that can take longer
    # than any fixed processing time), then finishes the jobs.
    local_server.configure(processing_time=STILL_PROCESSING)
    run_id = run_example(deployment, EXAMPLE_IMAGES, tmp_path / "lake")
    wait_until(lambda: deployment.task_state(run_id, "parse") == "deferred", timeout=120, interval=0.2)
    assert local_server.stats()["jobs"] == PAGES  # submitted, and Doc2X is still processing them
    ti = deployment.task_instance(run_id, "parse")
    assert ti["hostname"] in deployment.worker_names  # a Celery worker, under its own host's name
    # The worker lets go of the task: Celery reports it done, and no task process runs it any more ...
    wait_until(lambda: not deployment.holding(ti["id"]), timeout=15, interval=0.2)
    # ... while it is still deferred and Doc2X still working: a triggerer alone waits.
    assert deployment.task_state(run_id, "parse") == "deferred"
    assert deployment.triggerer_of(ti["id"]) in deployment.triggerer_names
    local_server.configure(processing_time=0)
    deployment.wait_for_run(run_id)
    markdown = sorted((tmp_path / "lake").glob("*/*.md"))
    assert [path.stem for path in markdown] == ["invoice", "letter", "report", "scan"]
    assert markdown[0].read_text().startswith("# Invoice 2026-0042")
    stats = local_server.stats()
    assert (stats["billed_total"], stats["max_billed_per_image"]) == (PAGES, 1)
    assert deployment.task_instance(run_id, "parse")["try_number"] == 1


def test_a_killed_triggerer_hands_its_triggers_to_the_other_and_nothing_is_uploaded_again(
    deployment, local_server, tmp_path, restart_killed
):
    local_server.reset()
    local_server.configure(processing_time=25)
    run_id = run_example(deployment, EXAMPLE_IMAGES, tmp_path / "lake")
    wait_until(lambda: deployment.task_state(run_id, "parse") == "deferred", timeout=120, interval=0.2)
    ti_id = deployment.task_instance(run_id, "parse")["id"]
    holder = wait_until(lambda: deployment.triggerer_of(ti_id), timeout=30, interval=0.2)
    wait_until(lambda: local_server.stats()["requests"].get("status", 0) >= PAGES, timeout=60, interval=0.2)
    deployment.kill(holder)  # SIGKILL of its process group and its trigger runner: mid-poll
    restart_killed.append(holder)
    polls_before = local_server.stats()["requests"]["status"]
    # Once the killed triggerer's heartbeat is older than the threshold (10 s), the other takes over.
    successor = wait_until(
        lambda: (deployment.triggerer_of(ti_id) or holder) != holder and deployment.triggerer_of(ti_id),
        timeout=60,
        interval=0.5,
        message="another triggerer to take the trigger over",
    )
    assert successor in deployment.triggerer_names
    deployment.wait_for_run(run_id)
    stats = local_server.stats()
    assert stats["requests"]["status"] > polls_before  # the successor polled the same uids
    assert stats["requests"]["submit"] == PAGES
    assert (stats["billed_total"], stats["max_billed_per_image"]) == (PAGES, 1)
    assert len(list((tmp_path / "lake").glob("*/*.md"))) == PAGES
    assert deployment.task_instance(run_id, "parse")["try_number"] == 1


def test_a_worker_killed_mid_upload_bills_twice_only_the_images_whose_answer_was_lost(
    deployment, local_server, make_image, tmp_path, restart_killed
):
    pages = images(make_image, tmp_path / "images", 3 * UPLOADS_SIDE_BY_SIDE)
    source_of = {hashlib.sha256(path.read_bytes()).hexdigest(): str(path) for path in pages}
    local_server.reset()
    local_server.configure(processing_time=2, upload_seconds=1.5)  # each upload takes 1.5 s to arrive
    run_id = run_example(deployment, tmp_path / "images", tmp_path / "lake")

    def second_round_uploading() -> bool:
        stats = local_server.stats()
        return stats["billed_total"] >= UPLOADS_SIDE_BY_SIDE and stats["uploads_in_flight"] >= 1

    wait_until(second_round_uploading, timeout=120, interval=0.05, message="the second round of uploads")
    ti = deployment.task_instance(run_id, "parse")
    host = ti["hostname"]
    assert host in deployment.worker_names
    assert any(held.startswith(f"{host}: task process") for held in deployment.holding(ti["id"]))
    deployment.kill(host)  # the host dies: its Celery worker, the task's supervisor and the task
    restart_killed.append(host)
    local_server.configure(upload_seconds=0)  # the uploads on the way arrive (and bill); the retry is quick
    # The scheduler fails the silent task after its heartbeat timeout (15 s); the retry runs elsewhere.
    deployment.wait_for_run(run_id, timeout=300)
    ti = deployment.task_instance(run_id, "parse")
    assert ti["try_number"] >= 2
    assert ti["hostname"] != host
    assert len(list((tmp_path / "lake").glob("*/*.md"))) == len(pages)  # every image parsed

    retries = "\n".join(log for number, log in deployment.task_logs(run_id, "parse").items() if number > 1)
    warned = {
        source
        for source in source_of.values()
        for line in retries.splitlines()
        if "possibly billed twice" in line and source in line
    }
    stats = local_server.stats()
    twice = {source_of[digest] for digest, count in stats["billed"].items() if count > 1}
    print(
        f"\n[worker killed mid-upload] {len(pages)} images: {len(twice)} billed twice, {len(warned)} named "
        f"'possibly billed twice' in the new try's log, {stats['requests']['submit']} uploads"
    )
    assert set(stats["billed"]) == set(source_of)
    assert max(stats["billed"].values()) <= 2
    # Only an upload whose answer was lost is sent again, and the new try's log names it ...
    assert twice <= warned, (twice, warned, retries[-3000:])
    # The host died with uploads on their way, whose bodies had been sent: they arrived and were
    # billed, so the new try did bill some images twice, and the check above was put to the test.
    assert twice, (stats, retries[-3000:])
    # ... at most the uploads that were on the way; every other image is reconnected to its uid.
    assert len(warned) <= UPLOADS_SIDE_BY_SIDE
    assert stats["requests"]["submit"] == len(pages) + len(warned)


def test_state_store_trigger_kwargs_and_xcoms_live_in_postgres(
    deployment, local_server, make_image, tmp_path
):
    count = 12
    images(make_image, tmp_path / "images", count)
    local_server.reset()
    local_server.configure(processing_time=4)
    run_id = run_example(deployment, tmp_path / "images", tmp_path / "lake")
    wait_until(lambda: deployment.task_state(run_id, "parse") == "deferred", timeout=120, interval=0.2)
    where = "dag_id = %s AND run_id = %s AND task_id = 'parse'"
    has_store = deployment.sql("SELECT to_regclass('task_state_store') IS NOT NULL")[0][0]
    state_rows = (
        deployment.sql(
            f"SELECT key, octet_length(value), value FROM task_state_store WHERE {where}", DAG_ID, run_id
        )
        if has_store
        else []
    )
    trigger_rows = deployment.sql(
        "SELECT octet_length(t.kwargs), t.kwargs FROM trigger t JOIN task_instance ti ON ti.trigger_id = t.id "
        "WHERE ti.dag_id = %s AND ti.run_id = %s AND ti.task_id = 'parse'",
        DAG_ID,
        run_id,
    )
    deployment.wait_for_run(run_id)
    xcom_rows = deployment.sql(
        f"SELECT octet_length(value::text), pg_column_size(value) FROM xcom WHERE {where} AND key = 'return_value'",
        DAG_ID,
        run_id,
    )
    assert len(trigger_rows) == 1  # the deferred task's trigger, stored while it waited
    # Airflow 3.3 stores a deferral's kwargs as plain JSON, Fernet key or not: the key must not be there.
    kwargs_text = trigger_rows[0][1]
    assert local_server.api_key not in kwargs_text
    assert len(xcom_rows) == 1
    assert len(deployment.xcom(run_id, "parse")) == count
    if has_store:
        stored = {key: json.loads(value) for key, _, value in state_rows}
        recorded = recorded_images(stored.get)  # the batches of starts and uids
        assert len([value for value in recorded.values() if value.get("uid")]) == count
    state_bytes = sum(size for _, size, _ in state_rows)
    print(
        f"\n[PostgreSQL, {count} images] per image: task state store {state_bytes / count:.0f} B "
        f"({len(state_rows)} rows{'' if has_store else '; no task_state_store table'}), "
        f"trigger kwargs {trigger_rows[0][0] / count:.0f} B ({'plain JSON' if kwargs_text.startswith('{') else 'encrypted'}), "
        f"XCom {xcom_rows[0][0] / count:.0f} B as JSON text ({xcom_rows[0][1] / count:.0f} B as JSONB)"
    )


def pacing_store_warnings(log: str) -> list[str]:
    """The lines of a task log that warn of the pacing store failing (not the same news at INFO)."""
    warned = []
    for line in log.splitlines():
        if PACING_STORE_FAILED not in line:
            continue
        try:
            level = str(json.loads(line).get("level", "")).lower()
        except (ValueError, AttributeError):
            level = "warning" if "WARNING" in line else ""
        if level == "warning":
            warned.append(line)
    return warned


def redis_keys(port: int, pattern: str) -> list[bytes]:
    """The keys of a Redis on loopback that match ``pattern``."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        return sorted(client.keys(pattern))
    finally:
        client.close()


def test_the_pacing_redis_stopped_mid_run_drops_and_double_bills_nothing_and_says_so_once(
    deployment, local_server, make_image, tmp_path
):
    tasks, count = 4, 48
    pages = images(make_image, tmp_path / "images", count)
    source_of = {hashlib.sha256(path.read_bytes()).hexdigest(): str(path) for path in pages}
    chunks = [[str(path) for path in pages[index::tasks]] for index in range(tasks)]
    local_server.reset()
    # Each upload takes 0.5 s to arrive, and the key takes 10 per 2 s: the uploads last about 10 s.
    local_server.configure(
        rate_limit=PACED_LIMIT, rate_window=PACED_WINDOW, upload_seconds=0.5, processing_time=1
    )
    pacing_store = deployment.pacing_redis
    assert pacing_store is not None
    # hosts 0: each task keeps its Celery worker's own pacing folder, the window of its host alone.
    run_id = deployment.trigger(MAPPED_DAG_ID, {"chunks": chunks, "hosts": 0})
    try:
        wait_until(
            lambda: local_server.stats()["billed_total"] >= PACED_LIMIT + 2,
            timeout=180,
            interval=0.05,
            message="the first uploads to be billed",
        )
        windows = redis_keys(pacing_store.port, "doc2x:pacing:*")
        before = local_server.stats()
        deployment.stop_pacing_redis()

        def every_image_billed_or_run_over() -> bool:
            return len(local_server.stats()["billed"]) == count or deployment.run_state(run_id) == "failed"

        wait_until(every_image_billed_or_run_over, timeout=180, interval=0.2, message="every image billed")
        during = local_server.stats()
    finally:
        deployment.start_pacing_redis()  # on the same port, before the run's end (its tasks wait on Doc2X)
    deployment.wait_for_run(run_id, timeout=300)

    stats = local_server.stats()
    records = [deployment.xcom(run_id, "parse", map_index) or [] for map_index in range(tasks)]
    logs = {
        (map_index, attempt): log
        for map_index in range(tasks)
        for attempt, log in deployment.task_logs(run_id, "parse", map_index).items()
    }
    warnings = {try_: len(pacing_store_warnings(log)) for try_, log in logs.items()}
    print(
        f"\n[pacing Redis stopped mid-run] {count} images in {tasks} mapped tasks, {PACED_LIMIT} per "
        f"{PACED_WINDOW:g} s: {before['billed_total']} billed before the outage "
        f"({before['rate_limited']} answered 429, {before['uploads_in_flight']} on the way), "
        f"{during['billed_total'] - before['billed_total']} during it "
        f"({during['rate_limited'] - before['rate_limited']} answered 429); "
        f"{stats['requests'].get('submit', 0)} uploads in all; {len(logs)} task tries, "
        f"the pacing store's warning in {sum(map(bool, warnings.values()))} of them"
    )
    # Before the outage the hosts paced together in the pacing store's window; the outage came
    # part-way: images were billed while each host paced alone.
    assert len(windows) == 1, windows
    assert during["billed_total"] > before["billed_total"]
    # The run completes; no image is dropped ...
    assert sorted(record["source"] for chunk in records for record in chunk) == sorted(map(str, pages))
    assert set(stats["billed"]) == set(source_of)
    # ... and none is billed twice.
    assert stats["max_billed_per_image"] == 1
    # The tasks that lost the pacing store said so in their logs, once per task process at most (a
    # try's log also holds its resumption after the deferral, which uploads nothing).
    assert any(warnings.values()), "\n".join(log[-3000:] for log in logs.values())
    assert max(warnings.values()) <= 1, {try_: n for try_, n in warnings.items() if n > 1}
    assert pacing_store.ping()
