"""A PDF of images and Doc2X's PDF API: packing, the PDF calls, a PDF's result mapped back to its images.

Nothing is imported here, so that importing a module of it does not load the PDF packer's
libraries before a PDF is packed. The lane that uses these (``method="pdf"``) is
:mod:`airflow_provider_doc2x.pdf_lane`.
"""
