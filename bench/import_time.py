"""
What importing the operator costs a DAG file, beyond Airflow itself, and which libraries it loads.

    python bench/import_time.py [--runs 7]

Each run is a fresh interpreter that imports Airflow's SDK first (Airflow 2: its BaseOperator; a
DAG file has it already),
then times ``import airflow_provider_doc2x.operators.doc2x`` alone, and lists which of the PDF
packer's libraries (img2pdf, pikepdf, Pillow) that import loaded. Printed: the median, minimum and
maximum over the runs. Point ``PYTHONPATH`` at another checkout to measure it the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from _support import report

PROBE = """
import json, sys, time
try:
    import airflow.sdk  # what a DAG file imports anyway (Airflow 3)
except ImportError:
    import airflow.models.baseoperator  # Airflow 2
before = set(sys.modules)
start = time.perf_counter()
import airflow_provider_doc2x.operators.doc2x
took = time.perf_counter() - start
heavy = [name for name in ("img2pdf", "pikepdf", "PIL.Image") if name in sys.modules and name not in before]
print(json.dumps({"seconds": took, "loaded": heavy}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters (default 7)")
    args = parser.parse_args()
    figures, loaded = [], set()
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
        probe = json.loads(out.strip().splitlines()[-1])
        figures.append(probe["seconds"] * 1000)
        loaded.update(probe["loaded"])
    print(f"# import_time: the operator's module after Airflow's SDK, {args.runs} fresh interpreters")
    report(
        "import airflow_provider_doc2x.operators.doc2x",
        [
            ("ms, median", f"{statistics.median(figures):.0f}"),
            ("ms, min / max", f"{min(figures):.0f} / {max(figures):.0f}"),
            ("PDF packer libraries loaded", ", ".join(sorted(loaded)) or "none"),
        ],
    )


if __name__ == "__main__":
    main()
