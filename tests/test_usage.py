"""
A task's usage where people and machines read it: the log line, XCom (through a real DAG run),
Airflow's metrics received by a real StatsD socket, and OpenLineage run facets serialised by the
OpenLineage client; and the numbers read back from the database whatever it holds.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import socket
import sys
import time
from datetime import datetime, timezone

import pytest

from airflow_provider_doc2x import usage as usage_module
from airflow_provider_doc2x.usage import USAGE_XCOM_KEY, Usage, report_usage, usage_run_facets
from tests.helpers import AIRFLOW_VERSION, TaskInstance, airflow_cli

SPENT = Usage(
    pages_billed=120,
    pages_reused=30,
    pages_reconnected=4,
    pages_failed=1,
    pages_possibly_billed_twice=0,
    rate_limited=3,
    upload_seconds=12.3,
    wait_seconds=80.1,
)
LINE = (
    "Doc2X usage (lane pdf, model v3-2026): 120 pages billed, 30 reused, 4 reconnected, 1 failed, "
    "0 possibly billed twice; 3 answers 429 absorbed; 12.3 s uploading, 80.1 s waiting"
)


# --- the numbers, carried across deferrals and read back ---------------------------------------------


def test_the_numbers_survive_a_deferral_as_json_and_tries_add_up():
    carried = json.loads(json.dumps(SPENT.to_json()))
    assert Usage.of(carried) == SPENT
    second_try = Usage(pages_billed=5, pages_reconnected=120, wait_seconds=2.0)
    total = SPENT + second_try
    assert total == SPENT.add(second_try)
    assert (total.pages_billed, total.pages_reconnected, total.wait_seconds) == (125, 124, 82.1)
    assert SPENT.pages_billed == 120  # adding makes a new usage


@pytest.mark.parametrize(
    "hostile",
    [True, False, -1, -0.5, math.nan, math.inf, -math.inf, "12", "NaN", None, [], {}, 10**400, b"1"],
)
def test_a_field_that_is_not_a_finite_non_negative_number_reads_as_zero(hostile):
    read = Usage.of({"pages_billed": hostile, "wait_seconds": hostile, "pages_reused": 7})
    assert read == Usage(pages_reused=7)


@pytest.mark.parametrize("stored", [None, "pages_billed=3", 42, [("pages_billed", 3)], b"{}", object()])
def test_anything_but_a_mapping_reads_as_no_usage(stored):
    assert Usage.of(stored) == Usage()


def test_keys_of_a_later_release_are_ignored_and_missing_ones_are_zero():
    read = Usage.of({"pages_billed": 3, "pages_summarised": 9, "model": "v2", "upload_seconds": 1.25})
    assert read == Usage(pages_billed=3, upload_seconds=1.25)
    assert Usage.of({"pages_billed": -0.0}).to_json()["pages_billed"] == 0


def test_the_json_form_is_small_flat_numbers():
    form = Usage(pages_billed=2, upload_seconds=1 / 3).to_json()
    assert set(form) == {
        "pages_billed",
        "pages_reused",
        "pages_reconnected",
        "pages_failed",
        "pages_possibly_billed_twice",
        "rate_limited",
        "upload_seconds",
        "wait_seconds",
    }
    assert form["upload_seconds"] == 0.333 and form["pages_billed"] == 2


# --- the log line and XCom ------------------------------------------------------------------------------


def test_the_log_says_it_in_one_line_and_xcom_holds_the_numbers_with_model_and_lane(caplog):
    ti = TaskInstance()
    with caplog.at_level(logging.INFO, logger="doc2x.test"):
        report_usage(
            SPENT, context={"ti": ti}, log=logging.getLogger("doc2x.test"), model="v3-2026", lane="pdf"
        )
    assert [record.getMessage() for record in caplog.records] == [LINE]
    assert ti.xcom == {USAGE_XCOM_KEY: {**SPENT.to_json(), "model": "v3-2026", "lane": "pdf"}}
    assert Usage.of(ti.xcom[USAGE_XCOM_KEY]) == SPENT


USAGE_DAG = """
import json, logging
from datetime import datetime, timezone

from airflow.providers.common.compat.sdk import dag, get_current_context, task

from airflow_provider_doc2x.usage import USAGE_XCOM_KEY, Usage, report_usage


@dag(dag_id="doc2x_usage_xcom", schedule=None, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc))
def usage_xcom():
    @task
    def parse():
        usage = Usage.of(json.loads(get_current_context()["params"]["usage"]))
        report_usage(usage, context=get_current_context(), log=logging.getLogger("airflow.task"),
                     model="v2", lane="image")

    @task
    def budget():
        context = get_current_context()
        pulled = context["ti"].xcom_pull(task_ids="parse", key=USAGE_XCOM_KEY)
        with open(context["params"]["pulled"], "w") as out:
            json.dump(pulled, out)

    parse() >> budget()


usage_xcom()
"""


def test_a_downstream_task_of_a_real_dag_run_pulls_the_usage(airflow_db, tmp_path):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "usage_xcom.py").write_text(USAGE_DAG)
    pulled = tmp_path / "pulled.json"
    conf = {"usage": json.dumps(SPENT.to_json()), "pulled": str(pulled)}
    result = airflow_cli(
        "dags",
        "test",
        "doc2x_usage_xcom",
        "-c",
        json.dumps(conf),
        env={"AIRFLOW__CORE__DAGS_FOLDER": str(dags)},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert LINE.replace("lane pdf, model v3-2026", "lane image, model v2") in output
    assert json.loads(pulled.read_text()) == {**SPENT.to_json(), "model": "v2", "lane": "image"}


# --- metrics, received by a real StatsD socket ----------------------------------------------------------


class StatsdReceiver:
    """A UDP socket on loopback where Airflow's StatsD client sends its datagrams."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.port = sock.getsockname()[1]

    def until(self, last: str, *, timeout: float = 10.0) -> list[str]:
        """Every datagram received up to the one whose name is ``last``, in order; fail at the deadline."""
        received: list[str] = []
        deadline = time.monotonic() + timeout
        while not any(line.split(":", 1)[0].split(",", 1)[0] == last for line in received):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {last!r} datagram within {timeout}s; received {received}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            received.extend(data.decode().splitlines())
        return received


def fresh_stats(monkeypatch) -> None:
    """Make Airflow's Stats anew from ``[metrics]`` as a task process does; the old one comes back after."""
    if AIRFLOW_VERSION >= (3, 0):
        # Airflow 3: module-level state behind the Stats shim, initialized by the task runner.
        from airflow.providers.common.compat.sdk import Stats
        from airflow.sdk.observability.metrics import stats_utils

        stats = sys.modules[Stats.__module__]
        for name in ("_factory", "_backend", "_export_legacy_names"):
            monkeypatch.setattr(stats, name, getattr(stats, name))
        Stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)
    else:
        # Airflow 2: a metaclass chooses the factory when airflow.stats is first imported, and
        # builds the logger at first use.
        from airflow.metrics import statsd_logger
        from airflow.stats import Stats

        monkeypatch.setattr(type(Stats), "factory", statsd_logger.get_statsd_logger)
        monkeypatch.setattr(Stats, "instance", None)


@pytest.fixture
def statsd(monkeypatch):
    """``[metrics] statsd_on`` pointing at a fresh loopback socket, and Stats made anew for it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        receiver = StatsdReceiver(sock)
        monkeypatch.setenv("AIRFLOW__METRICS__STATSD_ON", "True")
        monkeypatch.setenv("AIRFLOW__METRICS__STATSD_HOST", "127.0.0.1")
        monkeypatch.setenv("AIRFLOW__METRICS__STATSD_PORT", str(receiver.port))
        monkeypatch.setenv("AIRFLOW__METRICS__STATSD_PREFIX", "airflow")
        fresh_stats(monkeypatch)
        yield receiver  # monkeypatch puts the process's own Stats back


def report_then_mark(usage: Usage, *, log=None) -> None:
    """Report, then send a marker through the same client: a datagram absent before it was never sent."""
    from airflow.providers.common.compat.sdk import Stats

    report_usage(
        usage,
        context={"ti": TaskInstance()},
        log=log or logging.getLogger("doc2x.test"),
        model="v2",
        lane="image",
    )
    Stats.incr("doc2x_test.marker")


def test_counters_and_timers_reach_statsd_with_their_counts_and_zeros_are_not_sent(statsd):
    report_then_mark(SPENT)
    received = statsd.until("airflow.doc2x_test.marker")
    sent = dict(line.split(":", 1) for line in received[:-1])
    assert sent == {
        "airflow.doc2x.pages_billed": "120|c",
        "airflow.doc2x.pages_reused": "30|c",
        "airflow.doc2x.pages_reconnected": "4|c",
        "airflow.doc2x.pages_failed": "1|c",
        "airflow.doc2x.rate_limited": "3|c",
        "airflow.doc2x.upload_time": sent["airflow.doc2x.upload_time"],
        "airflow.doc2x.wait_time": sent["airflow.doc2x.wait_time"],
    }  # no pages_possibly_billed_twice: it was 0
    value, kind = sent["airflow.doc2x.wait_time"].split("|")
    assert kind == "ms" and float(value) == pytest.approx(80_100)  # the figure given, in StatsD's unit


def test_the_tags_name_the_dag_the_task_the_lane_and_the_model(statsd, monkeypatch):
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED", "True")  # tags carried in the name
    fresh_stats(monkeypatch)
    report_then_mark(Usage(pages_billed=2))
    received = statsd.until("airflow.doc2x_test.marker")
    assert received[0] == "airflow.doc2x.pages_billed,dag_id=nightly,task_id=parse,lane=image,model=v2:2|c"


def test_a_failing_metrics_backend_never_fails_the_task(statsd, monkeypatch, caplog):
    # A custom client that is no StatsClient: Airflow refuses it when the first metric is sent.
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_CUSTOM_CLIENT_PATH", "builtins.dict")
    fresh_stats(monkeypatch)
    from airflow.providers.common.compat.sdk import Stats

    with pytest.raises(Exception, match="StatsClient"):  # positive control: the backend does fail
        Stats.incr("doc2x_test.marker")
    fresh_stats(monkeypatch)
    ti = TaskInstance()
    with caplog.at_level(logging.DEBUG, logger="doc2x.test"):
        report_usage(SPENT, context={"ti": ti}, log=logging.getLogger("doc2x.test"), model="v2", lane="image")
    assert ti.xcom[USAGE_XCOM_KEY]["pages_billed"] == 120
    (debug,) = [record for record in caplog.records if record.levelno == logging.DEBUG]
    assert debug.getMessage() == "Doc2X: the usage metrics were not sent" and "StatsClient" in debug.exc_text


# --- OpenLineage ---------------------------------------------------------------------------------------


def test_the_run_facets_serialise_with_the_openlineage_client():
    from openlineage.client.serde import Serde

    facets = usage_run_facets(SPENT, model="v3-2026", lane="pdf")
    usage, parser = (json.loads(Serde.to_json(facets[name])) for name in ("doc2x_usage", "doc2x_parser"))
    assert {key: value for key, value in usage.items() if not key.startswith("_")} == SPENT.to_json()
    assert {key: value for key, value in parser.items() if not key.startswith("_")} == {
        "model": "v3-2026",
        "lane": "pdf",
    }
    assert usage["_schemaURL"].startswith("airflow-provider-doc2x/schemas/Doc2XUsageRunFacet.json#")
    assert parser["_schemaURL"].startswith("airflow-provider-doc2x/schemas/Doc2XParserRunFacet.json#")
    assert usage["_producer"]  # the client's producer, as on every facet it sends


def test_the_run_facets_are_openlineage_run_facets_that_travel_in_an_event():
    from airflow.providers.common.compat.openlineage.facet import RunFacet
    from openlineage.client.event_v2 import Job, Run, RunEvent, RunState
    from openlineage.client.serde import Serde

    facets = usage_run_facets(SPENT, model="v2", lane="image")
    assert all(isinstance(facet, RunFacet) for facet in facets.values())
    event = RunEvent(
        eventType=RunState.COMPLETE,
        eventTime=datetime(2026, 1, 1, tzinfo=timezone.utc).isoformat(),
        run=Run(runId="01890a5d-ac96-7c4b-9f1e-5f4e6b3b9a10", facets=facets),
        job=Job(namespace="airflow", name="nightly.parse"),
        producer="airflow-provider-doc2x",
    )
    sent = json.loads(Serde.to_json(event))
    usage, parser = sent["run"]["facets"]["doc2x_usage"], sent["run"]["facets"]["doc2x_parser"]
    assert (usage["pages_billed"], parser["model"], parser["lane"]) == (120, "v2", "image")
    assert pickle.loads(pickle.dumps(facets)) == facets  # the classes are found by name


def test_without_the_openlineage_client_there_is_no_facet_and_no_error(monkeypatch):
    for name in [name for name in sys.modules if name == "openlineage" or name.startswith("openlineage.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "openlineage", None)
    monkeypatch.delitem(sys.modules, "airflow.providers.common.compat.openlineage.facet", raising=False)
    usage_module._facet_classes.cache_clear()
    try:
        assert usage_run_facets(SPENT, model="v2", lane="image") == {}
    finally:
        usage_module._facet_classes.cache_clear()
