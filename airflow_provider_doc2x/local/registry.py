"""The engines the local server can run, by name, and how each one is built.

``simple`` lives in :mod:`~airflow_provider_doc2x.local.engines`. ``ocr`` lives in
:mod:`~airflow_provider_doc2x.local.ocr` and is imported only when it is chosen: it needs the
``ocr`` extra, and its models take seconds to load.
"""

from __future__ import annotations

from collections.abc import Callable

from airflow_provider_doc2x.local.engines import Engine, SimpleEngine


def ocr_engine() -> Engine:
    """Build the ``ocr`` engine, or explain which extra it needs."""
    try:
        from airflow_provider_doc2x.local.ocr import OcrEngine
    except ImportError as error:
        raise RuntimeError(
            f"The ocr engine needs the ocr extra ({error}): pip install 'airflow-provider-doc2x[local,ocr]'"
        ) from error
    return OcrEngine()


#: Engine factories by the name that ``--engine`` and ``ServerConfig.engine`` take.
ENGINES: dict[str, Callable[[], Engine]] = {"simple": SimpleEngine, "ocr": ocr_engine}


def load_engine(name: str) -> Engine:
    """Build the named engine once; the server keeps it for its whole life.

    Raises:
        ValueError: no engine has this name.
    """
    try:
        factory = ENGINES[name]
    except KeyError:
        raise ValueError(f"Unknown engine {name!r}; choose one of {sorted(ENGINES)}") from None
    return factory()
