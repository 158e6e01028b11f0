"""What a ``doc2x`` connection holds, declared once: the settings every call reads, and the form.

:class:`Doc2XSettings` is the one declaration of the connection's extra fields: each field made
with :func:`extra_field` is an extra, with its type (from the annotation), its default, its label
and its description. The connection form of Airflow 3 (``conn-fields`` in the provider info), the
form widgets of Airflow 2.11 are derived from it, and a test holds the docs' table
(docs/connection.md) to it, so they cannot drift.

The API key lives in the connection's password. It is kept out of ``repr`` and registered with
Airflow's secret masker whenever a connection is loaded, on every path.

This module imports nothing of Airflow's when it is loaded: Airflow's providers manager reads the
form from it (through ``get_provider_info``) while Airflow itself is still being imported.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: Doc2X's API, where a connection with no host points.
DEFAULT_BASE_URL = "https://v2.doc2x.noedgeai.com"
#: The key's limit as the vendor states it: 30 images per 30 seconds.
DEFAULT_RATE_LIMIT_IMAGES = 30
DEFAULT_RATE_LIMIT_WINDOW = 30.0
#: Default cap on the bytes of one answer, after decompression: generous for pages with figures.
DEFAULT_MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: PDF API bounds, from the vendor's SDK (pdfdeal): 5 files in flight, at most 1000 pages in flight.
#: The service caps tasks and pages in progress per key without publishing the numbers.
DEFAULT_PDF_MAX_IN_FLIGHT = 5
DEFAULT_PDF_MAX_PAGES_IN_FLIGHT = 1000
#: A document's limits where the vendor's own pages disagree, the stricter: 1000 pages (pdfdeal's
#: local check; the service says 2000) and 300 MB (the error table; the preupload page says 1 GB).
DEFAULT_DOCUMENT_MAX_PAGES = 1000
DEFAULT_DOCUMENT_MAX_BYTES = 300 * 1024 * 1024
#: Pixels a page may have before it is decoded: Pillow's own decompression-bomb threshold
#: (``Image.MAX_IMAGE_PIXELS``), which an A3 page scanned at 600 dpi (about 70 million) stays under.
DEFAULT_PAGE_MAX_PIXELS = 89_478_485


def extra_field(default: Any, label: str, description: str = "") -> Any:
    """Declare a connection extra: a settings field with its default, form label and description."""
    return field(default=default, metadata={"label": label, "description": description})


@dataclass(frozen=True)
class Doc2XSettings:
    """Everything a call needs from the connection; the key is kept out of ``repr``."""

    base_url: str
    api_key: str = field(repr=False)
    #: The host had no scheme and ``https://`` was assumed (named in connection errors).
    scheme_assumed: bool = False

    timeout: float = extra_field(
        120.0,
        "Timeout (s)",
        "Longest time one HTTP call may take in all: connecting, sending and reading the answer.",
    )
    connect_timeout: float = extra_field(10.0, "Connect timeout (s)", "Longest time to open a connection.")
    max_retries: int = extra_field(
        5, "Max retries", "Retries of a transient failure (5xx, 429, reset), with exponential back-off."
    )
    retry_wait: float = extra_field(1.0, "First retry wait (s)", "Back-off before the first retry.")
    retry_wait_max: float = extra_field(30.0, "Longest retry wait (s)", "Cap of the exponential back-off.")
    rate_limit_images: int = extra_field(
        DEFAULT_RATE_LIMIT_IMAGES,
        "Images per window",
        "The key's upload limit: images per rate window (Doc2X: 30).",
    )
    rate_limit_window: float = extra_field(
        DEFAULT_RATE_LIMIT_WINDOW, "Rate window (s)", "The key's rate window in seconds (Doc2X: 30)."
    )
    max_concurrent_uploads: int = extra_field(
        16,
        "Uploads side by side",
        "Uploads a task keeps in flight at once, within the key's rate window (slow links need several).",
    )
    pacing_conn_id: str | None = extra_field(
        None,
        "Pacing Redis connection",
        "Id of a Redis connection in which every worker host paces this key's uploads together; "
        "empty: each host paces on its own.",
    )
    max_answer_bytes: int = extra_field(
        DEFAULT_MAX_ANSWER_BYTES,
        "Largest answer (bytes)",
        "Cap on the bytes of one answer after decompression; a larger answer is refused.",
    )
    pdf_max_in_flight: int = extra_field(
        DEFAULT_PDF_MAX_IN_FLIGHT,
        "PDFs in flight",
        "PDF lane: PDFs a task keeps submitted and unfinished at once (pdfdeal's default: 5).",
    )
    pdf_max_pages_in_flight: int = extra_field(
        DEFAULT_PDF_MAX_PAGES_IN_FLIGHT,
        "PDF pages in flight",
        "PDF lane: pages a task keeps in progress at once (pdfdeal's default: 1000).",
    )
    document_max_pages: int = extra_field(
        DEFAULT_DOCUMENT_MAX_PAGES,
        "Pages per document",
        "Most pages of one PDF or multi-page TIFF (Doc2X: 1000 or 2000; a longer one is refused, named).",
    )
    document_max_bytes: int = extra_field(
        DEFAULT_DOCUMENT_MAX_BYTES,
        "Bytes per document",
        "Largest PDF sent (Doc2X: 300 MB or 1 GB; a larger one is refused, named).",
    )
    page_max_pixels: int = extra_field(
        DEFAULT_PAGE_MAX_PIXELS,
        "Pixels per page",
        "Most pixels of a page the worker decodes (a decompression bomb is refused before decoding).",
    )
    daily_page_budget: int | None = extra_field(
        None,
        "Daily page budget",
        "Pages the key may bill per day, shared by every task of every host (in Redis with the pacing "
        "connection, else per host); a PDF past it is refused before it is sent. Empty or 0: no budget.",
    )
    budget_timezone: str = extra_field(
        "UTC",
        "Budget time zone",
        "The time zone whose day the daily page budget counts (an IANA name: UTC, Asia/Shanghai).",
    )

    @classmethod
    def from_connection(cls, conn: Any, extra: Mapping[str, Any]) -> Doc2XSettings:
        """Read a connection (password, host, extra); raise a clear error for a missing key or bad extra."""
        from airflow_provider_doc2x.exceptions import Doc2XAuthError, Doc2XInputError

        api_key = (conn.password or "").strip()
        if api_key.lower().startswith("bearer "):
            api_key = api_key[len("bearer ") :].strip()
        if not api_key:
            raise Doc2XAuthError(
                f"The Doc2X connection {conn.conn_id!r} has no API key: put the key (sk-...) in its password"
            )
        options: dict[str, Any] = {}
        for name, kind in extra_fields().items():
            value = extra.get(name, extra.get(f"extra__doc2x__{name}"))
            if value in (None, ""):
                continue
            try:
                options[name] = _convert(value, kind)
                _check_extra(name, options[name])
            except (TypeError, ValueError):
                expected = _EXPECTED.get(name, f"a {kind.__name__}")
                raise Doc2XInputError(
                    f"The Doc2X connection {conn.conn_id!r} has extra {name}={value!r}, "
                    f"which is not {expected}"
                ) from None
        base_url, scheme_assumed = base_url_of(conn)
        return cls(base_url=base_url, api_key=api_key, scheme_assumed=scheme_assumed, **options)

    @property
    def secrets(self) -> tuple[str, ...]:
        """What must never appear in a message: the key, as the server could echo it."""
        return (self.api_key, f"Bearer {self.api_key}")


def _convert(value: Any, kind: type) -> Any:
    """An extra's value (JSON or the form's text) as the declared type; numbers must be finite."""
    if isinstance(value, bool):
        raise TypeError(value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value.strip()
    number = float(value)
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        raise ValueError(value)
    return int(number) if kind is int else number


#: What an extra with a rule of its own (:func:`_check_extra`) must be, as its error says it.
_EXPECTED = {
    "daily_page_budget": "a number of pages (0 or more; empty or 0: no budget)",
    "budget_timezone": "an IANA time zone name, such as UTC, Europe/Paris or Asia/Shanghai",
}


def _check_extra(name: str, value: Any) -> None:
    """Refuse a value of the right type that still means nothing (``ValueError``): the budget's extras."""
    if name == "daily_page_budget" and value < 0:
        raise ValueError(value)
    if name == "budget_timezone":
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError) as error:
            raise ValueError(value) from error


def extra_fields() -> dict[str, type]:
    """The connection's extra fields and their types (``X | None`` read as ``X``), from the declaration."""
    hints = typing.get_type_hints(Doc2XSettings)
    declared = {}
    for item in dataclasses.fields(Doc2XSettings):
        if "label" in item.metadata:
            kinds = [kind for kind in typing.get_args(hints[item.name]) if kind is not type(None)]
            declared[item.name] = kinds[0] if kinds else hints[item.name]
    return declared


def conn_fields() -> dict[str, dict[str, Any]]:
    """The extra fields in the declarative form Airflow 3's connection form reads (``conn-fields``)."""
    json_types = {int: "integer", float: "number", str: "string", bool: "boolean"}
    fields_by_name = {item.name: item for item in dataclasses.fields(Doc2XSettings)}
    declared = {}
    for name, kind in extra_fields().items():
        spec = fields_by_name[name]
        entry: dict[str, Any] = {
            "label": spec.metadata["label"],
            "schema": {"type": [json_types[kind], "null"], "default": spec.default},
        }
        if spec.metadata["description"]:
            entry["description"] = spec.metadata["description"]
        declared[name] = entry
    return declared


#: How the connection form shows the standard fields.
UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["schema", "login", "port"],
    "relabeling": {"password": "API key", "host": "Base URL"},
    "placeholders": {"host": DEFAULT_BASE_URL, "password": "sk-..."},
}


def connection_form_widgets() -> dict[str, Any]:
    """The extra fields as Airflow 2.11's Flask form widgets (Airflow 3 reads ``conn-fields`` instead)."""
    from flask_babel import lazy_gettext
    from wtforms import IntegerField, StringField

    try:
        from airflow.www.fields import BS3TextFieldWidget
    except ImportError:  # pragma: no cover - only the Airflow 2 UI calls this
        BS3TextFieldWidget = None
    widgets = {}
    for name, spec in conn_fields().items():
        field_class = IntegerField if "integer" in spec["schema"]["type"] else StringField
        widget_kwargs = {"widget": BS3TextFieldWidget()} if BS3TextFieldWidget else {}
        widgets[name] = field_class(
            lazy_gettext(spec["label"]), description=spec.get("description"), **widget_kwargs
        )
    return widgets


def base_url_of(conn: Any) -> tuple[str, bool]:
    """The API root from the connection's host, and whether its scheme was assumed.

    A full URL is taken as it is; a bare host name is taken as ``https://`` (Doc2X's own), which
    the connection test names when the server turns out to speak plain HTTP.
    """
    host = (conn.host or "").strip().rstrip("/")
    if not host:
        return DEFAULT_BASE_URL, False
    scheme_assumed = "://" not in host
    if scheme_assumed:
        host = f"https://{host}"
    parts = urlsplit(host)
    if conn.port and not parts.port:
        host = f"{parts.scheme}://{parts.hostname}:{conn.port}{parts.path}"
    return host, scheme_assumed
