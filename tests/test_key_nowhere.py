"""
The API key is nowhere but in the connection: deferrable ``airflow dags test`` runs (a success, a
failure, the PDF lane) use a distinctive key against a local server that quotes the
``Authorization`` header it received in every error answer. Afterwards the whole metadata database
(every column of every table, Fernet-encrypted values decrypted), every file under
``AIRFLOW_HOME`` (logs included) and the output folders, and the runs' stdout and stderr are
searched: the key is in none of them. The local server counts the requests to the routes a client
reaches without the key (the presigned PUT, the export download, the CDN): none carried it.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
from contextlib import suppress
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet, InvalidToken

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.local.process import LocalServerProcess
from airflow_provider_doc2x.local.samples import Page, render
from tests.helpers import HAS_TASK_STATE_STORE, REPO, airflow_cli

KEY = f"sk-NOWHERE-{secrets.token_hex(16)}"
#: What must be found nowhere: the key, and the key without its ``sk-`` prefix.
NEEDLES = (KEY, KEY.removeprefix("sk-"))
FERNET_KEY = Fernet.generate_key().decode()
#: Anything that looks like a Fernet token inside a stored value (connections, variables, trigger kwargs).
FERNET_TOKEN = re.compile(r"gAAAAA[A-Za-z0-9_\-]+=*")
EXAMPLE_IMAGES = REPO / "example_dags" / "images"


@pytest.fixture(scope="module")
def echoing_server():
    """A local server that accepts only ``KEY`` and quotes the Authorization header in every error."""
    server = LocalServerProcess(api_key=KEY, echo_key=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("key-nowhere-home")


@pytest.fixture(scope="module")
def airflow_env(home, echoing_server) -> dict[str, str]:
    """Airflow of its own (home, SQLite database, Fernet key), its temporary files under its home."""
    (home / "tmp").mkdir()
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__FERNET_KEY": FERNET_KEY,
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "example_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_DOC2X_DEFAULT": echoing_server.connection_json(retry_wait=0.01, retry_wait_max=0.05),
        "DOC2X_PACING_DIR": str(home / "pacing"),
        "TMPDIR": str(home / "tmp"),
    }
    migrated = airflow_cli("db", "migrate", env=env)
    assert migrated.returncode == 0, (migrated.stdout + migrated.stderr)[-3000:]
    return env


def readings(value: object, fernet: Fernet) -> list[str]:
    """A stored value as text, plus the plain text of every Fernet token in it."""
    if value is None or isinstance(value, (int, float)):
        return []
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    found = [text]
    for token in FERNET_TOKEN.findall(text):
        with suppress(InvalidToken):
            found.append(fernet.decrypt(token.encode()).decode("utf-8", "replace"))
    return found


def holds_key(text: str) -> bool:
    return any(needle in text for needle in NEEDLES)


def places_holding_the_key(database: Path, folders: list[Path], outputs: dict[str, str]) -> set[str]:
    """Every column, file and process output that holds the key (or the key without ``sk-``)."""
    fernet = Fernet(FERNET_KEY.encode())
    found = set()
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = connection.execute(f'SELECT * FROM "{table}"')
            columns = [item[0] for item in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    if any(holds_key(text) for text in readings(value, fernet)):
                        found.add(f"database {table}.{column}")
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and any(needle.encode() in path.read_bytes() for needle in NEEDLES):
                found.add(f"file {path}")
    found |= {f"output of {name}" for name, text in outputs.items() if holds_key(text)}
    return found


def table_rows(database: Path, table: str) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return connection.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]


def dags_test(dag_id: str, conf: dict, env: dict[str, str]) -> tuple[int, str]:
    result = airflow_cli("dags", "test", dag_id, "-c", json.dumps(conf), env=env)
    return result.returncode, result.stdout + result.stderr


def test_the_key_is_nowhere_after_a_success_a_failure_and_the_pdf_lane(
    echoing_server, airflow_env, home, tmp_path
):
    server = echoing_server
    # The server does echo the key in its errors: what the provider receives and must not pass on.
    refused = httpx.get(
        f"{server.url}{protocol.STATUS_PATH}",
        params={"uid": "unknown"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert KEY in refused.text
    outputs: dict[str, str] = {}
    out = tmp_path / "out"

    # (a) A success through the image lane.
    server.reset()
    server.configure(processing_time=0.2, fail_next=2)  # two gateway errors quoting the key, retried
    code, outputs["the successful run"] = dags_test(
        "example_doc2x_parse_to_storage", {"output_path": str(out / "success")}, airflow_env
    )
    assert code == 0, outputs["the successful run"][-4000:]
    assert len(list((out / "success").glob("*/*.md"))) == 4

    # (b) A failure: a job Doc2X fails, and an image it refuses, each answered with the key quoted.
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "fine.png").write_bytes(render(Page(title="Fine"), size=(400, 300)))
    (inbox / "doomed.png").write_bytes(
        render(Page(title="Doomed", paragraphs=["<!-- doc2x-fail: parse_error -->"]), size=(400, 300))
    )
    # Whole by its structure (the task's own check passes it), but its pixel data is garbage: only
    # Doc2X, decoding it, refuses it.
    broken = bytearray(render(Page(title="Broken"), size=(400, 300)))
    broken[len(broken) // 2 : len(broken) // 2 + 64] = bytes(64)
    (inbox / "broken.png").write_bytes(bytes(broken))
    server.reset()
    server.configure(processing_time=0.2)
    code, outputs["the failed run"] = dags_test(
        "example_doc2x_parse_to_storage",
        {"folder": str(inbox), "output_path": str(out / "failure")},
        airflow_env,
    )
    assert code != 0
    assert "doomed.png" in outputs["the failed run"] and "broken.png" in outputs["the failed run"]
    assert server.stats()["requests"]["submit"] >= 2  # the failures were Doc2X's answers, not a local check

    # (c) The PDF lane, two PDFs: one fails (its status quotes the key), the other is exported.
    server.reset()
    server.configure(pickup_delay=0.2, pdf_page_seconds=0.05, export_seconds=0, pdf_fail_next=1)
    two_pdfs = echoing_server.connection_json(pdf_max_pages_in_flight=2, retry_wait=0.01, retry_wait_max=0.05)
    code, outputs["the PDF lane's run"] = dags_test(
        "example_doc2x_bulk_pdf",
        {"output_path": str(out / "pdf")},
        {**airflow_env, "AIRFLOW_CONN_DOC2X_DEFAULT": two_pdfs},
    )
    assert code == 0, outputs["the PDF lane's run"][-4000:]
    assert len(list((out / "pdf").glob("*/*.md"))) == 4
    stats = server.stats()
    assert stats["pdf_tasks_failed"] == 1 and stats["pdf_pages_billed"] > 0
    keyless = stats["keyless_routes"]
    assert keyless["put"]["requests"] > 0 and keyless["export"]["requests"] > 0
    assert {route: counts["with_authorization"] for route, counts in keyless.items()} == {
        "put": 0,
        "export": 0,
        "cdn": 0,
    }

    # What was searched holds what the runs left: XCom, and on Airflow 3.3 the trigger kwargs (2.11's
    # ``dags test`` runs its triggers without storing them) and the uids recorded in the state store.
    database = home / "airflow.db"
    assert table_rows(database, "xcom") > 0
    if HAS_TASK_STATE_STORE:
        assert table_rows(database, "trigger") > 0
        assert table_rows(database, "task_state_store") > 0

    # Positive control: the key put in one known place of each kind is found there, and only there:
    # a file, a Variable imported from it (stored encrypted), and the output that shows the Variable.
    planted = home / "planted.json"
    planted.write_text(json.dumps({"planted_key": KEY}))
    imported = airflow_cli("variables", "import", str(planted), env=airflow_env)
    assert imported.returncode == 0, (imported.stdout + imported.stderr)[-3000:]
    shown = airflow_cli("variables", "get", "planted_key", env=airflow_env)
    outputs["airflow variables get"] = shown.stdout + shown.stderr

    assert places_holding_the_key(database, [home, out], outputs) == {
        "database variable.val",  # found once decrypted
        f"file {planted}",
        "output of airflow variables get",
    }
