"""The provider as Airflow sees it: entry point, CLI listing, connection type and its form."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import airflow_provider_doc2x
from airflow_provider_doc2x import __version__
from airflow_provider_doc2x.get_provider_info import get_provider_info
from tests.helpers import API_KEY, REPO, airflow_cli

#: Every supported Airflow line runs these (docs/installation.md, "By Airflow line"), not only the newest and oldest.
pytestmark = pytest.mark.compat


def test_entry_point_returns_the_provider_info():
    (entry,) = [
        ep
        for ep in entry_points(group="apache_airflow_provider")
        if ep.value.startswith("airflow_provider_doc2x")
    ]
    info = entry.load()()
    assert info == get_provider_info()
    assert info["package-name"] == "airflow-provider-doc2x"
    (connection,) = info["connection-types"]
    assert connection["connection-type"] == "doc2x"
    assert connection["hook-class-name"] == "airflow_provider_doc2x.hooks.doc2x.Doc2XHook"
    modules = {
        module
        for kind in ("hooks", "operators", "sensors", "triggers")
        for item in info[kind]
        for module in item["python-modules"]
    }
    for module in modules:
        __import__(module)


def test_the_package_under_test_is_the_one_installed():
    """``.ci/run`` tests one line against the built wheel: there, no process may import the checkout."""
    expected = os.environ.get("DOC2X_TESTS_IMPORT", "source")
    here = Path(airflow_provider_doc2x.__file__).resolve()
    # ... and a process the tests start (the local server, ``airflow dags test``) imports the same.
    child = subprocess.run(
        [sys.executable, "-c", "import airflow_provider_doc2x; print(airflow_provider_doc2x.__file__)"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    for location in (here, Path(child.stdout.strip()).resolve()):
        if expected == "wheel":
            assert "site-packages" in location.parts and REPO not in location.parents, location
        else:
            assert location.parent == REPO / "airflow_provider_doc2x", location


def test_providers_get_lists_it(airflow_db):
    result = airflow_cli("providers", "get", "airflow-provider-doc2x", env={})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "airflow-provider-doc2x" in result.stdout
    assert __version__ in result.stdout


def test_connection_form_is_labelled_as_the_provider_says():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    behaviour = manager.field_behaviours["doc2x"]
    assert set(behaviour["hidden_fields"]) == {"schema", "login", "port"}
    assert behaviour["relabeling"] == {"password": "API key", "host": "Base URL"}
    assert behaviour["placeholders"]["host"] == "https://v2.doc2x.noedgeai.com"
    widgets = manager.connection_form_widgets
    assert {"extra__doc2x__timeout", "extra__doc2x__max_retries", "extra__doc2x__rate_limit_images"} <= set(
        widgets
    )
    assert manager.hooks["doc2x"].hook_name == "Doc2X"


def add_connection(conn_id: str, host: str, password: str):
    return airflow_cli(
        "connections",
        "add",
        conn_id,
        "--conn-type",
        "doc2x",
        "--conn-host",
        host,
        "--conn-password",
        password,
        env={},
    )


def test_connections_add_and_test_from_the_cli(doc2x, airflow_db):
    enabled = {"AIRFLOW__CORE__TEST_CONNECTION": "Enabled"}
    for conn_id, key in (("doc2x_good_key", API_KEY), ("doc2x_bad_key", "sk-not-this-one")):
        added = add_connection(conn_id, doc2x.url, key)
        assert added.returncode == 0, added.stderr[-3000:]
    good = airflow_cli("connections", "test", "doc2x_good_key", env=enabled)
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    assert "Connection success!" in good.stdout
    bad = airflow_cli("connections", "test", "doc2x_bad_key", env=enabled)
    assert "Doc2X refused the API key" in bad.stdout
    assert "sk-not-this-one" not in bad.stdout + bad.stderr
    assert doc2x.stats()["billed_total"] == 0
    for conn_id in ("doc2x_good_key", "doc2x_bad_key"):
        airflow_cli("connections", "delete", conn_id, env={})


def documented_extras() -> dict[str, str]:
    """The docs' table of connection extras (docs/connection.md): name -> default, as written."""
    text = (REPO / "docs" / "connection.md").read_text()
    table = text.split("## Connection extras", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    return {name.strip().strip("`"): default.strip().strip("`") for name, default, *_ in rows}


def test_the_form_the_settings_and_the_docs_agree_on_the_extras():
    import dataclasses

    from airflow.providers_manager import ProvidersManager

    from airflow_provider_doc2x.settings import Doc2XSettings, conn_fields, extra_fields

    declared = {
        item.name: item.default for item in dataclasses.fields(Doc2XSettings) if item.name in extra_fields()
    }
    assert set(conn_fields()) == set(declared)
    assert {f"extra__doc2x__{name}" for name in declared} <= set(ProvidersManager().connection_form_widgets)
    documented = documented_extras()
    assert set(documented) == set(declared)
    for name, default in declared.items():
        shown = documented[name]
        if default is None:
            assert shown == "none", name
        elif isinstance(default, str):
            assert shown == default, name
        else:
            assert float(shown) == float(default), name
