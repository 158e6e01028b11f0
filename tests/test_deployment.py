"""
The provider in a real Airflow 3.3 deployment on loopback, deployed the way users run it: API
server, scheduler, dag-processor and a separate triggerer (LocalExecutor, SQLite), with the local
Doc2X server beside them. Runs are started and watched through Airflow's REST API.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tests.helpers import AIRFLOW_VERSION, REPO, STILL_PROCESSING, wait_until
from tests.helpers.deployment import Deployment

pytestmark = [
    pytest.mark.serial,
    pytest.mark.xdist_group("deployments"),
    pytest.mark.skipif(AIRFLOW_VERSION < (3, 3), reason="the deployment test runs Airflow 3.3"),
]

DAG_ID = "example_doc2x_parse_to_storage"
PAGES = 4  # the example images


def busy_workers() -> list[str]:
    """The LocalExecutor's worker processes that are running a task (their title says which)."""
    titles = []
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or []).strip()
        if title.startswith("airflow worker -- LocalExecutor") and not title.endswith("<idle>"):
            titles.append(title)
    return titles


@pytest.fixture(scope="module")
def deployment(local_server, tmp_path_factory):
    airflow = Deployment(tmp_path_factory.mktemp("deployment"), local_server.connection_json())
    yield airflow
    airflow.stop()


def test_the_parse_task_defers_frees_the_worker_and_the_run_succeeds(deployment, local_server, tmp_path):
    local_server.reset()
    # The task uploads for 3 s, then defers; Doc2X works until the test has seen the worker let go
    # (on a loaded host, that can take longer than any fixed processing time), then finishes the jobs.
    local_server.configure(processing_time=STILL_PROCESSING, upload_seconds=3)
    run_id = deployment.trigger(DAG_ID, {"output_path": str(tmp_path / "lake")})
    ti_id = wait_until(
        lambda: (deployment.task_instance(run_id, "parse") or {}).get("id"), timeout=60, interval=0.1
    )
    # While it uploads, a worker holds the task (its process title names the task instance) ...
    wait_until(
        lambda: [title for title in busy_workers() if ti_id in title],
        timeout=120,
        interval=0.05,
        message="a worker running the parse task",
    )
    wait_until(lambda: deployment.task_state(run_id, "parse") == "deferred", timeout=120, interval=0.2)
    assert local_server.stats()["jobs"] == PAGES  # submitted, and Doc2X is still processing them
    # ... and the worker that deferred the task lets go of it (its title returns to <idle>) ...
    wait_until(lambda: not [title for title in busy_workers() if ti_id in title], timeout=15, interval=0.1)
    # ... while the task is still deferred and Doc2X still working: the triggerer alone waits.
    assert deployment.task_state(run_id, "parse") == "deferred"
    local_server.configure(processing_time=0)
    deployment.wait_for_run(run_id)
    markdown = sorted((tmp_path / "lake").glob("*/*.md"))
    assert [path.stem for path in markdown] == ["invoice", "letter", "report", "scan"]
    assert markdown[0].read_text().startswith("# Invoice 2026-0042")
    assert local_server.stats()["max_billed_per_image"] == 1


def test_a_killed_triggerer_is_replaced_and_nothing_is_billed_twice(deployment, local_server, tmp_path):
    local_server.reset()
    local_server.configure(processing_time=15)
    run_id = deployment.trigger(DAG_ID, {"output_path": str(tmp_path / "lake")})
    wait_until(lambda: deployment.task_state(run_id, "parse") == "deferred", timeout=120, interval=0.2)
    wait_until(lambda: local_server.stats()["requests"].get("status", 0) >= PAGES, timeout=60, interval=0.2)
    deployment.kill("triggerer")  # mid-poll, without a chance to clean up
    deployment.start("triggerer")
    deployment.wait_for_run(run_id)
    stats = local_server.stats()
    assert stats["requests"]["submit"] == PAGES
    assert stats["billed_total"] == PAGES
    assert stats["max_billed_per_image"] == 1
    assert len(list((tmp_path / "lake").glob("*/*.md"))) == PAGES


# -- the connection form, in a browser ----------------------------------------------------------------

ARTIFACTS = REPO / "artifacts"


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not (chromium.exists() and chromedriver.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    options = Options()
    options.binary_location = str(chromium)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1100",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(chromedriver)), options=options)
    driver.implicitly_wait(10)
    yield driver
    driver.quit()


def rendered(find, what: str):
    """Poll ``find`` until it returns something: React re-renders, and stale elements are retried."""
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt():
        try:
            return find()
        except StaleElementReferenceException:
            return None

    return wait_until(attempt, timeout=30, interval=0.2, message=what)


def button(driver, text: str):
    """The button with this text, once the page has rendered it."""
    from selenium.webdriver.common.by import By

    return rendered(
        lambda: next(
            (item for item in driver.find_elements(By.TAG_NAME, "button") if item.text == text), None
        ),
        f"a {text!r} button",
    )


def field(driver, label_text: str):
    """The input a form label points at (the UI's ids are generated)."""
    from selenium.webdriver.common.by import By

    def find():
        for label in driver.find_elements(By.TAG_NAME, "label"):
            if label.text.split("\n")[0] == label_text:
                return driver.find_element(By.ID, label.get_attribute("for"))
        return None

    return rendered(find, f"a field labelled {label_text!r}")


def test_the_connection_form_in_a_browser(deployment, local_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    local_server.reset()
    browser.get(f"{deployment.api.base_url}/connections")
    button(browser, "Add Connection").click()
    field(browser, "Connection ID").send_keys("doc2x_from_ui")
    connection_type = field(browser, "Connection Type")
    connection_type.send_keys("Doc2X")
    offered = rendered(
        lambda: [option.text for option in browser.find_elements(By.CSS_SELECTOR, "[role=option]")], "options"
    )
    assert "Doc2X" in offered
    connection_type.send_keys(Keys.ENTER)
    host, key = field(browser, "Base URL"), field(browser, "API key")
    assert host.get_attribute("placeholder") == "https://v2.doc2x.noedgeai.com"
    assert key.get_attribute("type") == "password"  # the key is masked as it is typed
    labels = rendered(
        lambda: {label.text.split("\n")[0] for label in browser.find_elements(By.TAG_NAME, "label")}, "labels"
    )
    assert not labels & {"Login", "Port", "Schema"}  # hidden: Doc2X does not use them
    host.send_keys(local_server.url)
    key.send_keys("sk-typed-in-the-form")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "doc2x-connection-form.png"))
    button(browser, "Save").click()
    wait_until(lambda: deployment.api.get("/api/v2/connections/doc2x_from_ui").status_code == 200, timeout=20)
    stored = deployment.api.get("/api/v2/connections/doc2x_from_ui").json()
    assert (stored["conn_type"], stored["host"], stored["password"]) == ("doc2x", local_server.url, "***")

    # The Test button posts the stored connection to /connections/test, where the hook answers.
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Test Connection']").click()

    def test_answer() -> str | None:
        """The Test toast once it shows both its title and its message."""
        texts = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "[role=status]")]
        return next((text for text in texts if text.startswith("Test Connection") and "\n" in text), None)

    toast = rendered(test_answer, "the Test button's answer")
    browser.save_screenshot(str(ARTIFACTS / "doc2x-connection-test.png"))
    body = {"connection_id": "doc2x_from_ui", "conn_type": "doc2x", "host": local_server.url}
    good = deployment.api.post(
        "/api/v2/connections/test", json={**body, "password": local_server.api_key}
    ).json()
    assert good == {"status": True, "message": f"Doc2X at {local_server.url} accepted the API key"}
    bad = deployment.api.post("/api/v2/connections/test", json={**body, "password": "sk-wrong"}).json()
    assert bad["status"] is False
    assert "Doc2X refused the API key" in bad["message"]
    assert "sk-wrong" not in bad["message"]
    assert local_server.stats()["billed_total"] == 0
    if "Bad Request" in toast and AIRFLOW_VERSION == (3, 3):
        # Airflow 3.3.2's UI posts port 0 for a connection without a port, and its API then refuses
        # the test as "a different destination" (apache/airflow#73298, fixed after 3.3.2).
        pytest.xfail(f"Airflow's own Test-button bug for connections without a port: {toast!r}")
    assert "Doc2X refused the API key" in toast  # the form's key is not the server's
