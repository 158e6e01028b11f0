"""What each source is and how it travels to Doc2X, decided for every source before anything is sent.

A source is known by its magic bytes, never by its name (:func:`~airflow_provider_doc2x.documents.formats.sniff`):

============================  =====================================================================
JPEG, PNG up to 7 MB          the image API, as it is (the PDF lane packs it into a PDF)
JPEG, PNG over 7 MB           the PDF API: packed losslessly into a one-page PDF (``large_images``)
WebP, BMP, GIF, one-page      converted losslessly to PNG; the image API, or, if the PNG is over
TIFF, HEIC/HEIF               7 MB, the PDF API as a one-page PDF. An animated GIF or WebP gives its
                              first frame (the log says so)
multi-page TIFF               the PDF API: every frame a page of one PDF, losslessly; one record
PDF                           the PDF API, as it is; one record for the document
============================  =====================================================================

A source sent through the PDF API is a *document* (:class:`Document`): one record, whose pages
keep their number in the source. Everything that needs more than the first bytes is done here,
before the first upload, so that a hostile or broken file is refused, named, with nothing sent or
billed: a PDF's pages counted and its page tree walked, a TIFF's pages and the extent of their
pixel data read from its directories (a cut file is refused), every page's pixels checked, a
raster for the image API decoded and converted. Its bytes are copied into a private folder
(mode 0700, :func:`tempfile.mkdtemp`) a chunk at a time, hashed as they come (the sha256 of the
*source's* bytes keys the cache, the manifest and the task state store, so a re-run over the
same file pays nothing), and what is sent is made from that copy: a 300 MB PDF costs the worker
disk, not memory.

A raster document (a multi-page TIFF, a scan over 7 MB) is packed into its PDF when its turn to
be sent comes (:meth:`Intake.pdf_of`), so it is decoded once whatever the deferrals; pixel data
that is corrupt inside a whole file is found then, and that document alone is named as failed,
with nothing of it sent. The folder goes when the intake closes; a document sent after a
deferral (the PDF lane keeps a few PDFs in flight) is copied again and its sha256 checked.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.documents import formats
from airflow_provider_doc2x.documents.readers import (
    DocumentLimits,
    check_head_pixels,
    document_pdf,
    inspect_file,
    to_png,
)
from airflow_provider_doc2x.exceptions import Doc2XInputError
from airflow_provider_doc2x.storage.sources import ImageSource

log = logging.getLogger(__name__)

#: Sources read, copied, counted or converted at once (conversion is CPU work; Pillow lets go of
#: the GIL while it decodes and encodes).
INTAKE_THREADS = 4
#: Names of local files whose check is a header read, CPU under the GIL: several threads would only
#: take turns (and cost more CPU than one), so a batch of only these is checked by the task's thread.
_HEADER_ONLY_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Formats converted to PNG for the image API (a one-page TIFF too).
CONVERTED_FORMATS = frozenset({formats.WEBP, formats.BMP, formats.GIF, formats.TIFF, formats.HEIF})
#: What the provider reads, for the error about a file it does not.
READABLE = "JPEG, PNG, PDF, TIFF, WebP, BMP, GIF or HEIC"


@dataclass(frozen=True)
class ConvertedSource(ImageSource):
    """A raster converted to PNG for the image API: the PNG is sent, the source's sha256 keys it."""

    png: Path = Path()
    sha256: str = ""
    source_format: str = ""

    def read(self) -> bytes:
        """The converted PNG (made and checked when the task started)."""
        return self.png.read_bytes()

    def read_with_digest(self) -> tuple[bytes, str]:
        """The PNG, and the sha256 of the source's own bytes (what the cache and the journal know it by)."""
        return self.read(), self.sha256

    @property
    def job_keys(self) -> dict[str, Any]:
        """What its job and its record say of it: its format, converted to PNG."""
        return {"source_format": self.source_format, "converted": "png"}


@dataclass(frozen=True)
class Document:
    """A source sent through the PDF API as one PDF: a PDF as it is, or a raster document packed into one.

    ``converted`` is ``"pdf"`` when a PDF was made from the source, None when the source is sent
    as it is.
    """

    source: ImageSource
    sha256: str
    source_format: str
    pages: int
    converted: str | None

    @property
    def uri(self) -> str:
        """How the document is named."""
        return self.source.uri


#: What :meth:`Intake.check_all` gives for each source, in input order.
Checked = ImageSource | Document


class Intake:
    """Every source checked and prepared before anything is sent; the private folder of what was made.

    Use it as a context manager: the folder and every copy, PNG and PDF in it go on exit.

    :param limits: pages per document, bytes per PDF, pixels per page (the connection's extras).
    :param large_images: send a JPEG or PNG over 7 MB (and a converted raster whose PNG is) through
        the PDF API; False refuses them, named, as the image API would.
    :param allow_schemes: URL schemes the operator reads from beyond storage (for re-made documents).
    """

    def __init__(
        self,
        limits: DocumentLimits | None = None,
        *,
        large_images: bool = True,
        allow_schemes: Sequence[str] = (),
    ) -> None:
        """Nothing is made before entering."""
        self.limits = limits or DocumentLimits()
        self.large_images = large_images
        self.allow_schemes = tuple(allow_schemes)
        self._folder: Path | None = None
        #: PDFs ready to send, and their pages, by the source's sha256.
        self._made: dict[str, tuple[Path, int]] = {}
        #: Raster documents checked and not packed yet: the raster, and the format it is packed from.
        self._to_pack: dict[str, tuple[Path, str]] = {}

    @classmethod
    def for_settings(cls, settings: Any, *, large_images: bool, allow_schemes: Sequence[str]) -> Intake:
        """An intake within a connection's limits (:class:`~airflow_provider_doc2x.settings.Doc2XSettings`).

        A document goes as one PDF, which the key's pages in flight must be able to hold: its pages
        are bounded by ``pdf_max_pages_in_flight`` too.
        """
        limits = DocumentLimits(
            max_pages=min(settings.document_max_pages, settings.pdf_max_pages_in_flight),
            max_pdf_bytes=settings.document_max_bytes,
            max_page_pixels=settings.page_max_pixels,
        )
        return cls(limits, large_images=large_images, allow_schemes=allow_schemes)

    def __enter__(self) -> Intake:
        """Make the private folder."""
        self._folder = Path(tempfile.mkdtemp(prefix="doc2x-intake-"))
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Remove the folder and everything made in it."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self._made.clear()
        self._to_pack.clear()

    @property
    def folder(self) -> Path:
        """The private folder (mode 0700), made on entering."""
        if self._folder is None:
            raise RuntimeError("use the intake as a context manager: its private folder is made then")
        return self._folder

    def check_all(self, sources: Sequence[ImageSource], *, log: Any = log) -> list[Checked]:
        """Each source as it will travel, in order; every bad one named at once, before anything is sent.

        ``log`` (the task's) says how long the check took and how each source that is not a JPEG
        or PNG sent as it is travels.

        Raises:
            Doc2XInputError: one or more sources cannot be sent (each named, with what to do).
            Doc2XStorageError: the storage kept failing to answer (retryable; not a bad file).
        """
        began = time.monotonic()
        checked: list[Checked | None] = []
        problems: list[str] = []
        with ExitStack() as stack:
            calls: Iterable[Callable[[], Checked]] = (partial(self._check_one, source) for source in sources)
            if any(map(_waits_or_converts, sources)):
                pool = stack.enter_context(
                    ThreadPoolExecutor(INTAKE_THREADS, thread_name_prefix="doc2x-intake")
                )
                calls = [pool.submit(self._check_one, source).result for source in sources]
            for call in calls:
                try:
                    checked.append(call())
                except Doc2XInputError as error:
                    checked.append(None)
                    problems.append(error.message)
        if problems:
            raise Doc2XInputError(
                f"{len(problems)} of {len(sources)} files cannot be sent to Doc2X; nothing was submitted:\n- "
                + "\n- ".join(problems)
            )
        log.info("Doc2X: checked %d files in %.3f s", len(sources), time.monotonic() - began)
        for item in checked:
            if item is not None and (line := travel(item)) is not None:
                log.info("%s", line)
        return [item for item in checked if item is not None]

    def _check_one(self, source: ImageSource) -> Checked:
        size = source.size()
        head = source.head(formats.HEAD_BYTES)
        kind = formats.sniff(head)
        if kind in (formats.JPEG, formats.PNG) and size <= protocol.MAX_IMAGE_BYTES:
            # The image API as it is, read when its turn comes. A local file's header and ends are
            # checked now (pixels within the limit, not cut; nothing decoded); a remote one's
            # first bytes only, not to read it twice.
            if source.path.protocol in ("file", "local"):
                inspect_file(source.path.path, kind, source=source.uri, limits=self.limits)
            else:
                check_head_pixels(head, kind, source=source.uri, limits=self.limits)
            return source
        if kind is None:
            raise Doc2XInputError(
                f"{source.uri} is not a file this provider reads (it looks like "
                f"{formats.describe_content(head)}): give {READABLE}",
                source=source.uri,
                code="parse_file_not_image",
            )
        if kind == formats.PDF and size > self.limits.max_pdf_bytes:
            raise _too_large(source.uri, size, self.limits.max_pdf_bytes)
        copy, digest = self._copy(source, kind)
        return self._prepared(source, kind, copy, digest)

    def _prepared(self, source: ImageSource, kind: str, copy: Path, digest: str) -> Checked:
        """A private copy checked whole, and made ready: a PDF as it is, a raster converted or set to pack."""
        inspection = inspect_file(copy, kind, source=source.uri, limits=self.limits)
        if kind == formats.PDF:
            self._made[digest] = (copy, inspection.pages)
            return Document(source, digest, kind, inspection.pages, None)
        if kind in (formats.JPEG, formats.PNG):
            return self._large(source, digest, kind, copy)
        if kind == formats.TIFF and inspection.pages > 1:
            return self._to_pack_later(source, digest, kind, copy, inspection.pages)
        if inspection.frames > 1:
            log.info(
                "%s is an animated %s of %d frames: its first frame is parsed",
                source.uri,
                kind,
                inspection.frames,
            )
        png = to_png(copy, kind, source=source.uri, limits=self.limits)
        png_path = self._private_file("converted-", ".png")
        png_path.write_bytes(png)
        copy.unlink(missing_ok=True)
        if len(png) > protocol.MAX_IMAGE_BYTES:
            return self._large(source, digest, kind, png_path, made_from=formats.PNG)
        return ConvertedSource(source.uri, source.path, png=png_path, sha256=digest, source_format=kind)

    def _large(
        self, source: ImageSource, digest: str, kind: str, raster: Path, *, made_from: str | None = None
    ) -> Document:
        """A raster over the image API's 7 MB: a one-page PDF for the PDF API, unless that is forbidden."""
        if not self.large_images:
            raise Doc2XInputError(
                f"{source.uri} is over Doc2X's image limit of {protocol.MAX_IMAGE_BYTES} bytes (7 MB)"
                f"{' once converted to PNG' if made_from else ''}, and large_images=False keeps it off the PDF "
                "API: downscale or recompress it, or let it go through the PDF API (large_images=True)",
                source=source.uri,
                code="parse_file_too_large",
            )
        return self._to_pack_later(source, digest, kind, raster, 1, made_from=made_from)

    def _to_pack_later(
        self,
        source: ImageSource,
        digest: str,
        kind: str,
        raster: Path,
        pages: int,
        *,
        made_from: str | None = None,
    ) -> Document:
        """A raster document to be packed into a PDF when its turn to be sent comes (:meth:`pdf_of`).

        Its pages, their pixels and the wholeness of their data were checked from its headers; it is
        decoded once, when packed, and not at all if the task never reaches it.
        """
        self._to_pack[digest] = (raster, made_from or kind)
        return Document(source, digest, kind, pages, "pdf")

    def pdf_of(
        self, uri: str, sha256: str, source_format: str, converted: str | None, pages: int
    ) -> tuple[Path, int]:
        """The PDF to send for a document, and its pages, made when it is first asked for.

        A PDF checked by this intake is sent from its copy; a raster document is packed now, once.
        After a deferral (a new intake), the source is copied again and its sha256 checked: the same
        bytes are the same document, so a PDF's ``pages`` are not counted again.

        Raises:
            Doc2XInputError: the source's bytes are no longer the ones checked (it changed since), or
                its pixels cannot be decoded (named; nothing of it was sent).
        """
        made = self._made.get(sha256)
        if made is not None and made[0].exists():
            return made
        if sha256 not in self._to_pack:
            self._copy_again(uri, sha256, source_format, converted, pages)
        if sha256 in self._to_pack:
            raster, fmt = self._to_pack.pop(sha256)
            pdf = self._private_file("document-", ".pdf")
            try:
                packed = document_pdf(raster, fmt, pdf, source=uri, limits=self.limits)
            except BaseException:
                pdf.unlink(missing_ok=True)
                raise
            finally:
                raster.unlink(missing_ok=True)
            self._made[sha256] = (pdf, packed)
        return self._made[sha256]

    def _copy_again(
        self, uri: str, sha256: str, source_format: str, converted: str | None, pages: int
    ) -> None:
        """Copy a document checked by an earlier try of the task; refuse it if its bytes changed since."""
        source = ImageSource.of(uri, allow_schemes=self.allow_schemes)
        copy, digest = self._copy(source, source_format)
        if digest != sha256:
            copy.unlink(missing_ok=True)
            raise Doc2XInputError(
                f"{uri} changed since the task checked it (its sha256 is no longer {sha256}): nothing of it "
                "was sent; a new run parses it as it is now",
                source=uri,
                code="source_changed",
            )
        if converted is None:
            self._made[sha256] = (copy, pages)
        elif not isinstance(self._prepared(source, source_format, copy, digest), Document):
            raise RuntimeError(f"{uri} was checked as a document and is the same bytes, but is not one now")

    def _copy(self, source: ImageSource, kind: str) -> tuple[Path, str]:
        """A private copy of the source's bytes (bounded), and their sha256."""
        target = self._private_file("source-", f".{kind}")
        limit = self.limits.max_pdf_bytes
        try:
            digest = source.copy_to(target, limit=limit)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return target, digest

    def _private_file(self, prefix: str, suffix: str) -> Path:
        descriptor, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=self.folder)
        os.close(descriptor)
        return Path(name)


def _too_large(uri: str, size: int, limit: int) -> Doc2XInputError:
    return Doc2XInputError(
        f"{uri} is {size} bytes, over the {limit} bytes this provider sends of one PDF (Doc2X's limit is "
        "300 MB or 1 GB, its pages disagree): split or compress it, or raise the connection's "
        "document_max_bytes",
        source=uri,
        code="parse_file_too_large",
    )


def travel(item: Checked) -> str | None:
    """How a source that is not a JPEG or PNG sent as it is travels, for the task's log (None for those)."""
    if isinstance(item, Document):
        what = f"{formats.describe(item.source_format)} of {item.pages} page{'s' if item.pages != 1 else ''}"
        how = "as it is" if item.converted is None else "packed losslessly into a PDF"
        return f"{item.uri} ({what}) goes through Doc2X's PDF API {how}"
    if isinstance(item, ConvertedSource):
        return f"{item.uri} ({formats.describe(item.source_format)}) is converted losslessly to PNG for the image API"
    return None


def _waits_or_converts(source: ImageSource) -> bool:
    """Whether checking ``source`` waits on the network or converts (then threads overlap that work).

    Only a hint for how many threads check a batch: the check itself reads every file's content.
    """
    local = source.path.protocol in ("file", "local")
    return not local or not source.uri.lower().endswith(_HEADER_ONLY_SUFFIXES)
