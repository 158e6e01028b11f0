"""What one task's tries cost and saved, said where people and machines read it.

A task of ten thousand images ends with one question its owner pays for: how many pages did Doc2X
bill, and how many did the cache, the manifest or a new try's reconnection save? :class:`Usage`
holds the answer as a few numbers, small and JSON-safe, so that the operator carries it across
deferrals through its trigger (in the trigger's kwargs, back in its event) and adds each
execution's share.

At the end of the task :func:`report_usage` says it three ways:

- one line in the task's log, for the person reading it;
- XCom under :data:`USAGE_XCOM_KEY`, for a downstream task (a budget check, a report);
- Airflow's metrics (StatsD, Datadog or OpenTelemetry, as ``[metrics]`` chooses): counters
  ``doc2x.pages_billed`` ... and timers ``doc2x.upload_time`` and ``doc2x.wait_time``, tagged with the
  DAG, the task, the lane and the model, for dashboards and alerts over many runs.

:func:`usage_run_facets` gives the same numbers, with the model and the lane that made the results,
as OpenLineage run facets (``doc2x_usage``, ``doc2x_parser``) for a lineage backend.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from datetime import timedelta
from typing import Any

#: The XCom key of the task's usage: its counts and seconds, with ``model`` and ``lane``.
USAGE_XCOM_KEY = "doc2x_usage"

#: Each count's metric, a counter increased by the count (never by 0).
COUNTERS = {
    "pages_billed": "doc2x.pages_billed",
    "pages_reused": "doc2x.pages_reused",
    "pages_reconnected": "doc2x.pages_reconnected",
    "pages_failed": "doc2x.pages_failed",
    "pages_possibly_billed_twice": "doc2x.pages_possibly_billed_twice",
    "rate_limited": "doc2x.rate_limited",
}
#: Each duration's metric, a timer sent when time was spent.
TIMERS = {"upload_seconds": "doc2x.upload_time", "wait_seconds": "doc2x.wait_time"}

#: Where the facets' JSON schemas live, inside this project's repository (no host: the OpenLineage
#: client only parses the URI, and a consumer resolves it against the project's source).
SCHEMA_ROOT = "airflow-provider-doc2x/schemas"
#: The run facets' names in an OpenLineage event.
USAGE_FACET = "doc2x_usage"
PARSER_FACET = "doc2x_parser"


@dataclasses.dataclass
class Usage:
    """What one task's tries cost and saved, counted in pages and seconds.

    Attributes:
        pages_billed: pages Doc2X parsed for this task, each one paid.
        pages_reused: pages whose results came from the content cache or the manifest, unpaid.
        pages_reconnected: pages of jobs an earlier try recorded, fetched again without a new upload.
        pages_failed: pages Doc2X failed or refused.
        pages_possibly_billed_twice: pages sent again after an upload whose answer was lost.
        rate_limited: answers 429 that retries absorbed (a key shared too widely shows here first).
        upload_seconds: time spent uploading.
        wait_seconds: time spent waiting for Doc2X to finish.
    """

    pages_billed: int = 0
    pages_reused: int = 0
    pages_reconnected: int = 0
    pages_failed: int = 0
    pages_possibly_billed_twice: int = 0
    rate_limited: int = 0
    upload_seconds: float = 0.0
    wait_seconds: float = 0.0

    def to_json(self) -> dict[str, int | float]:
        """The numbers as a flat dict for the trigger's kwargs and XCom (seconds to the millisecond)."""
        counts: dict[str, int | float] = {name: getattr(self, name) for name in COUNTERS}
        return {**counts, **{name: round(getattr(self, name), 3) for name in TIMERS}}

    @classmethod
    def of(cls, value: Any) -> Usage:
        """Read back what :meth:`to_json` wrote, whatever came back: the database is not trusted.

        Unknown keys are ignored (a later release may carry more). A field that is not a finite,
        non-negative number, or is a bool, reads as 0: a broken figure in a report must never fail
        the task whose results are already stored. Anything but a mapping reads as no usage.
        """
        if isinstance(value, Usage):
            return dataclasses.replace(value)
        if not hasattr(value, "get"):
            return cls()
        usage = cls()
        for name in COUNTERS:
            setattr(usage, name, int(_number(value.get(name))))
        for name in TIMERS:
            setattr(usage, name, _number(value.get(name)))
        return usage

    def add(self, other: Usage) -> Usage:
        """This usage and another's together (a try's share added to the tries before it), as a new one."""
        return Usage(
            **{
                field.name: getattr(self, field.name) + getattr(other, field.name)
                for field in dataclasses.fields(self)
            }
        )

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return self.add(other)

    def describe(self) -> str:
        """The numbers in words, as the task's log says them."""
        return (
            f"{self.pages_billed} pages billed, {self.pages_reused} reused, "
            f"{self.pages_reconnected} reconnected, {self.pages_failed} failed, "
            f"{self.pages_possibly_billed_twice} possibly billed twice; "
            f"{self.rate_limited} answers 429 absorbed; "
            f"{self.upload_seconds:.1f} s uploading, {self.wait_seconds:.1f} s waiting"
        )


#: The largest figure read back (ten million pages, or seconds: about 116 days): a garbled or
#: hostile value in the database never makes a report absurd.
MOST_READ_BACK = 10_000_000


def _number(value: Any) -> float:
    """A finite number of 0 or more as a float; anything else (a bool, text, NaN, -1, 10**400) as 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return 0.0
    if not math.isfinite(number) or number < 0:
        return 0.0
    return min(number, MOST_READ_BACK) + 0.0  # -0.0 reads as 0.0


def report_usage(usage: Usage, *, context: Any, log: Any, model: str, lane: str) -> None:
    """Say what the task cost and saved: one log line, XCom under :data:`USAGE_XCOM_KEY`, and metrics.

    Args:
        usage: the task's usage, every try's share added.
        context: the task's Airflow context (its ``ti`` pushes XCom and names the DAG and task).
        log: the task's logger.
        model: the Doc2X model that made the results (``v2``, or the PDF lane's model).
        lane: the lane that sent the pages (``image`` or ``pdf``).
    """
    log.info("Doc2X usage (lane %s, model %s): %s", lane, model, usage.describe())
    ti = context.get("ti") if hasattr(context, "get") else None
    push = getattr(ti, "xcom_push", None)
    if push is not None:
        push(key=USAGE_XCOM_KEY, value={**usage.to_json(), "model": model, "lane": lane})
    _send_metrics(usage, ti=ti, model=model, lane=lane, log=log)


def _send_metrics(usage: Usage, *, ti: Any, model: str, lane: str, log: Any) -> None:
    """Counters and timers through Airflow's ``Stats``, tagged; a metrics failure never fails the task.

    Airflow 2.11's ``Stats`` and Airflow 3's both take ``tags=``: a StatsD backend with
    ``statsd_influxdb_enabled`` puts them in the name, Datadog and OpenTelemetry send them as tags,
    plain StatsD drops them. The results are stored by now, and a metrics backend that is down or
    misconfigured must not turn a paid, finished task into a failed one that a retry pays again:
    whatever goes wrong here (the import included) is logged at debug and the task goes on.
    """
    tags = {
        key: str(value)
        for key, value in (
            ("dag_id", getattr(ti, "dag_id", None)),
            ("task_id", getattr(ti, "task_id", None)),
            ("lane", lane),
            ("model", model),
        )
        if value is not None
    }
    try:
        from airflow.providers.common.compat.sdk import Stats

        for name, stat in COUNTERS.items():
            count = getattr(usage, name)
            if count:
                Stats.incr(stat, count=count, tags=tags)
        for name, stat in TIMERS.items():
            seconds = getattr(usage, name)
            if seconds:
                Stats.timing(stat, timedelta(seconds=seconds), tags=tags)
    except Exception:  # any backend's failure: see the docstring
        log.debug("Doc2X: the usage metrics were not sent", exc_info=True)


def usage_run_facets(usage: Usage, *, model: str, lane: str) -> dict[str, Any]:
    """The task's OpenLineage run facets: ``doc2x_usage`` (the numbers) and ``doc2x_parser`` (model, lane).

    OpenLineage is optional: without its client this returns no facet.
    """
    classes = _facet_classes()
    if classes is None:
        return {}
    usage_facet, parser_facet = classes
    return {
        USAGE_FACET: usage_facet(**usage.to_json()),
        PARSER_FACET: parser_facet(model=model, lane=lane),
    }


@functools.cache
def _facet_classes() -> tuple[type, type] | None:
    """The facet classes, defined once at first use: defining them imports the OpenLineage client.

    They are made reachable as this module's attributes (:func:`__getattr__`) under their own
    names, so that pickle and the client's own ``__reduce__`` find them.
    """
    try:
        import attr
        from airflow.providers.common.compat.openlineage.facet import RunFacet
    except ImportError:
        return None
    if not isinstance(RunFacet, type):  # the compat layer's placeholder when the client is missing
        return None

    @attr.define
    class Doc2XUsageRunFacet(RunFacet):
        """What the task's tries cost and saved: pages billed, reused, reconnected, failed; seconds spent."""

        pages_billed: int = 0
        pages_reused: int = 0
        pages_reconnected: int = 0
        pages_failed: int = 0
        pages_possibly_billed_twice: int = 0
        rate_limited: int = 0
        upload_seconds: float = 0.0
        wait_seconds: float = 0.0

        @staticmethod
        def _get_schema() -> str:
            return f"{SCHEMA_ROOT}/Doc2XUsageRunFacet.json#/$defs/Doc2XUsageRunFacet"

    @attr.define
    class Doc2XParserRunFacet(RunFacet):
        """Which Doc2X model made the task's results, and through which lane (``image`` or ``pdf``)."""

        model: str = ""
        lane: str = ""

        @staticmethod
        def _get_schema() -> str:
            return f"{SCHEMA_ROOT}/Doc2XParserRunFacet.json#/$defs/Doc2XParserRunFacet"

    for facet in (Doc2XUsageRunFacet, Doc2XParserRunFacet):
        facet.__qualname__ = facet.__name__
    return Doc2XUsageRunFacet, Doc2XParserRunFacet


def __getattr__(name: str) -> Any:
    """``Doc2XUsageRunFacet`` and ``Doc2XParserRunFacet``, defined when first asked for."""
    if name in ("Doc2XUsageRunFacet", "Doc2XParserRunFacet"):
        classes = _facet_classes()
        if classes is not None:
            return classes[0] if name == "Doc2XUsageRunFacet" else classes[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
