"""Sphinx configuration: the provider's docs, built with warnings as errors (``.ci/run``).

The pages are Markdown (MyST); the example DAGs are included between their ``[START howto_...]``
and ``[END howto_...]`` markers; the API reference comes from the docstrings (Google style).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from airflow_provider_doc2x import __version__

project = "airflow-provider-doc2x"
release = version = __version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
# Links to a heading of another page ("connection.md#connection-extras") resolve to its anchor.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
html_title = f"{project} {release}"
