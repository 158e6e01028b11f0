"""A job submitted by one task, waited for by the sensor, in the worker and in the triggerer."""

from __future__ import annotations

from airflow.providers.common.compat.sdk import DAG, Param, task

from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.sensors.doc2x import Doc2XImageParseSensor

with DAG("doc2x_sensor", schedule=None, params={"image": Param("", type="string")}) as dag:

    @task
    def submit(params=None) -> str:
        return Doc2XHook().submit_image(params["image"])

    uid = submit()
    for deferrable in (False, True):
        waiter = Doc2XImageParseSensor(
            task_id=f"wait_{'deferrable' if deferrable else 'poking'}",
            uid="{{ ti.xcom_pull(task_ids='submit') }}",
            deferrable=deferrable,
            poke_interval=0.1,
            timeout=60,
        )

        @task(task_id=f"show_{'deferrable' if deferrable else 'poking'}")
        def show(record: dict) -> None:
            print(f"SENSED {record['uid']}: {record['markdown'].splitlines()[0]}")

        uid >> waiter
        show(waiter.output)
