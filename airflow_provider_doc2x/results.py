"""
Results in object storage: one folder per image with its Markdown, its figures and a JSON sidecar.

Layout under ``output_path`` (a local directory or any ``ObjectStoragePath`` URI)::

    invoice-1f2e3d4c5b6a/            # the image's name, then the first 12 hex digits of its sha256
        invoice.md                   # the Markdown; figure links point at images/...
        images/<figure>.jpg          # the figures of convert_zip
        invoice.json                 # the sidecar, written last: its presence means "complete"
        convert_zip.raw              # only when Doc2X's convert_zip was not a usable zip

The hash in the folder name keeps two images of the same name apart, and makes the content cache
cheap: one listing of ``output_path`` says which images already have a complete result.

Doc2X's ``convert_zip`` is untrusted input. It is unpacked here with no entry written outside the
image's folder (``..``, absolute paths, drive letters and symlinks are refused and logged), and with
caps on the entry count and the unpacked bytes, counted while reading (a zip bomb is stopped).
A payload that is not a zip at all is kept raw beside the Markdown, with a warning.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import posixpath
import re
import stat
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from airflow_provider_doc2x import __version__, protocol

log = logging.getLogger(__name__)

MAX_ZIP_ENTRIES = 1000
MAX_ZIP_BYTES = 200 * 1024 * 1024
RAW_PAYLOAD_NAME = "convert_zip.raw"
_DRIVE = re.compile(r"^[A-Za-z]:")
_IMAGE_LINK = re.compile(r"""(<img\s[^>]*?src=["']|!\[[^\]]*\]\()([^"')\s]+)""")


@dataclass
class Figures:
    """What a ``convert_zip`` payload yielded: safe files by relative path, or the raw payload."""

    files: dict[str, bytes] = field(default_factory=dict)
    raw: bytes | None = None
    warnings: list[str] = field(default_factory=list)


def decode_base64(payload: str) -> bytes | None:
    """Base64 as clients meet it: maybe a ``data:...;base64,`` prefix, maybe unpadded; None if broken."""
    text = payload.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def safe_member_path(info: zipfile.ZipInfo) -> str | None:
    """The entry's path if writing it stays inside the folder, else None (the caller logs why)."""
    name = info.filename.replace("\\", "/")
    if stat.S_ISLNK(info.external_attr >> 16):
        return None
    if name.startswith("/") or _DRIVE.match(name):
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return posixpath.join(*parts)


def unpack_figures(
    payload: str | None,
    *,
    source: str,
    max_entries: int = MAX_ZIP_ENTRIES,
    max_bytes: int = MAX_ZIP_BYTES,
) -> Figures:
    """Unpack ``convert_zip`` safely; never raise for a bad payload, say what was wrong instead."""
    figures = Figures()
    if not payload:
        return figures
    data = decode_base64(payload)
    if data is None:
        figures.raw = payload.encode()
        figures.warnings.append(f"convert_zip of {source} is not valid base64; kept raw")
        return figures
    if not data.startswith(b"PK"):
        figures.raw = data
        figures.warnings.append(f"convert_zip of {source} is not a zip ({len(data)} bytes); kept raw")
        return figures
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
            if len(entries) > max_entries:
                raise _Refused(f"{len(entries)} entries, over the cap of {max_entries}")
            total = 0
            for info in entries:
                if info.is_dir():
                    continue
                path = safe_member_path(info)
                if path is None:
                    figures.warnings.append(
                        f"convert_zip of {source}: refused unsafe entry {info.filename!r}"
                    )
                    continue
                chunks = []
                with archive.open(info) as member:
                    while chunk := member.read(1 << 16):
                        total += len(chunk)
                        if total > max_bytes:
                            raise _Refused(f"more than {max_bytes} bytes unpacked")
                        chunks.append(chunk)
                figures.files[path] = b"".join(chunks)
    except _Refused as refusal:
        figures.files.clear()
        figures.raw = data
        figures.warnings.append(f"convert_zip of {source} refused: {refusal}; kept raw, nothing unpacked")
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,
    ) as error:
        figures.files.clear()
        figures.raw = data
        figures.warnings.append(f"convert_zip of {source} is a broken zip ({error}); kept raw")
    return figures


class _Refused(Exception):
    pass


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
    stem = posixpath.splitext(posixpath.basename(source.rstrip("/")))[0] or "image"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80]
    return f"{stem}-{sha256[:12]}"


class ResultStore:
    """Writes and finds results under ``output_path``; every read and write goes through ObjectStoragePath."""

    def __init__(
        self, output_path: str, *, max_zip_entries: int = MAX_ZIP_ENTRIES, max_zip_bytes: int = MAX_ZIP_BYTES
    ) -> None:
        from airflow.providers.common.compat.sdk import ObjectStoragePath

        self.max_zip_entries = max_zip_entries
        self.max_zip_bytes = max_zip_bytes
        text = str(output_path)
        self.root = ObjectStoragePath(text if "://" in text else f"file://{posixpath.abspath(text)}")
        self._folders: dict[str, Any] | None = None

    def _index(self) -> dict[str, Any]:
        """Folders by the hash prefix in their name, from one listing of the root."""
        if self._folders is None:
            self._folders = {}
            if self.root.exists():
                for child in self.root.iterdir():
                    prefix = child.name.rsplit("-", 1)[-1]
                    if child.is_dir() and len(prefix) == 12:
                        self._folders.setdefault(prefix, []).append(child)
        return self._folders

    def cached(self, sha256: str) -> dict[str, Any] | None:
        """The record of a complete earlier result for this content, or None."""
        for folder in self._index().get(sha256[:12], []):
            sidecar = folder / f"{folder.name.rsplit('-', 1)[0]}.json"
            try:
                meta = json.loads(sidecar.read_text())
            except (ValueError, OSError):
                continue  # no sidecar: an interrupted write, not a result
            if meta.get("sha256") == sha256 and meta.get("markdown"):
                return self._record(folder, meta, cached=True)
        return None

    def write(self, source: str, sha256: str, result: protocol.Doc2XResult) -> dict[str, Any]:
        folder = self.root / folder_name(source, sha256)
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder.name.rsplit("-", 1)[0]
        figures = unpack_figures(
            result.convert_zip, source=source, max_entries=self.max_zip_entries, max_bytes=self.max_zip_bytes
        )
        for warning in figures.warnings:
            log.warning(warning)
        for path, data in figures.files.items():
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            write(target, data)
        if figures.raw is not None:
            write(folder / RAW_PAYLOAD_NAME, figures.raw)
        write(folder / f"{stem}.md", link_figures(result.markdown, figures.files).encode())
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
            "figures": sorted(figures.files),
            "raw_convert_zip": RAW_PAYLOAD_NAME if figures.raw is not None else None,
            "warnings": figures.warnings,
            "provider_version": __version__,
        }
        # The sidecar goes last: a folder without it is an interrupted write, not a cache hit.
        write(folder / f"{stem}.json", json.dumps(meta, indent=2).encode())
        self._index().setdefault(sha256[:12], []).append(folder)
        return self._record(folder, meta, cached=False)

    @staticmethod
    def _record(folder: Any, meta: dict[str, Any], *, cached: bool) -> dict[str, Any]:
        stem = meta["markdown"][: -len(".md")]
        return {
            "source": meta["source"],
            "uid": meta["uid"],
            "sha256": meta["sha256"],
            "markdown_path": str(folder / meta["markdown"]),
            "figure_paths": [str(folder / path) for path in meta["figures"]],
            "sidecar_path": str(folder / f"{stem}.json"),
            "cached": cached,
        }
