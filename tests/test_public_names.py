"""Names a user's DAG or code imported from the release before still import from the same place."""

from __future__ import annotations

import importlib

import pytest

#: Public names the release before offered, by module (what its README, example DAGs and tests used).
BEFORE = {
    # The example DAG and the README's incremental recipe imported it from here.
    "airflow_provider_doc2x.listing": ["list_new_images", "list_images", "run_window", "DEFAULT_LOOKBACK"],
    # The protocol module re-exported the error classes; its own tests caught them as protocol.X.
    "airflow_provider_doc2x.protocol": [
        "Doc2XError",
        "Doc2XAuthError",
        "Doc2XInputError",
        "Doc2XJobFailedError",
        "Doc2XJobNotFoundError",
        "Doc2XPermanentError",
        "Doc2XProtocolError",
        "Doc2XQuotaError",
        "Doc2XRateLimitError",
        "Doc2XSubmitUncertainError",
        "Doc2XTransientError",
        "is_permanent",
    ],
    # The storage helper for calls whose failure must not read as an answer.
    "airflow_provider_doc2x.storage": ["storage_call", "storage_path", "remove_object", "Doc2XStorageError"],
}


@pytest.mark.parametrize(
    ("module", "name"), [(module, name) for module, names in BEFORE.items() for name in names]
)
def test_a_name_of_the_release_before_still_imports(module, name):
    found = importlib.import_module(module)
    if module == "airflow_provider_doc2x.protocol":  # the errors' home is exceptions: a warning says so
        from airflow.exceptions import AirflowProviderDeprecationWarning

        from airflow_provider_doc2x import exceptions

        with pytest.warns(AirflowProviderDeprecationWarning, match="airflow_provider_doc2x.exceptions"):
            assert getattr(found, name) is getattr(exceptions, name)
        return
    assert hasattr(found, name), f"{module}.{name} is gone"


def test_the_old_home_of_the_listing_warns_and_serves_the_same_function():
    import sys
    import warnings

    from airflow_provider_doc2x.storage.listing import list_new_images

    sys.modules.pop("airflow_provider_doc2x.listing", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("airflow_provider_doc2x.listing")
    assert old.list_new_images is list_new_images
    assert any("storage.listing" in str(warning.message) for warning in caught)


@pytest.mark.parametrize(
    "name", ["asubmit_pdf", "aparse_pdf", "aget_pdf_status", "aexport_markdown", "adownload"]
)
def test_the_hook_s_pdf_calls_of_the_release_before_are_its_pdf_calls_with_a_warning(name):
    from airflow.exceptions import AirflowProviderDeprecationWarning

    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
    from airflow_provider_doc2x.pdf.submission import PdfCalls

    hook = Doc2XHook()
    with pytest.warns(AirflowProviderDeprecationWarning, match=f"Doc2XHook.pdf.{name}"):
        call = getattr(hook, name)
    assert call.__func__ is getattr(PdfCalls, name)
    with pytest.raises(AttributeError):
        hook.not_a_call


async def test_the_trigger_s_wait_of_the_release_before_runs_its_waiter_with_a_warning():
    from airflow.exceptions import AirflowProviderDeprecationWarning

    from airflow_provider_doc2x.events import job
    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
    from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger

    done = job("u-1", "/scans/a.png", "ab" * 32, "success")  # finished: nothing to ask Doc2X
    trigger = Doc2XImageParseTrigger(doc2x_conn_id="doc2x_default", jobs=[done], poll_interval=1, deadline=0)
    with pytest.warns(AirflowProviderDeprecationWarning, match=r"waiter\(hook\)\.wait\(\)"):
        event = await trigger.wait(Doc2XHook())
    assert event["status"] == "success" and event["jobs"] == [done]
