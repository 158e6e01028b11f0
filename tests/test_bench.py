"""
The bench scripts still run (tiny parameters); their figures are read by people, not asserted.

The benches that run the operator in real Airflow tasks (``airflow dags test``, ``bench/_airflow.py``)
copy the suite's migrated database instead of migrating their own, and say so on their first line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import AIRFLOW_VERSION, REPO
from tests.helpers.deployment import CeleryDeployment

RUNS = {
    # The PDF lane's baseline and the image lane's (pdf, jpeg: always run), a packed and a converted format.
    "documents.py": ["--small", "--only", "tiff,webp"],
    "throughput.py": [
        "--images",
        "24",
        "--limit",
        "6",
        "--window",
        "0.5",
        "--processing",
        "0.2",
        "--tasks",
        "2",
    ],
    "mapped_pool.py": [
        "--images",
        "16",
        "--tasks",
        "4",
        "--limit",
        "8",
        "--window",
        "2",
        "--processing",
        "0.3",
    ],
    "celery_pacing.py": [
        "--images",
        "16",
        "--tasks",
        "4",
        "--limit",
        "8",
        "--window",
        "2",
        "--processing",
        "0.5",
    ],
    "worker_occupancy.py": ["--processing", "0.3", "--tasks", "1", "--poll-interval", "0.1"],
    "triggerer.py": ["--triggers", "20", "--processing", "0.3", "--poll-interval", "0.1", "--alone", "1"],
    "upload.py": [],
    "import_time.py": ["--runs", "2"],
    "packing_memory.py": ["--images", "6", "--pdfs", "3", "--side", "200"],
    "slow_link.py": [
        "--images",
        "16",
        "--limit",
        "6",
        "--window",
        "0.5",
        "--processing",
        "0.1",
        "--multiples",
        "2",
    ],
    "batch_cost.py": ["--images", "30,60", "--processing", "0.2"],
    "task_cost.py": ["--images", "12", "--processing", "0.3"],
    "window_rule.py": [
        "--images",
        "24",
        "--limit",
        "6",
        "--window",
        "0.6",
        "--processing",
        "0.1",
        "--multiples",
        "1",
    ],
    "incremental.py": ["--existing", "200", "--new", "10", "--changed", "3", "--image-kb", "2"],
    "ocr_engine.py": ["--rounds", "1", "--threads", "1"],
    "backfill.py": ["--images", "40", "--tasks", "2", "--calibrate", "40", "--slots", "2"],
    "pdf_lane.py": [
        "--counts",
        "12",
        "--limit",
        "6",
        "--window",
        "0.5",
        "--processing",
        "0.2",
        "--pickup",
        "0.1",
    ],
}


#: The benches that deploy Airflow run in the deployment step, not beside the loopback tests.
DEPLOYING = ("mapped_pool.py", "celery_pacing.py", "triggerer.py", "task_cost.py", "backfill.py")
#: One after the other in the deployment step, beside the deployment tests (which run one at a time
#: too): each side keeps about one core busy (``.ci/run``, ``--dist loadgroup``).
DEPLOYING_MARKS = [pytest.mark.serial, pytest.mark.xdist_group("deploying-benches")]
#: The benches whose tasks run through ``airflow dags test``.
THROUGH_DAGS_TEST = (
    "documents.py",
    "worker_occupancy.py",
    "throughput.py",
    "slow_link.py",
    "pdf_lane.py",
    "incremental.py",
    "window_rule.py",
    "task_cost.py",
)


@pytest.mark.parametrize(
    "script",
    [pytest.param(script, marks=DEPLOYING_MARKS if script in DEPLOYING else []) for script in sorted(RUNS)],
)
def test_bench_script_runs_and_prints_its_figures(script, request):
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW_CONN_")}
    if script in THROUGH_DAGS_TEST:
        env["DOC2X_BENCH_AIRFLOW_DB"] = str(request.getfixturevalue("airflow_db") / "airflow.db")
    if script == "incremental.py":
        for module in ("moto.server", "s3fs", "boto3", "airflow.providers.amazon"):
            pytest.importorskip(module, reason=f"the S3 bench needs {module} (the test dependency group)")
    if script == "ocr_engine.py":
        pytest.importorskip("rapidocr", reason="the ocr extra is not installed")
    if script in DEPLOYING and AIRFLOW_VERSION < (3, 3) and script not in THROUGH_DAGS_TEST:
        pytest.skip("this bench runs Airflow 3.3's own components")
    if script == "celery_pacing.py" and (missing := CeleryDeployment.missing()):
        pytest.skip(f"cannot deploy with Celery here: {missing}")
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *RUNS[script]],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO / "bench",
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "\n## " in result.stdout
    if script in THROUGH_DAGS_TEST:
        assert "through `airflow dags test`" in result.stdout.splitlines()[0]
        assert not re.search(r"\bexecute\(", (REPO / "bench" / script).read_text())
    if script in (
        "throughput.py",
        "mapped_pool.py",
        "celery_pacing.py",
    ):  # never billed twice, whatever the timing
        assert re.findall(r"max billings of one image\s+(\d+)", result.stdout) == ["1", "1", "1"]
    if script == "backfill.py":  # every image parsed and billed once, its results as files and in XCom
        assert re.findall(r"images parsed\s+(\d+)", result.stdout) == ["40", "40"]
        assert re.findall(r"pages billed (\d+), at most (\d+) per page", result.stdout) == [("40", "1")] * 2
