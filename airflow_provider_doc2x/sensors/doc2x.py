"""``Doc2XImageParseSensor``: wait for a Doc2X job submitted elsewhere (an image, or a PDF) and return its result."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from airflow.providers.common.compat.sdk import BaseSensorOperator, PokeReturnValue, conf

from airflow_provider_doc2x import events, protocol
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.pdf.results import page_record
from airflow_provider_doc2x.records import records_from_event, result_record
from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context


class Doc2XImageParseSensor(BaseSensorOperator):
    """Wait until the Doc2X job ``uid`` is done; push its record (as the operator does) to XCom.

    A failed, unknown or expired job fails the task with its Doc2X code, the same way whether the
    sensor pokes or defers (an unknown or expired uid fails it without Airflow retries). Deferrable:
    the wait happens in the triggerer, with the sensor's ``timeout`` as the deadline.

    :param uid: the job's uid (templated).
    :param doc2x_conn_id: the ``doc2x`` connection (templated).
    :param lane: ``"image"`` (a job of the image API) or ``"pdf"`` (a PDF's parse: its record holds
        every page, the Markdown of all of them, and figure links to Doc2X's CDN, which work for
        24 hours). A PDF that Doc2X does not know yet is waited for while it may still be in the
        service's pickup delay (counted from the task's start), then fails as unknown.
    """

    template_fields: Sequence[str] = ("uid", "doc2x_conn_id")

    def __init__(
        self,
        *,
        uid: str,
        doc2x_conn_id: str = Doc2XHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        lane: Literal["image", "pdf"] = "image",
        **kwargs: Any,
    ) -> None:
        """Check the lane; the uid is checked when it is rendered."""
        kwargs.setdefault("poke_interval", 2.0)
        super().__init__(**kwargs)
        if lane not in ("image", "pdf"):
            raise ValueError(f"lane must be 'image' or 'pdf', got {lane!r}")
        self.lane = lane
        self.uid = uid
        #: When the task started: a PDF's pickup delay is counted from it (it was uploaded before).
        self._started: float | None = None
        self.doc2x_conn_id = doc2x_conn_id
        self.deferrable = deferrable

    @cached_property
    def hook(self) -> Doc2XHook:
        """The hook, built at run time (once ``doc2x_conn_id`` is rendered)."""
        return Doc2XHook(doc2x_conn_id=self.doc2x_conn_id)

    def execute(self, context: Context) -> Any:
        """Poke in the worker, or check once and defer to the trigger while the job is processing."""
        self._started = time.time()
        if not self.deferrable:
            return super().execute(context)
        protocol.check_uid(self.uid)
        status = self._status()  # one check first: a finished job needs no trigger
        if status.result is not None:
            return self._record(status)
        job = events.job(self.uid, self.uid, None, protocol.STATUS_PROCESSING)
        if self.lane == "pdf":
            job.update(lane=events.LANE_PDF, uploaded_at=self._started)
        self.defer(
            trigger=Doc2XImageParseTrigger(
                doc2x_conn_id=self.doc2x_conn_id,
                jobs=[job],
                poll_interval=self.poke_interval,
                deadline=time.time() + self.timeout,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout + 60),
        )

    def poke(self, context: Context) -> PokeReturnValue:
        """Ask once: done (the record to XCom), not yet, or failed (its Doc2X error)."""
        protocol.check_uid(self.uid)
        status = self._status()
        self.log.info("Doc2X job %s is %r", self.uid, status.status)
        if status.status == protocol.STATUS_SUCCESS and status.result is not None:
            return PokeReturnValue(is_done=True, xcom_value=self._record(status))
        return PokeReturnValue(is_done=False)

    def _record(self, status: protocol.Doc2XJobStatus) -> dict[str, Any]:
        assert status.result is not None
        if self.lane == "pdf":
            return page_record(self.uid, None, status.result)
        return result_record(self.uid, status.result)

    def _status(self) -> protocol.Doc2XJobStatus:
        """The job's status; a failed job raises its error, as in the trigger's event."""
        if self.lane == "pdf":
            # The PDF was uploaded before this task started: Doc2X's pickup delay counts from then.
            status = self.hook.get_pdf_status(self.uid, uploaded_at=self._started)
        else:
            status = self.hook.get_job_status(self.uid)
        if status.status == protocol.STATUS_FAILED:
            raise status.failure()
        return status

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: the job's record, or its error (permanent by its class)."""
        return records_from_event(self.hook, event)[0]
