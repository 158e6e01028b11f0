"""The hook against the local server over real HTTP: every endpoint, error, retry and check."""

from __future__ import annotations

import base64
import io
import logging
import pickle
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import tenacity

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import (
    Doc2XAuthError,
    Doc2XError,
    Doc2XInputError,
    Doc2XJobNotFoundError,
    Doc2XPermanentError,
    Doc2XProtocolError,
    Doc2XRateLimitError,
    Doc2XSubmitUncertainError,
    Doc2XTransientError,
)
from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
from airflow_provider_doc2x.transport import Backoff
from tests.helpers import API_KEY, wait_until

try:
    from airflow.sdk.exceptions import AirflowFailException
except ImportError:  # Airflow 2
    from airflow.exceptions import AirflowFailException


def wait_for_success(hook: Doc2XHook, uid: str) -> protocol.Doc2XJobStatus:
    return wait_until(lambda: (status := hook.get_job_status(uid)).is_terminal and status, message=uid)


@pytest.mark.parametrize("name", ["invoice.png", "scan.jpg"])
def test_sync_parse_png_and_jpeg(doc2x, make_image, name):
    image = make_image(name, "Quarterly Figures", paragraphs=["Revenue grew."])
    result = Doc2XHook().parse_image(image)
    assert result.uid
    assert [page.page_width for page in result.pages] == [400]
    assert result.markdown.startswith("# Quarterly Figures\n\nRevenue grew.")
    assert doc2x.stats()["billed_total"] == 1


@pytest.mark.parametrize("name", ["invoice.png", "scan.jpg"])
def test_async_submit_then_status_until_success(doc2x, make_image, name):
    hook = Doc2XHook()
    uid = hook.submit_image(make_image(name, "Async Page"))
    assert hook.get_job_status(uid).status == protocol.STATUS_PROCESSING
    status = wait_for_success(hook, uid)
    assert status.status == protocol.STATUS_SUCCESS
    assert status.result is not None
    assert status.result.pages[0].page_idx == 0
    assert status.result.markdown.startswith("# Async Page")


async def test_async_status_from_an_event_loop(doc2x, make_image):
    hook = Doc2XHook()
    uid = hook.submit_image(make_image(title="Loop Page"))
    try:
        status = await hook.aget_job_status(uid)
        assert status.status == protocol.STATUS_PROCESSING
        wait_for_success(hook, uid)
        status = await hook.aget_job_status(uid)
        assert status.result is not None
        assert status.result.markdown.startswith("# Loop Page")
    finally:
        await hook.aclose()


async def test_the_shared_async_client_is_built_off_the_event_loop(doc2x, monkeypatch):
    """Building a TLS context reads the CA bundle from disk: the triggerer's loop must not wait for it."""
    built_in = []
    build = httpx.AsyncClient.__init__

    def recording_build(self, *args, **kwargs):
        built_in.append(threading.current_thread())
        build(self, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "__init__", recording_build)
    hooks = [Doc2XHook(), Doc2XHook()]
    try:
        for hook in hooks:
            with pytest.raises(Doc2XJobNotFoundError):
                await hook.aget_job_status("no-such-uid")
    finally:
        for hook in hooks:
            await hook.aclose()
    # One pair of clients for the loop (uploads and the rest), shared by both hooks.
    assert len(built_in) == 2
    assert threading.current_thread() not in built_in


async def test_async_submit_is_paced_and_billed_once(doc2x, make_image, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(rate_limit_images=2, rate_limit_window=0.3)
    )
    doc2x.configure(rate_limit=2, rate_window=0.3)
    hook = Doc2XHook()
    images = [make_image(title=f"Async {n}").read_bytes() for n in range(5)]
    uids = [await hook.asubmit_image(image, source=f"async-{n}.png") for n, image in enumerate(images)]
    await hook.aclose()
    stats = doc2x.stats()
    assert len(set(uids)) == 5
    assert (stats["billed_total"], stats["max_billed_per_image"], stats["rate_limited"]) == (5, 1, 0)


def test_figures_come_as_a_zip_the_markdown_refers_to(doc2x, make_image):
    result = Doc2XHook().parse_image(
        make_image(title="Figure Page", figure=False, paragraphs=["<!-- figure: 10,10,50,40 -->"])
    )
    assert result.convert_zip
    archive = zipfile.ZipFile(io.BytesIO(base64.b64decode(result.convert_zip)))
    names = archive.namelist()
    assert len(names) == 1 and names[0].startswith("images/")
    assert f'<img src="{names[0].removeprefix("images/")}"/>' in result.markdown
    assert archive.read(names[0]).startswith(b"\xff\xd8\xff")


ERROR_CASES = [
    ("parse_error", Doc2XError),
    ("parse_file_invalid", Doc2XInputError),
    ("parse_file_not_image", Doc2XInputError),
    ("parse_file_too_large", Doc2XInputError),
    ("parse_quota_limit", Doc2XPermanentError),
    ("parse_status_not_found", Doc2XJobNotFoundError),
    ("unauthorized", Doc2XAuthError),
    ("parse_create_task_error", Doc2XTransientError),
    ("internal_error", Doc2XTransientError),
    ("parse_task_limit_exceeded", Doc2XRateLimitError),
    ("parse_concurrency_limit", Doc2XRateLimitError),
    ("request_limit_exceeded", Doc2XRateLimitError),
    ("a_code_nobody_documented", Doc2XProtocolError),
]


def test_every_documented_code_is_mapped():
    documented = {code for code, _ in ERROR_CASES} - {"a_code_nobody_documented"}
    assert documented == set(protocol.ERROR_CODES)


@pytest.mark.parametrize(("code", "error_class"), ERROR_CASES)
def test_each_error_code_of_a_job_raises_its_class(doc2x, make_image, monkeypatch, code, error_class):
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(max_retries=1))
    hook = Doc2XHook()
    uid = hook.submit_image(make_image(title="Doomed", paragraphs=[f"<!-- doc2x-fail: {code} -->"]))
    wait_until(lambda: doc2x.stats()["jobs"] == 1)

    def failed():
        try:
            return hook.get_job_status(uid).status != protocol.STATUS_PROCESSING and "no error"
        except Doc2XError as error:
            return error

    error = wait_until(failed, message=f"job {uid} to fail")
    assert isinstance(error, error_class)
    assert error.code == code
    assert error.uid == uid
    assert code in str(error) and uid in str(error)
    assert error.trace_id
    permanent = issubclass(error_class, Doc2XPermanentError)
    assert isinstance(error, AirflowFailException) is permanent
    assert protocol.is_retryable(error) is issubclass(error_class, Doc2XTransientError)


def test_a_transient_code_is_retried_then_reported(doc2x, make_image, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(max_retries=2))
    image = make_image(title="Broken", paragraphs=["<!-- doc2x-fail: internal_error -->"])
    with pytest.raises(Doc2XTransientError, match="internal_error"):
        Doc2XHook().parse_image(image)
    assert doc2x.stats()["requests"]["parse"] == 3


def test_html_error_page_is_retried(doc2x, make_image):
    doc2x.configure(fail_next=2)
    result = Doc2XHook().parse_image(make_image(title="After The Storm"))
    assert result.markdown.startswith("# After The Storm")
    assert doc2x.stats()["requests"]["parse"] == 1  # the two failed answers came from the gateway


def test_html_error_page_quotes_status_and_body_when_retries_run_out(doc2x, make_image, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(max_retries=0))
    doc2x.configure(fail_next=1)
    with pytest.raises(Doc2XTransientError) as caught:
        Doc2XHook().get_job_status("some-uid")
    assert caught.value.http_status == 503
    assert "HTTP 503" in str(caught.value) and "<html>" in str(caught.value)
    assert doc2x.stats()["billed_total"] == 0


def test_wrong_key_fails_at_once_without_leaking_it(doc2x, make_image, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(api_key="sk-wrong-key-77"))
    with pytest.raises(Doc2XAuthError) as caught:
        Doc2XHook().submit_image(make_image())
    assert caught.value.http_status == 401
    assert isinstance(caught.value, AirflowFailException)
    assert "sk-wrong-key-77" not in str(caught.value)
    assert doc2x.stats()["requests"]["submit"] == 1  # not retried
    assert doc2x.stats()["billed_total"] == 0


def test_rate_limited_uploads_are_retried_never_dropped_nor_billed_twice(doc2x, make_image, monkeypatch):
    # Our pacing is switched off (100 per window) so that the server's 429s really happen.
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(rate_limit_images=100, max_retries=20)
    )
    doc2x.configure(rate_limit=2, rate_window=0.3)
    hook = Doc2XHook()
    uids = [hook.submit_image(make_image(title=f"Burst {n}")) for n in range(5)]
    stats = doc2x.stats()
    assert len(set(uids)) == 5
    assert stats["rate_limited"] > 0
    assert stats["billed_total"] == 5 and stats["max_billed_per_image"] == 1


def test_pacing_keeps_a_batch_under_the_key_limit(doc2x, make_image, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(rate_limit_images=3, rate_limit_window=0.3)
    )
    doc2x.configure(rate_limit=3, rate_window=0.3)
    hook = Doc2XHook()
    for n in range(8):
        hook.submit_image(make_image(title=f"Paced {n}"))
    stats = doc2x.stats()
    assert stats["rate_limited"] == 0
    assert stats["billed_total"] == 8


def test_retry_after_is_a_floor_of_the_back_off():
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.attempt_number = 1
    error = Doc2XRateLimitError("slow down", retry_after=4.0)
    state.set_exception((type(error), error, None))
    assert Backoff(0.01, 0.02)(state) >= 4.0
    state.set_exception((ValueError, ValueError(), None))
    assert Backoff(0.01, 0.02)(state) <= 0.02


def make_broken(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    pdf = tmp_path / "paper.jpg"
    pdf.write_bytes(b"%PDF-1.7\n...")
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * protocol.MAX_IMAGE_BYTES)
    return {
        "missing": (tmp_path / "missing.png", "does not exist"),
        "empty": (empty, "is empty"),
        "text": (text, r"not a JPEG or PNG by its content \(it looks like text\)"),
        "pdf": (pdf, r"not a JPEG or PNG by its content \(it looks like a PDF document\)"),
        "huge": (huge, "over Doc2X's limit"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "text", "pdf", "huge"])
@pytest.mark.parametrize("call", ["parse_image", "submit_image"])
def test_bad_input_is_refused_before_anything_is_sent(doc2x, tmp_path, case, call):
    path, reason = make_broken(tmp_path)[case]
    with pytest.raises(Doc2XInputError, match=reason) as caught:
        getattr(Doc2XHook(), call)(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, AirflowFailException)
    assert doc2x.stats()["requests"] == {}


def test_lost_answer_after_upload_is_never_resent(doc2x, make_image, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(timeout=0.5))
    doc2x.configure(stall_next=1, stall_seconds=3)
    image = make_image("lost.png", title="Lost Answer")
    with pytest.raises(Doc2XSubmitUncertainError) as caught:
        Doc2XHook().submit_image(image)
    assert str(image) in str(caught.value)
    assert "may have billed" in str(caught.value)
    stats = doc2x.stats()
    assert stats["requests"]["submit"] == 1
    assert stats["billed_total"] == 1


def test_status_calls_whose_answer_is_lost_are_retried(doc2x, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(timeout=0.5, max_retries=2))
    doc2x.configure(latency=3.0)  # the first status answer would come after the call's deadline
    with ThreadPoolExecutor(1) as pool:
        asking = pool.submit(Doc2XHook().get_job_status, "unknown-uid")
        wait_until(lambda: doc2x.stats()["max_in_flight"] >= 1, message="the first status call to arrive")
        doc2x.configure(latency=0)  # the retry is answered at once
        # The answer that arrives is the retry's: the job is unknown (without a retry: a timeout).
        with pytest.raises(Doc2XJobNotFoundError):
            asking.result(timeout=30)


def test_unreachable_server_is_transient_and_bounded(monkeypatch, make_image):
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT",
        '{"conn_type": "doc2x", "host": "http://127.0.0.1:9", "password": "sk-x", '
        '"extra": {"max_retries": 2, "retry_wait": 0.01, "connect_timeout": 1}}',
    )
    with pytest.raises(Doc2XTransientError, match="ConnectError") as caught:
        Doc2XHook().submit_image(make_image())
    assert not isinstance(caught.value, Doc2XSubmitUncertainError)  # nothing was sent: safe to retry


def test_test_connection(doc2x, monkeypatch):
    ok, message = Doc2XHook().test_connection()
    assert ok, message
    assert doc2x.url in message
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(api_key="sk-bad-key-1"))
    ok, message = Doc2XHook().test_connection()
    assert not ok
    assert "API key" in message and "sk-bad-key-1" not in message
    assert doc2x.stats()["billed_total"] == 0


def test_test_connection_unreachable(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT",
        '{"conn_type": "doc2x", "host": "http://127.0.0.1:9", "password": "sk-x", "extra": {"max_retries": 0}}',
    )
    ok, message = Doc2XHook().test_connection()
    assert not ok and "ConnectError" in message


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        (None, None, protocol.DEFAULT_BASE_URL),
        ("http://127.0.0.1:8765", None, "http://127.0.0.1:8765"),
        ("https://v2.doc2x.noedgeai.com/", None, "https://v2.doc2x.noedgeai.com"),
        ("doc2x.internal", None, "https://doc2x.internal"),
        ("127.0.0.1", 8765, "https://127.0.0.1:8765"),
    ],
)
def test_base_url_from_the_host(monkeypatch, host, port, expected):
    conn = {"conn_type": "doc2x", "password": "sk-x", "host": host, "port": port}
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", json_dumps(conn))
    assert Doc2XHook().settings.base_url == expected


def json_dumps(value) -> str:
    import json

    return json.dumps({key: item for key, item in value.items() if item is not None})


def test_bearer_prefix_is_accepted_and_extras_are_read(doc2x, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT",
        json_dumps(
            {
                "conn_type": "doc2x",
                "host": doc2x.url,
                "password": f"Bearer {API_KEY}",
                "extra": {"timeout": "30", "max_retries": 2, "rate_limit_images": 10, "rate_limit_window": 5},
            }
        ),
    )
    hook = Doc2XHook()
    assert hook.settings.api_key == API_KEY
    assert (hook.settings.timeout, hook.settings.max_retries) == (30.0, 2)
    assert (hook.settings.rate_limit_images, hook.settings.rate_limit_window) == (10, 5.0)
    assert hook.test_connection()[0]


def test_missing_key_and_bad_extra_are_clear(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_DOC2X_DEFAULT", '{"conn_type": "doc2x", "host": "http://x"}')
    with pytest.raises(Doc2XAuthError, match=r"doc2x_default.*no API key"):
        Doc2XHook().settings
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", '{"conn_type": "doc2x", "password": "k", "extra": {"timeout": "soon"}}'
    )
    with pytest.raises(Doc2XInputError, match="timeout='soon'"):
        Doc2XHook().settings


def test_errors_survive_pickling():
    error = Doc2XRateLimitError(
        "slow", code="request_limit_exceeded", uid="u1", http_status=429, retry_after=2
    )
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.uid, copy.http_status, str(copy)) == (error.code, error.uid, 429, str(error))


def test_the_key_appears_in_no_log_exception_or_repr(doc2x, make_image, monkeypatch, caplog, capfd):
    secret = "sk-very-secret-key-4242"
    doc2x.configure(api_key=secret)
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOC2X_DEFAULT", doc2x.connection_json(api_key=f"Bearer {secret}", timeout=0.5)
    )
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    hook = Doc2XHook()
    uid = hook.submit_image(make_image(title="Secret Page"))
    wait_for_success(hook, uid)
    doc2x.configure(fail_next=1)
    hook.get_job_status(uid)  # retried once, logged
    doc2x.configure(stall_next=1, stall_seconds=2)
    for action in (lambda: hook.submit_image(make_image()), lambda: hook.get_job_status("nope")):
        with pytest.raises(Doc2XError) as caught:
            action()
        texts += [str(caught.value), repr(caught.value), repr(caught.value.__cause__)]
    texts += [repr(hook), repr(hook.settings), str(vars(hook))]
    texts += [record.getMessage() for record in caplog.records]
    texts += capfd.readouterr()  # Airflow 3 logs through structlog, to the captured streams
    assert any("try 2" in text for text in texts)  # the retry was logged
    assert not [text for text in texts if secret in text]
