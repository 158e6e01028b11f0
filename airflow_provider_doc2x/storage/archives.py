"""Unpacking Doc2X's ``convert_zip`` safely: it is untrusted input, and it never fails a task.

``convert_zip`` should be the base64 of a zip of ``images/NAME.jpg`` files. Whatever it really is,
:func:`unpack_figures` returns what can be kept safely and says what was refused:

- entries are kept only under names made of plain characters, one folder level or more, each part
  at most :data:`MAX_NAME_CHARS` characters: no ``..``, no absolute path, no drive letter, no
  ``scheme:`` (``memory://x`` or ``s3:/...`` would make storage paths point elsewhere), no symlink;
- a name that clashes with another (a file where a folder must go, or the same name twice) is
  refused, since writing it would fail or overwrite;
- at most :data:`MAX_ZIP_ENTRIES` entries and :data:`MAX_ZIP_BYTES` unpacked bytes, counted while
  reading, so a zip bomb is stopped;
- a payload that is not a string, not base64 or not a zip is kept raw, with a warning.
"""

from __future__ import annotations

import base64
import binascii
import io
import posixpath
import re
import stat
import zipfile
from dataclasses import dataclass, field
from typing import Any

MAX_ZIP_ENTRIES = 1000
MAX_ZIP_BYTES = 200 * 1024 * 1024
MAX_NAME_CHARS = 120
MAX_DEPTH = 4
#: A safe part of a path: word characters, dots, dashes and spaces, not starting with a dot or a space.
_SAFE_PART = re.compile(r"[^\W][\w.\- ]*", re.UNICODE)


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


def safe_member_path(name: str, *, is_symlink: bool = False) -> str | None:
    """The entry's path if writing it stays inside the folder as a plain relative path, else None."""
    name = name.replace("\\", "/")
    if is_symlink or name.startswith("/"):
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or len(parts) > MAX_DEPTH:
        return None
    for part in parts:
        if len(part) > MAX_NAME_CHARS or not _SAFE_PART.fullmatch(part) or part.endswith((" ", ".")):
            return None
    return posixpath.join(*parts)


def unpack_figures(
    payload: Any,
    *,
    source: str,
    max_entries: int = MAX_ZIP_ENTRIES,
    max_bytes: int = MAX_ZIP_BYTES,
) -> Figures:
    """Unpack ``convert_zip`` safely; never raise for a bad payload, say what was wrong instead."""
    figures = Figures()
    if payload is None or payload == "":
        return figures
    if not isinstance(payload, str):
        figures.raw = repr(payload).encode()
        figures.warnings.append(f"convert_zip of {source} is a {type(payload).__name__}, not text; kept raw")
        return figures
    data = decode_base64(payload)
    if data is None:
        figures.raw = payload.encode("utf-8", "replace")
        figures.warnings.append(f"convert_zip of {source} is not valid base64; kept raw")
        return figures
    if not data.startswith(b"PK"):
        figures.raw = data
        figures.warnings.append(f"convert_zip of {source} is not a zip ({len(data)} bytes); kept raw")
        return figures
    try:
        _unpack(data, figures, source=source, max_entries=max_entries, max_bytes=max_bytes)
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


def _unpack(data: bytes, figures: Figures, *, source: str, max_entries: int, max_bytes: int) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = archive.infolist()
        if len(entries) > max_entries:
            raise _Refused(f"{len(entries)} entries, over the cap of {max_entries}")
        folders: set[str] = set()
        total = 0
        for info in entries:
            if info.is_dir():
                continue
            path = safe_member_path(info.filename, is_symlink=stat.S_ISLNK(info.external_attr >> 16))
            if path is None:
                figures.warnings.append(
                    f"convert_zip of {source}: refused unsafe entry {info.filename[:200]!r}"
                )
                continue
            parents = {posixpath.join(*path.split("/")[:depth]) for depth in range(1, path.count("/") + 1)}
            if path in figures.files or path in folders or parents & set(figures.files):
                figures.warnings.append(
                    f"convert_zip of {source}: refused entry {path!r}, which clashes with another"
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
            folders |= parents


class _Refused(Exception):
    pass
