"""
Running the operator in real Airflow tasks for the benches: ``airflow dags test`` of
``bench/dags/doc2x_bench.py``, each run a process of its own with an Airflow home of its own.

A run is what a user's ``airflow dags test`` does: the DAG file is parsed, a DAG run is created in
the metadata database, the ``parse`` task runs through Airflow's task runner (with the task state
store on Airflow 3.3), defers when deferrable, its trigger runs in line, and the task resumes in
``execute_complete``; its return value is pushed to XCom. The figures of a bench come from what
that run left behind: the metadata database (task instance, XCom), the run's output (the task's
log), and the local server's own counters.

Every run gets its own ``AIRFLOW_HOME`` with a copy of one migrated SQLite database (migrating
takes seconds; copying it, none), so runs may go side by side without sharing a SQLite file that
only one writer at a time can hold. What they share is what tasks on one host share: the local
Doc2X server, the key, and ``DOC2X_PACING_DIR`` unless a run is given its own.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _support import SCRATCH

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DAGS = BENCH / "dags"
DAG_ID = "doc2x_bench"
AIRFLOW = str(Path(sys.executable).parent / "airflow")
HOW = "through `airflow dags test`"

_running: list[subprocess.Popen] = []


def _stop_all() -> None:
    for process in _running:
        if process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


atexit.register(_stop_all)


def _own(home: Path) -> dict[str, str]:
    """What makes a run's Airflow its own: its home, its database, the bench's DAG folder."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
    }


def _base_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        **_own(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # Parsing the DAG file imports Airflow and the provider: on a loaded machine that can pass
        # the default 30 s, and `dags test` then finds no DAG.
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "300",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def migrated_database() -> Path:
    """
    A migrated SQLite metadata database, made once per bench process; each run copies it.
    ``DOC2X_BENCH_AIRFLOW_DB`` names one to copy instead (the smoke tests pass the suite's own).
    """
    given = os.environ.get("DOC2X_BENCH_AIRFLOW_DB")
    if given:
        return Path(given)
    home = SCRATCH / "airflow-template"
    database = home / "airflow.db"
    if not database.exists():
        home.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [AIRFLOW, "db", "migrate"], env=_base_env(home), capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            raise SystemExit(f"airflow db migrate failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return database


@dataclass
class TaskRun:
    """One ``airflow dags test`` of the bench DAG, and what it left behind."""

    name: str
    home: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0  # the process's wall time, start-up and DAG parsing included
    returncode: int | None = None
    cpu_seconds: float = 0.0  # user + system CPU time of the process (the task runs in it)
    peak_rss: int = 0  # the process's peak resident set, bytes

    @property
    def log_file(self) -> Path:
        return self.home / "dags-test.log"

    def wait(self, timeout: float = 7200) -> TaskRun:
        """Wait for the process to end (and keep its resource use); a run that did not end is stopped."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                with suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                raise SystemExit(
                    f"{self.name}: `airflow dags test` did not end in {timeout:g} s\n{self.tail()}"
                )
            time.sleep(0.05)
        self.seconds = time.monotonic() - self.started
        self.returncode = self.process.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_seconds = usage.ru_utime + usage.ru_stime
        self.peak_rss = usage.ru_maxrss * 1024
        return self

    @property
    def output(self) -> str:
        """What the run printed: the CLI's and the task's log lines."""
        return self.log_file.read_text(errors="replace")

    def tail(self, chars: int = 4000) -> str:
        return self.output[-chars:]

    def sql(self, query: str, *params: object) -> list[sqlite3.Row]:
        """Rows of a query on this run's metadata database."""
        connection = sqlite3.connect(self.home / "airflow.db")
        connection.row_factory = sqlite3.Row
        query_rows = connection.execute  # SQL, not an operator's execute
        try:
            return query_rows(query, params).fetchall()
        finally:
            connection.close()

    def task_instance(self, task_id: str = "parse") -> dict[str, Any]:
        """The task instance's row (state, try number, start and end, ...)."""
        rows = self.sql("SELECT * FROM task_instance WHERE dag_id = ? AND task_id = ?", DAG_ID, task_id)
        if not rows:
            raise SystemExit(
                f"{self.name}: no task instance {task_id!r} in the metadata database\n{self.tail()}"
            )
        return dict(rows[0])

    def state(self, task_id: str = "parse") -> str:
        return self.task_instance(task_id)["state"]

    def span(self, task_id: str = "parse") -> tuple[datetime, datetime]:
        """The task's first start and its end (:meth:`held`)."""
        spans, _ = self.held(task_id)
        if not spans:
            raise SystemExit(f"{self.name}: the task never ran\n{self.tail()}")
        return spans[0][0], spans[-1][1]

    def events(self, task_id: str = "parse") -> list[tuple[str, datetime]]:
        """The task instance's state changes that Airflow's audit log (the ``log`` table) recorded, in order."""
        rows = self.sql(
            "SELECT event, dttm FROM log WHERE dag_id = ? AND task_id = ? ORDER BY id", DAG_ID, task_id
        )
        return [(row["event"], _when(row["dttm"])) for row in rows]

    def held(self, task_id: str = "parse") -> tuple[list[tuple[datetime, datetime]], str]:
        """
        When the task held its worker: each span from its start or resume to its deferral or end,
        and where that was read.

        Airflow 3 records each state change of the task instance in its audit log (``running``,
        ``deferred``, ``success``...), from the task runner's own calls: those are used. Airflow
        2's ``dags test`` records only the end there, so the run's own log lines are used instead:
        from each ``[DAG TEST] running task`` to the next ``running trigger in line`` (a deferral) or
        ``end task``.
        """
        events = self.events(task_id)
        if any(event == "running" for event, _ in events):
            return spans_of(events), "the metadata database's audit log"
        marks = log_times(
            self.output, r"\[DAG TEST\] (running task|running trigger in line|end task)", keep=True
        )
        spans, start = [], None
        for line, at in marks:
            if "running task" in line:
                start = at
            elif start is not None:
                spans.append((start, at))
                start = None
        return spans, "the run's log lines"

    def trigger_waits(self) -> list[float]:
        """Seconds each deferral waited in the trigger: ``running trigger in line`` to ``Trigger completed``."""
        marks = log_times(self.output, r"\[DAG TEST\] (running trigger in line|Trigger completed)", keep=True)
        waits, start = [], None
        for line, at in marks:
            if "running trigger" in line:
                start = at
            elif start is not None:
                waits.append((at - start).total_seconds())
                start = None
        return waits

    def xcom(self, task_id: str = "parse") -> Any:
        """The task's return value as stored in XCom; None when it returned nothing (it failed)."""
        rows = self.sql(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = 'return_value'",
            DAG_ID,
            task_id,
        )
        if not rows or rows[0]["value"] is None:
            return None
        value = rows[0]["value"]
        value = json.loads(value.decode() if isinstance(value, bytes) else value)
        return json.loads(value) if isinstance(value, str) else value  # stored as JSON text on 3.x

    def parsed(self, total: int) -> int:
        """Images that came back parsed: the XCom's records, or all but those named in the task's error."""
        records = self.xcom()
        if records is not None:
            return len(records)
        named = re.search(r"(\d+) of (\d+) images were not parsed", self.output)
        if named is None:
            raise SystemExit(f"{self.name}: the task failed without naming its images\n{self.tail()}")
        return total - int(named[1])

    def must_succeed(self) -> TaskRun:
        if self.state() != "success":
            raise SystemExit(f"{self.name}: the task ended {self.state()!r}\n{self.tail()}")
        return self


def _when(value: str | None) -> datetime:
    """A time as the metadata database (naive UTC) or a log line writes it, in UTC."""
    if value is None:
        raise SystemExit("a task instance without a start or an end in the metadata database")
    at = datetime.fromisoformat(value.replace(",", ".").replace(" ", "T").replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def start(
    name: str, operator: dict[str, Any], *, prefix: str | None = None, env: dict[str, str] | None = None
) -> TaskRun:
    """
    Start ``airflow dags test doc2x_bench`` in a process of its own: its ``parse`` task is
    ``Doc2XImageParseOperator(**operator)`` (over the listing of ``prefix``, when given); ``env``
    adds to the bench's environment (the ``doc2x_default`` connection, ``DOC2X_PACING_DIR``, ...).
    """
    home = SCRATCH / "runs" / name
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    shutil.copy(migrated_database(), home / "airflow.db")
    spec = home / "spec.json"
    spec.write_text(json.dumps({"operator": operator, "prefix": prefix}))
    with open(home / "dags-test.log", "wb") as log:
        process = subprocess.Popen(
            [AIRFLOW, "dags", "test", DAG_ID],
            # The run's own home, database and DAG folder win over what ``env`` carries.
            env={**_base_env(home), **(env or {}), **_own(home), "DOC2X_BENCH_SPEC": str(spec)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=home,
        )
    _running.append(process)
    return TaskRun(name, home, process)


def run(name: str, operator: dict[str, Any], **kwargs: Any) -> TaskRun:
    """:func:`start`, then wait for the run to end."""
    return start(name, operator, **kwargs).wait()


def log_times(output: str, pattern: str, *, keep: bool = False) -> list[Any]:
    """
    The timestamps of the log lines that match ``pattern`` (Airflow 2's ``[2026-05-01T10:00:00.123+0000]``,
    Airflow 3's ``2026-05-01T10:00:00.123456Z``), in UTC; with ``keep``, ``(line, time)`` pairs.
    """
    found: list[Any] = []
    for line in output.splitlines():
        if re.search(pattern, line):
            stamp = re.search(r"(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?)", line)
            if stamp:
                at = _when(stamp[1])
                found.append((line, at) if keep else at)
    return found


#: What the operator logs of its own time in a task (``Doc2X: checked ...``, ``... submitted in ...``,
#: ``records of ... made in ...``); a line a release does not log is left out.
OPERATOR_LINES = {
    "checked": r"Doc2X: checked (?P<images>\d+) (?:images|files) in (?P<seconds>[\d.]+) s",
    "uploaded": r"Doc2X: (?P<images>\d+) images (?P<verb>submitted|parsed) in (?P<seconds>[\d.]+) s"
    r" \(task state store: (?P<writes>\d+) writes, (?P<store_seconds>[\d.]+) s\)",
    "records": r"Doc2X: records of (?P<images>\d+) images made in (?P<seconds>[\d.]+) s",
}


def operator_times(output: str) -> dict[str, dict[str, Any]]:
    """
    The operator's own timings in a task's log, by :data:`OPERATOR_LINES` name: each line's fields
    (numbers as floats) and ``at``, the line's time; the last line of each kind counts.
    """
    found: dict[str, dict[str, Any]] = {}
    for name, pattern in OPERATOR_LINES.items():
        for line, at in log_times(output, pattern, keep=True):
            match = re.search(pattern, line)
            assert match is not None
            fields: dict[str, Any] = {
                key: value if key == "verb" else float(value) for key, value in match.groupdict().items()
            }
            found[name] = {**fields, "at": at}
    return found


def spans_of(events: list[tuple[str, datetime]]) -> list[tuple[datetime, datetime]]:
    """The spans a task held its worker, from its audit log's events: each ``running`` to the next event."""
    spans, start = [], None
    for event, at in events:
        if event == "running":
            start = at
        elif start is not None:
            spans.append((start, at))
            start = None
    return spans
