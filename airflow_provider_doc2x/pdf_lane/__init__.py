"""The bulk lane (``method="pdf"``), worker side: images planned into PDFs, submitted a few at a time.

The PDF itself (packing, the PDF API's calls, a result mapped back to its images) lives in
:mod:`airflow_provider_doc2x.pdf`, below the hook; this lane stands above the hook and the image
lane it falls back to.
"""
