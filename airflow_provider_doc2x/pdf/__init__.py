"""The bulk lane: images packed into multi-page PDFs for Doc2X's PDF API, and the pages mapped back.

Nothing is imported here, so that importing a module of the lane does not load the PDF packer's
libraries before a PDF is packed.
"""
