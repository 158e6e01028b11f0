"""Apache Airflow provider for Doc2X: document images to Markdown."""

from __future__ import annotations

__version__ = "0.1.0"
