"""
Fixtures shared by the suite: an isolated Airflow home, the local Doc2X server on a free port,
a ``doc2x_default`` connection pointing at it, and images with known content.

Everything talks real HTTP over loopback to the server, started once per session as its own
process (``python -m airflow_provider_doc2x.local --port 0``) exactly as a user starts it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import API_KEY, REPO, wait_until

# Airflow reads its home and configuration when first imported: set them before any test module does.
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="doc2x-airflow-home-"))
atexit.register(shutil.rmtree, AIRFLOW_HOME, ignore_errors=True)
os.environ.update(
    {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "example_dags"),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }
)

# Airflow 2.11's ExecutorSafeguard sets a per-thread attribute when baseoperator is first imported:
# importing it here, in the main thread, keeps a test that first imports it in a worker thread from
# breaking every later operator of this process.
import airflow.models.baseoperator  # noqa: E402,F401

from airflow_provider_doc2x.local.process import LocalServerProcess  # noqa: E402
from airflow_provider_doc2x.local.samples import Page, render  # noqa: E402
from airflow_provider_doc2x.pdf import submission as pdf_submission  # noqa: E402

#: The tests whose xdist_group pytest-xdist lost (see pytest_collection_modifyitems).
_LOST_GROUP = pytest.StashKey[set[str]]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker under ``--dist loadgroup``, note the tests whose ``xdist_group`` did not
    reach the scheduler: the deployment tests rely on it to run one at a time, and a pytest that
    pytest-xdist cannot name groups for (pytest-dev/pytest-xdist#1386) lets them run side by side,
    silently. Each such test then fails, saying why."""
    if getattr(config.option, "loadgroup", False):
        config.stash[_LOST_GROUP] = {
            item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid
        }


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.nodeid in item.config.stash.get(_LOST_GROUP, set()):
        pytest.fail(
            "--dist loadgroup lost this test's xdist_group, so it would not run one at a time: this "
            "pytest and pytest-xdist do not work together (pytest-dev/pytest-xdist#1386); install the "
            "versions that pyproject.toml's test group allows",
            pytrace=False,
        )


class LocalDoc2X(LocalServerProcess):
    """The running local server, seen from the tests; connections retry fast to keep the suite quick."""

    def connection_json(self, api_key: str | None = None, **extra) -> str:
        return super().connection_json(api_key, **{"retry_wait": 0.01, "retry_wait_max": 0.05, **extra})


@pytest.fixture(scope="session")
def local_server():
    server = LocalDoc2X(api_key=API_KEY)
    yield server
    server.stop()


@pytest.fixture
def doc2x(local_server, monkeypatch, tmp_path):
    """The local server, reset, fast (0.2 s jobs), wired as ``doc2x_default`` through the environment."""
    from airflow_provider_doc2x.pacing import reset_limiters

    # An upload an earlier test left stalled would count in this test's figures: let it end first.
    wait_until(
        lambda: local_server.stats()["uploads_in_flight"] == 0, timeout=60, message="no upload in flight"
    )
    local_server.reset()
    local_server.configure(processing_time=0.2)
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", local_server.connection_json())
    monkeypatch.setenv("DOC2X_PACING_DIR", str(tmp_path / "pacing"))  # a fresh window per test
    reset_limiters()
    yield local_server
    reset_limiters()


@pytest.fixture
def make_image(tmp_path):
    """Write a page with known Markdown; ``make_image("a.png", "Title")``."""
    counter = iter(range(10_000))

    def make(name: str | None = None, title: str | None = None, *, fmt: str | None = None, **page) -> Path:
        number = next(counter)
        name = name or f"page-{number}.png"
        fmt = fmt or ("JPEG" if name.endswith((".jpg", ".jpeg")) else "PNG")
        path = tmp_path / name
        path.write_bytes(render(Page(title=title or f"Page {number}", **page), fmt=fmt, size=(400, 300)))
        return path

    return make


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's metadata database, migrated once (SQLite in the session's Airflow home)."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return AIRFLOW_HOME


@pytest.fixture
def lane(doc2x, monkeypatch):
    """The local server with PDF tasks picked up and parsed at once; no url remembered from another test."""
    doc2x.configure(pickup_delay=0, pdf_page_seconds=0, export_seconds=0)
    monkeypatch.setattr(pdf_submission, "_used_urls", pdf_submission._UsedUrls())
    return doc2x
