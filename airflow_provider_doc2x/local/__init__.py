"""The local Doc2X-compatible server: the backend of the tests, of offline development and of the demo.

Start it with ``python -m airflow_provider_doc2x.local`` (or ``doc2x-local-server``) and point a
``doc2x`` connection's host at the URL it prints. Needs the ``local`` extra.
"""

from __future__ import annotations
