"""Importing the provider changes nothing in the process that imports it: no PDF packer at DAG parse.

img2pdf loads pikepdf, whose import logs "pikepdf C++ to Python logger bridge initialized" into
whatever log is open: every DAG parse and every task log, if the operator's module imported it.
The packer is imported when the first PDF is packed instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO

#: A DAG processor's parse of the example DAGs, then (with an argument) the packer's first use.
PARSE = """
import json, sys
try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:
    from airflow.models.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
seen = {"dags": sorted(bag.dags), "errors": sorted(bag.import_errors), "loaded": "pikepdf" in sys.modules}
if len(sys.argv) > 2:
    from PIL import Image
    from airflow_provider_doc2x.pdf.packing import pack_images
    Image.new("RGB", (40, 60), "white").save(sys.argv[2] + "/page.jpg", "JPEG")
    assert pack_images([sys.argv[2] + "/page.jpg"], temp_dir=sys.argv[2]).pdfs
    seen["loaded_after_packing"] = "pikepdf" in sys.modules
print(json.dumps(seen))
"""

BRIDGE = "logger bridge initialized"


def parse_examples(tmp_path, *extra: str) -> tuple[dict, str]:
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "home"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }
    done = subprocess.run(
        [sys.executable, "-c", PARSE, str(REPO / "example_dags"), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout + done.stderr


def test_parsing_the_example_dags_loads_no_pdf_packer_and_logs_nothing_from_it(tmp_path):
    seen, output = parse_examples(tmp_path)
    assert seen["errors"] == [] and "example_doc2x_bulk_pdf" in seen["dags"]
    assert seen["loaded"] is False
    assert BRIDGE not in output


def test_the_packer_is_loaded_and_heard_at_its_first_use(tmp_path):
    """Positive control: the same process, once it packs, has pikepdf and its log line."""
    seen, output = parse_examples(tmp_path, str(tmp_path))
    assert seen["loaded"] is False and seen["loaded_after_packing"] is True
    assert BRIDGE in output
