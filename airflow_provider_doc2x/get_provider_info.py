"""Provider metadata for Airflow's providers manager (the ``apache_airflow_provider`` entry point)."""

from __future__ import annotations

from typing import Any

from airflow_provider_doc2x import __version__

#: Extra fields of a ``doc2x`` connection, in the declarative form Airflow 3 reads.
CONN_FIELDS: dict[str, dict[str, Any]] = {
    "timeout": {
        "label": "Timeout (s)",
        "description": "Read/write timeout of one HTTP call in seconds (uploads from far away are slow).",
        "schema": {"type": ["number", "null"], "default": 120},
    },
    "connect_timeout": {
        "label": "Connect timeout (s)",
        "schema": {"type": ["number", "null"], "default": 10},
    },
    "max_retries": {
        "label": "Max retries",
        "description": "Retries of a transient failure (5xx, 429, reset), with exponential back-off.",
        "schema": {"type": ["integer", "null"], "default": 5},
    },
    "retry_wait": {
        "label": "First retry wait (s)",
        "schema": {"type": ["number", "null"], "default": 1},
    },
    "retry_wait_max": {
        "label": "Longest retry wait (s)",
        "schema": {"type": ["number", "null"], "default": 30},
    },
    "rate_limit_images": {
        "label": "Images per window",
        "description": "The key's upload limit: images per rate window (Doc2X: 30).",
        "schema": {"type": ["integer", "null"], "default": 30},
    },
    "rate_limit_window": {
        "label": "Rate window (s)",
        "schema": {"type": ["number", "null"], "default": 30},
    },
}

UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["schema", "login", "port"],
    "relabeling": {"password": "API key", "host": "Base URL"},
    "placeholders": {"host": "https://v2.doc2x.noedgeai.com", "password": "sk-..."},
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-doc2x",
        "name": "Doc2X",
        "description": "`Doc2X <https://doc2x.noedgeai.com>`__: document images to Markdown.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Doc2X",
                "external-doc-url": "https://doc2x.noedgeai.com",
                "tags": ["service"],
            }
        ],
        "hooks": [{"integration-name": "Doc2X", "python-modules": ["airflow_provider_doc2x.hooks.doc2x"]}],
        "operators": [
            {"integration-name": "Doc2X", "python-modules": ["airflow_provider_doc2x.operators.doc2x"]}
        ],
        "sensors": [
            {"integration-name": "Doc2X", "python-modules": ["airflow_provider_doc2x.sensors.doc2x"]}
        ],
        "triggers": [
            {"integration-name": "Doc2X", "python-modules": ["airflow_provider_doc2x.triggers.doc2x"]}
        ],
        "config": {
            "doc2x": {
                "description": "Options of the Doc2X provider.",
                "options": {
                    "freeze_triggerer_heap": {
                        "description": (
                            "Whether the first Doc2X trigger of a triggerer process moves the objects "
                            "alive at that moment (Airflow's modules, classes and functions) out of "
                            "CPython's garbage collections with ``gc.freeze()``. Without it, every full "
                            "collection walks Airflow's whole start-up heap, which stops every trigger "
                            "of the process for about 100 ms. The cost: a reference cycle among those "
                            "objects that becomes garbage later is never freed.\n"
                        ),
                        "version_added": "0.1.0",
                        "type": "boolean",
                        "example": "False",
                        "default": "True",
                    }
                },
            }
        },
        "connection-types": [
            {
                "hook-class-name": "airflow_provider_doc2x.hooks.doc2x.Doc2XHook",
                "hook-name": "Doc2X",
                "connection-type": "doc2x",
                "conn-fields": CONN_FIELDS,
                "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
            }
        ],
    }
