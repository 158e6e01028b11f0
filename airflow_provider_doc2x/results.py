"""Results in object storage: one folder per image with its Markdown, its figures and a JSON sidecar.

Layout under ``output_path`` (a local directory or any ``ObjectStoragePath`` URI)::

    invoice-1f2e3d4c5b6a/            # the image's name, then the first 12 hex digits of its sha256
        invoice.md                   # the Markdown; figure links point at images/...
        images/<figure>.jpg          # the figures of convert_zip (PDF lane: of the PDF's export)
        invoice.json                 # the sidecar, written last: its presence means "complete"
        convert_zip.raw              # only when Doc2X's convert_zip was not a usable zip

The hash in the folder name keeps two images of the same name apart, and makes the content cache
cheap: the sidecar's name says where a content's complete result would be.

The figures come from :func:`airflow_provider_doc2x.archives.unpack_figures`, which refuses what
is unsafe; a figure that cannot be written is skipped with a warning. Whatever ``convert_zip``
holds, the Markdown is written and the task goes on.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from airflow_provider_doc2x import __version__, protocol
from airflow_provider_doc2x.archives import MAX_ZIP_BYTES, MAX_ZIP_ENTRIES, Figures, unpack_figures
from airflow_provider_doc2x.storage import storage_path

log = logging.getLogger(__name__)

RAW_PAYLOAD_NAME = "convert_zip.raw"
_IMAGE_LINK = re.compile(r"""(<img\s[^>]*?src=["']|!\[[^\]]*\]\()([^"')\s]+)""")


def write(path: Any, data: bytes) -> None:
    """Write through ``open``: the call that Airflow's hook-level lineage records as an output."""
    with path.open("wb") as handle:
        handle.write(data)


def link_figures(markdown: str, files: dict[str, bytes]) -> str:
    """Point each figure link at its unpacked file: Doc2X writes ``NAME.jpg``, the zip holds ``images/NAME.jpg``."""
    by_name = {posixpath.basename(path): path for path in files}

    def relink(match: re.Match) -> str:
        target = match.group(2)
        if target in files or target not in by_name:
            return match.group(0)
        return match.group(1) + by_name[target]

    return _IMAGE_LINK.sub(relink, markdown)


def folder_name(source: str, sha256: str) -> str:
    """``<stem>-<first 12 hex of sha256>``: readable, and apart from any other content of the same name."""
    stem = posixpath.splitext(posixpath.basename(source.rstrip("/")))[0] or "image"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80].lstrip(".") or "image"
    return f"{stem}-{sha256[:12]}"


def markdown_text(markdown: str) -> bytes:
    """The Markdown as written to a file: ending with one newline, as text files do."""
    return (markdown.rstrip("\n") + "\n").encode()


class ResultStore:
    """Writes and finds results under ``output_path``; every read and write goes through ObjectStoragePath."""

    def __init__(
        self,
        output_path: str,
        *,
        model: str = protocol.DEFAULT_MODEL,
        max_zip_entries: int = MAX_ZIP_ENTRIES,
        max_zip_bytes: int = MAX_ZIP_BYTES,
    ) -> None:
        """Point at ``output_path`` (nothing is read until asked); zips are unpacked within the caps.

        ``model`` is the Doc2X model that makes this store's new results.
        """
        self.model = model
        self.max_zip_entries = max_zip_entries
        self.max_zip_bytes = max_zip_bytes
        self.root = storage_path(output_path)
        self._written: dict[str, dict[str, Any]] = {}
        self._by_hash: dict[str, list[Any]] | None = None
        self._children: list[Any] | None = None
        self._sidecars: dict[str, dict[str, Any] | None] = {}
        #: Each source's storage fingerprint taken before it was read (see
        #: :mod:`airflow_provider_doc2x.manifest`); written into the sidecar so that a lost manifest
        #: can be rebuilt from the sidecars without reading the images again.
        self.fingerprints: dict[str, str] = {}

    def cached(self, sha256: str, source: str) -> dict[str, Any] | None:
        """The record of a complete earlier result for this content, or None."""
        if sha256 in self._written:
            return self._written[sha256]
        folder = self.root / folder_name(source, sha256)
        meta = self.sidecar(folder)
        if meta is None:
            # The same content under another name: look for any folder with this hash.
            for candidate in self._folders_of(sha256):
                if candidate.name != folder.name and (meta := self.sidecar(candidate)) is not None:
                    folder = candidate
                    break
        if meta is None:
            return None
        return self._record(folder, meta, cached=True)

    def remember(self, record: dict[str, Any]) -> None:
        """Answer :meth:`cached` for this record's content from memory (a result known from the manifest)."""
        self._written[record["sha256"]] = {**record, "cached": True}

    def folders(self) -> list[Any]:
        """The root's children, from one listing made at the first call."""
        if self._children is None:
            try:
                self._children = list(self.root.iterdir()) if self.root.exists() else []
            except OSError:
                self._children = []
        return self._children

    def _folders_of(self, sha256: str) -> list[Any]:
        """Folders whose name ends in this hash, from one listing of the root made at the first miss."""
        if self._by_hash is None:
            self._by_hash = {}
            for child in self.folders():
                self._by_hash.setdefault(child.name.rsplit("-", 1)[-1], []).append(child)
        return self._by_hash.get(sha256[:12], [])

    def sidecar(self, folder: Any) -> dict[str, Any] | None:
        """The sidecar of a result folder, validated, read once per store; None if missing or unusable."""
        if folder.name not in self._sidecars:
            self._sidecars[folder.name] = self._sidecar(folder)
        return self._sidecars[folder.name]

    @staticmethod
    def _sidecar(folder: Any) -> dict[str, Any] | None:
        sidecar = folder / f"{folder.name.rsplit('-', 1)[0]}.json"
        try:
            meta = json.loads(sidecar.read_text())
        except (ValueError, OSError):
            return None  # no sidecar: an interrupted write, not a result
        if not isinstance(meta, dict) or not isinstance(meta.get("markdown"), str):
            return None
        if not isinstance(meta.get("figures", []), list):
            return None
        return meta

    def write(
        self,
        source: str,
        sha256: str,
        result: protocol.Doc2XResult,
        *,
        figures: Figures | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write one image's result (figures, Markdown, then the sidecar); return its record of paths.

        ``figures`` are files already at hand (relative paths made of plain characters; the PDF
        lane's, from an export zip): then ``convert_zip`` is not read. ``extra`` adds fields to the
        sidecar (the PDF lane's ``lane`` and ``page_idx``); a ``page_idx`` there is in the record too.
        """
        folder = self.root / folder_name(source, sha256)
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder.name.rsplit("-", 1)[0]
        if figures is None:
            figures = unpack_figures(
                result.convert_zip,
                source=source,
                max_entries=self.max_zip_entries,
                max_bytes=self.max_zip_bytes,
            )
        written: dict[str, bytes] = {}
        for path, data in figures.files.items():
            target = folder / path
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                write(target, data)
            except (OSError, ValueError) as error:
                figures.warnings.append(
                    f"figure {path!r} of {source} could not be written ({error}); skipped"
                )
                continue
            written[path] = data
        for warning in figures.warnings:
            log.warning("%s", warning)
        if figures.raw is not None:
            write(folder / RAW_PAYLOAD_NAME, figures.raw)
        write(folder / f"{stem}.md", markdown_text(link_figures(result.markdown, written)))
        meta = {
            "source": source,
            "sha256": sha256,
            "uid": result.uid,
            "parsed_at": datetime.now(timezone.utc).isoformat(),
            "pages": [
                {"page_idx": page.page_idx, "page_width": page.page_width, "page_height": page.page_height}
                for page in result.pages
            ],
            "markdown": f"{stem}.md",
            "figures": sorted(written),
            "raw_convert_zip": RAW_PAYLOAD_NAME if figures.raw is not None else None,
            "warnings": figures.warnings,
            "provider_version": __version__,
            **(extra or {}),
        }
        if source in self.fingerprints:
            meta["source_fingerprint"] = self.fingerprints[source]
        # The sidecar goes last: a folder without it is an interrupted write, not a cache hit.
        write(folder / f"{stem}.json", json.dumps(meta, indent=2).encode())
        self._sidecars[folder.name] = meta
        record = self._record(folder, meta, cached=False)
        self._written[sha256] = {**record, "cached": True}
        return record

    def record_of(self, folder_name: str, meta: dict[str, Any]) -> dict[str, Any]:
        """The record of an earlier result in ``folder_name`` under the root, from its (validated) metadata."""
        return self._record(self.root / folder_name, meta, cached=True)

    @staticmethod
    def _record(folder: Any, meta: dict[str, Any], *, cached: bool) -> dict[str, Any]:
        stem = meta["markdown"][: -len(".md")]
        record = {
            "source": meta.get("source"),
            "uid": meta.get("uid"),
            "sha256": meta.get("sha256"),
            "markdown_path": str(folder / meta["markdown"]),
            "figure_paths": [str(folder / path) for path in meta.get("figures", [])],
            "sidecar_path": str(folder / f"{stem}.json"),
            "cached": cached,
        }
        page_idx = meta.get("page_idx")
        if isinstance(page_idx, int) and not isinstance(page_idx, bool):
            record["page_idx"] = page_idx  # the PDF lane's: the image's page in the PDF ``uid``
        return record
