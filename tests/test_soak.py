"""
The soak with random faults (``bench/soak.py``), small: 2 seeds of 30 images through both lanes,
each followed by an incremental re-run, with the faults its seeds draw. Its invariants must hold:
every image parsed with its own content or named with its code, no image billed twice unless
named "possibly billed twice", nothing stored under another image's name, a re-run bills nothing.
Timings are not checked.

Seeds 1 and 2 draw, among others, a worker killed mid-upload in each lane and a triggerer
restarted in each lane (the plan depends on the seed and the lane only), so the test also checks
that those faults were injected: a soak that injected nothing would prove nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

for _module in ("moto.server", "s3fs", "boto3", "airflow.providers.amazon"):
    pytest.importorskip(_module, reason=f"the soak needs {_module} (the test dependency group)")

SOAK = [
    sys.executable,
    str(REPO / "bench" / "soak.py"),
    "--seed-base",
    "1",
    "--seeds",
    "2",
    "--images",
    "30",
    "--lanes",
    "async,pdf",
    "--incremental",
    "--tries",
    "4",
]


def test_the_soak_s_invariants_hold_under_random_faults(tmp_path):
    figures_path = tmp_path / "soak.json"
    result = subprocess.run(
        [*SOAK, "--json", str(figures_path)], capture_output=True, text=True, cwd=REPO, timeout=900
    )
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert figures_path.exists(), output
    figures = json.loads(figures_path.read_text())
    # What broke, and how to replay it, is in the message when an invariant fails.
    assert figures["problems"] == [], "\n".join([*figures["problems"][:40], *figures["replay"]])
    assert figures["failed"] == {"lost": 0, "billed_twice": 0, "misplaced": 0, "rerun_billed": 0}
    assert result.returncode == 0, output
    # Every image of both lanes was checked after its first task and after its re-run (plus copies).
    assert figures["checks"]["images"] >= 2 * 2 * 30 * 2
    assert (
        figures["checks"]["parsed"] + sum(figures["checks"]["named"].values()) == figures["checks"]["images"]
    )
    assert figures["checks"]["sidecars"] > 0
    injected = figures["faults"]
    assert injected["worker_killed"] >= 2, injected
    assert injected["triggerer_restart"] >= 2, injected
    assert injected["s3_503"] > 0 and injected["doc2x_5xx"] + injected["reset_before_body"] > 0, injected
