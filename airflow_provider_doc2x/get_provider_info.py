"""Provider metadata for Airflow's providers manager (the ``apache_airflow_provider`` entry point)."""

from __future__ import annotations

from typing import Any

from airflow_provider_doc2x import __version__
from airflow_provider_doc2x.settings import UI_FIELD_BEHAVIOUR, conn_fields


def get_provider_info() -> dict[str, Any]:
    """What Airflow's providers manager needs: modules, connection type and form, and config options."""
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
                    },
                    "progress_interval": {
                        "description": (
                            "Least seconds between two progress lines of a task or a trigger "
                            "(``Doc2X: 420/3000 done; about 12 min left ...``); the last line of a "
                            "batch is always written.\n"
                        ),
                        "version_added": "0.1.0",
                        "type": "float",
                        "example": "30",
                        "default": "10",
                    },
                },
            }
        },
        "connection-types": [
            {
                "hook-class-name": "airflow_provider_doc2x.hooks.doc2x.Doc2XHook",
                "hook-name": "Doc2X",
                "connection-type": "doc2x",
                "conn-fields": conn_fields(),
                "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
            }
        ],
    }
