"""The PDF lane's private files on the worker: images hashed, remote ones copied, PDFs packed.

A remote image (object storage) is copied once into a private temporary folder (mode 0700, made by
:func:`tempfile.mkdtemp`, never a predictable shared path) while the task runs, so that it is read
once for its hash and packed from the copy; a local file is read where it is. The folder and
everything in it go when the lane ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from airflow_provider_doc2x.exceptions import Doc2XInputError
from airflow_provider_doc2x.pdf.headers import ImageContent, read_content
from airflow_provider_doc2x.pdf.packing import PackImage, pack_images
from airflow_provider_doc2x.storage.sources import ImageSource

#: Threads that read images (and copy remote ones) when a task starts.
HASH_THREADS = 4
#: Relative aspect tolerance given to the packer for a planned PDF: its images were grouped when
#: it was planned, so they stay together (a PDF of one plan is never cut in two by the packer).
_PLANNED_TOLERANCE = 0.99
#: No byte bound for a planned PDF (its images were bounded by ``pdf_max_bytes`` when planned).
_PLANNED_MAX_BYTES = 1 << 40


class PdfStaging:
    """The lane's private folder: open it with ``with``; it is removed, with its files, on exit."""

    def __init__(self) -> None:
        """Nothing is made before entering."""
        self._folder: Path | None = None
        self._local: dict[str, Path] = {}

    def __enter__(self) -> PdfStaging:
        """Make the private folder."""
        self._folder = Path(tempfile.mkdtemp(prefix="doc2x-pdf-lane-"))
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Remove the folder and every copy and PDF in it."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self._local.clear()

    @property
    def folder(self) -> Path:
        """The private temporary folder (mode 0700), made on entering."""
        if self._folder is None:
            raise RuntimeError("use the PDF lane as a context manager: its temporary folder is made then")
        return self._folder

    def read_all(self, sources: Sequence[ImageSource]) -> list[ImageContent]:
        """Each image's sha256, header and size from one read (remote images copied first, a few at a time).

        Local files only are read by the task's thread: reading a page is shorter than handing it
        to a thread and back.
        """
        if all(source.path.protocol in ("file", "local") for source in sources):
            return [self._read_one(source) for source in sources]
        with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="doc2x-hash") as pool:
            return list(pool.map(self._read_one, sources))

    def _read_one(self, source: ImageSource) -> ImageContent:
        path = self.local_path(source)
        try:
            return read_content(path)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as error:
            # Checked when the task started, gone or locked since: named, before anything is sent.
            raise Doc2XInputError(
                f"Image {source.uri} cannot be read any more ({type(error).__name__}: "
                f"{error.strerror or 'no detail'}); it was checked when the task started: make sure "
                "nothing moves, deletes or locks the images while the task runs, then run it again",
                source=source.uri,
            ) from error

    def known_path(self, uri: str) -> Path | None:
        """The local file :meth:`local_path` gave for this image earlier, if it still exists."""
        known = self._local.get(uri)
        return known if known is not None and known.exists() else None

    def local_path(self, source: ImageSource) -> Path:
        """A local file holding the image: the file itself, or a private copy of a remote one."""
        known = self.known_path(source.uri)
        if known is not None:
            return known
        if source.path.protocol in ("file", "local"):
            path = Path(source.path.path)
        else:
            data = source.read()  # checked: a JPEG or PNG of at most 7 MB
            descriptor, name = tempfile.mkstemp(prefix="image-", dir=self.folder)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            path = Path(name)
        self._local[source.uri] = path
        return path

    def pack(self, images: list[PackImage]) -> Any:
        """Pack one planned PDF's images, local already (blocking: run it in a thread)."""
        return pack_images(
            images,
            pdf_max_pages=len(images),
            pdf_max_bytes=_PLANNED_MAX_BYTES,
            aspect_tolerance=_PLANNED_TOLERANCE,
            temp_dir=self.folder,
        )
