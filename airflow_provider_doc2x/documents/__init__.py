"""The files users feed the provider, read before anything is sent: formats, page counts, conversions.

Nothing is imported here, so that importing one module of it loads neither Pillow, img2pdf nor
pypdf. :mod:`~airflow_provider_doc2x.documents.readers` is its face (:func:`inspect_file`, the
limits, and the conversions :func:`to_png` and :func:`document_pdf`); below it,
:mod:`~airflow_provider_doc2x.documents.formats` tells a file's format from its first bytes,
:mod:`~airflow_provider_doc2x.documents.headers` reads a raster's header with ``struct`` alone,
:mod:`~airflow_provider_doc2x.documents.checks` holds the limits and the refusals both share, and
:mod:`~airflow_provider_doc2x.documents.convert` turns rasters into a PNG or a PDF, losslessly.
"""

from __future__ import annotations
