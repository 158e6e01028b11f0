"""``Doc2XImageParseSensor``: wait for a Doc2X job submitted elsewhere and return its result."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseSensorOperator, PokeReturnValue, conf

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.operators.doc2x import records_from_event, result_record
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context


class Doc2XImageParseSensor(BaseSensorOperator):
    """
    Wait until the Doc2X job ``uid`` is done; push its record (as the operator does) to XCom.

    A failed, unknown or expired job fails the task with its Doc2X code. Deferrable: the wait
    happens in the triggerer, with the sensor's ``timeout`` as the deadline.

    :param uid: the job's uid (templated).
    :param doc2x_conn_id: the ``doc2x`` connection.
    """

    template_fields: Sequence[str] = ("uid",)

    def __init__(
        self,
        *,
        uid: str,
        doc2x_conn_id: str = Doc2XHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", 2.0)
        super().__init__(**kwargs)
        self.uid = uid
        self.doc2x_conn_id = doc2x_conn_id
        self.deferrable = deferrable

    @cached_property
    def hook(self) -> Doc2XHook:
        return Doc2XHook(doc2x_conn_id=self.doc2x_conn_id)

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        status = self.hook.get_job_status(self.uid)  # one check first: a finished job needs no trigger
        if status.result is not None:
            return result_record(self.uid, status.result)
        self.defer(
            trigger=Doc2XImageParseTrigger(
                doc2x_conn_id=self.doc2x_conn_id,
                jobs=[{"uid": self.uid, "source": self.uid, "status": status.status}],
                poll_interval=self.poke_interval,
                deadline=time.time() + self.timeout,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout + 60),
        )

    def poke(self, context: Context) -> PokeReturnValue:
        status = self.hook.get_job_status(self.uid)  # a failed job raises its Doc2X error here
        self.log.info("Doc2X job %s is %s", self.uid, status.status)
        if status.status == protocol.STATUS_SUCCESS and status.result is not None:
            return PokeReturnValue(is_done=True, xcom_value=result_record(self.uid, status.result))
        return PokeReturnValue(is_done=False)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        return records_from_event(self.hook, event)[0]
