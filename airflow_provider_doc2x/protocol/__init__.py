"""The Doc2X v2 API as data: what to send, and what an answer means. No I/O.

The hook's transport builds every request here and hands every answer back here, for the worker
and the triggerer alike. The API lives in three modules; this package chooses the public names
and re-exports them (``protocol.read_answer``, ``protocol.Doc2XRequest``, ...):

- :mod:`~airflow_provider_doc2x.protocol.envelope`: what both APIs share. The request and the
  answer, the ``{"code", "msg", "data"}`` envelope (:func:`read_answer`), every error code mapped
  to its exception class, the one retry rule (:func:`is_retryable`), :func:`redact` and
  :func:`quote` for server text, uid checks, and the results both APIs answer.
- :mod:`~airflow_provider_doc2x.protocol.image`: the image API. Its parse, submit and status
  calls, the checks of an image before it is sent, and the reading of its results and statuses.
- :mod:`~airflow_provider_doc2x.protocol.pdf`: the PDF API (the bulk lane). Preupload and
  presigned urls, the object store's answer to a PUT, PDF statuses and results, exports, and the
  check of a url before anything is downloaded from it.

The service's defaults (base url, rate limit) are named here too, from
:mod:`~airflow_provider_doc2x.settings`. A module constant read at call time by a submodule
(``PRESIGNED_URL_LIFETIME`` by :class:`Doc2XPreupload`) is changed on that submodule: a name set
on the package reaches only code that reads it through the package.
"""

from __future__ import annotations

import warnings
from typing import Any

from airflow.exceptions import AirflowProviderDeprecationWarning

from airflow_provider_doc2x.protocol.envelope import (
    ERROR_CODES,
    MAX_UID_CHARS,
    OWN_CODES,
    PDF_ERROR_CODES,
    PDF_OWN_CODES,
    QUOTE_CHARS,
    STATUS_FAILED,
    STATUS_PROCESSING,
    STATUS_SUCCESS,
    TERMINAL_STATUSES,
    Doc2XAnswer,
    Doc2XJobStatus,
    Doc2XPage,
    Doc2XRequest,
    Doc2XResult,
    check_uid,
    code_class,
    error_class_for,
    is_permanent_code,
    is_retryable,
    quote,
    read_answer,
    redact,
)
from airflow_provider_doc2x.protocol.image import (
    IMAGE_MAGIC,
    MAX_IMAGE_BYTES,
    OTHER_FILE_MAGIC,
    PARSE_PATH,
    RESULT_LIFETIME_SECONDS,
    STATUS_PATH,
    SUBMIT_PATH,
    _convert_zip_text,  # noqa: F401 - read through the package
    check_image,
    check_image_head,
    check_image_size,
    describe_content,
    parse_request,
    read_result,
    read_status,
    read_uid,
    sniff_image_type,
    status_request,
    submit_request,
)
from airflow_provider_doc2x.protocol.pdf import (
    DEFAULT_MODEL,
    DOWNLOAD_HOST_SUFFIXES,
    EXPORT_FORMATS,
    EXPORT_PATH,
    EXPORT_RESULT_PATH,
    EXPORT_URL_MARKERS,
    FORMULA_MODES,
    MAX_FILENAME_CHARS,
    MAX_PDF_BYTES,
    MAX_URL_CHARS,
    PDF_MODELS,
    PDF_PICKUP_GRACE_SECONDS,
    PDF_STATUS_PATH,
    PRESIGNED_URL_LIFETIME,
    PRESIGNED_URL_MARGIN,
    PREUPLOAD_PATH,
    STATUS_AWAITING_PICKUP,
    Doc2XExport,
    Doc2XPreupload,
    check_download_url,
    check_export_filename,
    check_presigned_url,
    export_request,
    export_result_request,
    pdf_status_request,
    preupload_request,
    read_export,
    read_pdf_status,
    read_preupload,
    read_put_answer,
    redact_url,
)
from airflow_provider_doc2x.settings import (
    DEFAULT_BASE_URL,
    DEFAULT_RATE_LIMIT_IMAGES,
    DEFAULT_RATE_LIMIT_WINDOW,
)

__all__ = (
    "DEFAULT_BASE_URL",
    "DEFAULT_MODEL",
    "DEFAULT_RATE_LIMIT_IMAGES",
    "DEFAULT_RATE_LIMIT_WINDOW",
    "DOWNLOAD_HOST_SUFFIXES",
    "ERROR_CODES",
    "EXPORT_FORMATS",
    "EXPORT_PATH",
    "EXPORT_RESULT_PATH",
    "EXPORT_URL_MARKERS",
    "FORMULA_MODES",
    "IMAGE_MAGIC",
    "MAX_FILENAME_CHARS",
    "MAX_IMAGE_BYTES",
    "MAX_PDF_BYTES",
    "MAX_UID_CHARS",
    "MAX_URL_CHARS",
    "OTHER_FILE_MAGIC",
    "OWN_CODES",
    "PARSE_PATH",
    "PDF_ERROR_CODES",
    "PDF_MODELS",
    "PDF_OWN_CODES",
    "PDF_PICKUP_GRACE_SECONDS",
    "PDF_STATUS_PATH",
    "PRESIGNED_URL_LIFETIME",
    "PRESIGNED_URL_MARGIN",
    "PREUPLOAD_PATH",
    "QUOTE_CHARS",
    "RESULT_LIFETIME_SECONDS",
    "STATUS_AWAITING_PICKUP",
    "STATUS_FAILED",
    "STATUS_PATH",
    "STATUS_PROCESSING",
    "STATUS_SUCCESS",
    "SUBMIT_PATH",
    "TERMINAL_STATUSES",
    "Doc2XAnswer",
    "Doc2XExport",
    "Doc2XJobStatus",
    "Doc2XPage",
    "Doc2XPreupload",
    "Doc2XRequest",
    "Doc2XResult",
    "check_download_url",
    "check_export_filename",
    "check_image",
    "check_image_head",
    "check_image_size",
    "check_presigned_url",
    "check_uid",
    "code_class",
    "describe_content",
    "error_class_for",
    "export_request",
    "export_result_request",
    "is_permanent_code",
    "is_retryable",
    "parse_request",
    "pdf_status_request",
    "preupload_request",
    "quote",
    "read_answer",
    "read_export",
    "read_pdf_status",
    "read_preupload",
    "read_put_answer",
    "read_result",
    "read_status",
    "read_uid",
    "redact",
    "redact_url",
    "sniff_image_type",
    "status_request",
    "submit_request",
)


def __getattr__(name: str) -> Any:
    """The error classes earlier releases offered here (``protocol.Doc2XProtocolError``): from exceptions, with a warning."""
    from airflow_provider_doc2x import exceptions

    if name == "is_permanent" or (
        name.startswith("Doc2X") and name.endswith("Error") and hasattr(exceptions, name)
    ):
        warnings.warn(
            f"airflow_provider_doc2x.protocol.{name} is airflow_provider_doc2x.exceptions.{name}; import it from there",
            AirflowProviderDeprecationWarning,
            stacklevel=2,
        )
        return getattr(exceptions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
