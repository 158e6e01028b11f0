"""The manifest's format on storage: its objects' names and JSON, read back as hostile bytes.

It lives under ``output_path``, one flat folder that one listing shows whole::

    <output_path>/_manifest/v1/
        3f.base.20260102T030405123456Z.<id>.json     # shard 3f: entries folded by a compaction
        3f.delta.20260102T031122000001Z.<id>.json    # shard 3f: the new entries of one task
        ...

Each object is JSON: ``{"format", "version": 2, "shard", "writer", "entries"}``, an entry per
source: ``{"fingerprint": "size=...;etag=...;mtime=...", "sha256", "at", "status", "model",
"result": {"folder", "uid", "markdown", "figures"}}``.

- ``status`` is ``parsed`` (``result`` says where) or ``read`` (``result`` is null: read and hashed
  by a task that deferred and has not recorded its result yet). Room is left for entries that are
  neither (a failure recorded without a result, as a later release may write): this release keeps
  them exactly as they were written, whatever their other keys hold, answers nothing from them (so
  their images are read), and never deletes an object that holds one.
- An entry of a known status that is not valid is dropped alone (with a warning; its image is
  rebuilt from its sidecar or read again): the other entries of its object are used, and carried
  into the object that folds it.
- ``model`` is the Doc2X model that made the result; an entry of another model than the task's
  answers nothing. Version 1 (the first release) had neither key: its entries count as ``v2``, the
  only model then, and their result folder's sidecar is checked once before it is trusted (that
  release could record another image's folder for a content), after which they are recorded anew.
- Keys: the source URI without its connection id (``s3://aws_default@bucket/key`` and
  ``s3://bucket/key`` are one object; a host and port the URI carries stay, so two endpoints
  stay apart). Entries written under the spelling with the connection id are still found.
- A later release adds keys without changing the meaning of these; a change of meaning raises
  ``version``. An entry or result with keys this release does not know is used by the keys it
  knows, and those keys are kept when this release folds it into a new object. An object with
  top-level keys this release does not know is read but never deleted or folded away; an object of
  a higher version is left alone, not read, never deleted.

Every byte read back is treated as hostile. An object that was read and is not the JSON this
module writes (types, hashes, shard, folder names that stay inside ``output_path``, figure paths
that are plain relative paths) is :class:`Unusable` as a whole; what a task does with it (ignore
it with a warning, rebuild its entries, delete it when it writes the shard again) is
:mod:`~airflow_provider_doc2x.storage.manifest.shards`'s.

Nothing here touches storage: this module turns objects into entries and back, so that the format
every release reads is in one place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from airflow_provider_doc2x.storage.archives import MAX_ZIP_ENTRIES, safe_member_path
from airflow_provider_doc2x.storage.results import LEGACY_MODEL

#: One logger for the whole manifest, under the name its logs have always had.
log = logging.getLogger("airflow_provider_doc2x.storage.manifest")

#: What the objects say they are; an object of a later version is left alone, not trusted.
FORMAT = "airflow-provider-doc2x manifest"
VERSION = 2
#: The versions this release reads (and folds into objects of :data:`VERSION`).
READABLE_VERSIONS = frozenset({1, 2})
#: The keys of an object this release knows; an object with another is read but never deleted.
OBJECT_KEYS = frozenset({"format", "version", "shard", "writer", "entries"})
#: Entry states: a recorded result, or a content read whose result is not recorded yet.
PARSED, READ = "parsed", "read"
#: The manifest's folder under ``output_path``, and the folder of its layout there (the objects'
#: ``version`` is that of their content: objects of every version share the folder).
MANIFEST_DIR = "_manifest"
LAYOUT_DIR = "v1"
#: Shards (the first two hex digits of the sha256 of the source URI).
SHARDS = 256
#: Larger than any manifest object this module writes for a realistic corpus; anything larger is refused.
MAX_OBJECT_BYTES = 256 * 1024 * 1024

#: A manifest object's name: its shard, its kind, when it was written and a random id.
OBJECT_NAME = re.compile(r"^(?P<shard>[0-9a-f]{2})\.(?P<kind>base|delta)\.\d{8}T\d{12}Z\.[0-9a-f]{32}\.json$")
#: A content's sha256 as entries and records carry it.
SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: A result folder directly under ``output_path``: ``<name>-<12 or 64 hex of the sha256>``.
RESULT_FOLDER = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,79}-(?:[0-9a-f]{12}|[0-9a-f]{64})$")
_MAX_URI = 4096
_MAX_TEXT = 1024


class Unusable(ValueError):
    """What was read back is not what this module writes."""


def shard_of(source: str) -> str:
    """The shard of a source URI: the first two hex digits of its sha256."""
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:2]


def source_key(uri: str) -> str:
    """A source's key in the manifest: its URI without the connection id (``user@``) it may carry.

    ``s3://aws_default@bucket/key`` and ``s3://bucket/key`` name one object; a host and port in the
    URI stay, so two endpoints with the same bucket name stay apart. (Two connections to different
    endpoints spelled with one bucket and key share an entry, which answers only while the
    fingerprint, ETag and time included, matches the object listed.)
    """
    scheme, separator, rest = uri.partition("://")
    if not separator:
        return uri
    netloc, slash, path = rest.partition("/")
    _, at, host = netloc.rpartition("@")
    return f"{scheme}://{host}{slash}{path}" if at else uri


def shards_of(sources: Iterable[str]) -> set[str]:
    """The shards holding these sources' entries: under their key, and under a spelling with a connection id."""
    shards = set()
    for source in sources:
        key = source_key(source)
        shards.add(shard_of(key))
        if key != source:
            shards.add(shard_of(source))
    return shards


def _extra(data: Mapping[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """The keys of a stored object that this release does not know: kept as they are."""
    known = set(known)
    return {key: value for key, value in data.items() if key not in known}


@dataclass(frozen=True)
class Result:
    """Where a content's result is, relative to ``output_path``: what its record is built from."""

    folder: str
    uid: str | None
    markdown: str
    figures: tuple[str, ...]
    #: Keys a later release added, kept as they were read.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    KEYS = ("folder", "uid", "markdown", "figures")

    def to_json(self) -> dict[str, Any]:
        """As stored in a manifest object."""
        return {
            **self.extra,
            "folder": self.folder,
            "uid": self.uid,
            "markdown": self.markdown,
            "figures": list(self.figures),
        }

    @classmethod
    def from_json(cls, data: Any, sha256: str) -> Result:
        """Validated: a folder directly under ``output_path`` named for this content, plain relative figures.

        The name only says the folder *may* be this content's: the sidecar there records whose it
        is (checked when the result was recorded, and once for entries of version 1).
        """
        if not isinstance(data, dict) or not set(cls.KEYS) <= set(data):
            raise Unusable("a result is not an object with folder, uid, markdown and figures")
        folder, uid, markdown, figures = data["folder"], data["uid"], data["markdown"], data["figures"]
        if (
            not isinstance(folder, str)
            or not RESULT_FOLDER.fullmatch(folder)
            or folder.rsplit("-", 1)[1] not in (sha256[:12], sha256)
        ):
            raise Unusable("a result folder is not <name>-<12 or 64 hex of its sha256>")
        if markdown != folder.rsplit("-", 1)[0] + ".md":
            raise Unusable("a result's Markdown is not named after its folder")
        if uid is not None and (not isinstance(uid, str) or not 0 < len(uid) <= 200):
            raise Unusable("a result's uid is not a short string")
        if not isinstance(figures, list) or len(figures) > MAX_ZIP_ENTRIES:
            raise Unusable("a result's figures are not a list")
        for figure in figures:
            if not isinstance(figure, str) or safe_member_path(figure) != figure:
                raise Unusable("a figure path is not a plain relative path")
        return cls(folder, uid, markdown, tuple(figures), _extra(data, cls.KEYS))


@dataclass(frozen=True)
class Entry:
    """What the manifest knows of one source: fingerprint, content, and (once written) its result."""

    fingerprint: str
    sha256: str
    at: float
    result: Result | None = None
    #: The model that made the result (:data:`~airflow_provider_doc2x.storage.results.LEGACY_MODEL` for an
    #: entry of version 1, which recorded none).
    model: str = LEGACY_MODEL
    #: None for an entry of version 1 (no ``status``, no ``model``); else its ``status``.
    status: str | None = PARSED
    #: Keys a later release added, kept as they were read.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    KEYS = ("fingerprint", "sha256", "at", "result")

    @property
    def legacy(self) -> bool:
        """Written by the first release: no model recorded, and its folder not checked against its sidecar."""
        return self.status is None

    @property
    def usable(self) -> bool:
        """Whether this release may answer from it (a state it knows)."""
        return self.status in (None, PARSED, READ)

    def order(self) -> tuple[Any, ...]:
        """A total order: the newest wins, and among equals the one with a result (merging is commutative)."""
        return (self.at, self.result is not None, json.dumps(self.to_json(), sort_keys=True))

    def to_json(self) -> dict[str, Any]:
        """As stored in a manifest object (an entry of version 1 keeps that shape)."""
        if not self.usable:
            return dict(self.extra)  # a later release's entry: exactly as it was read
        data = {
            **self.extra,
            "fingerprint": self.fingerprint,
            "sha256": self.sha256,
            "at": self.at,
            "result": self.result.to_json() if self.result else None,
        }
        if self.status is not None:
            data["status"] = self.status
            data["model"] = self.model
        return data

    @classmethod
    def from_json(cls, data: Any) -> Entry:
        """Validated field by field; keys it does not know are kept.

        An entry whose ``status`` this release does not know is a later release's: it is kept whole,
        as it was written (its other keys may mean something else there), and answers nothing.
        """
        status = data.get("status") if isinstance(data, dict) else None
        if isinstance(status, str) and 0 < len(status) <= 64 and status not in (PARSED, READ):
            at = data.get("at")
            when = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else 0.0
            fingerprint, sha256 = data.get("fingerprint"), data.get("sha256")
            return cls(
                fingerprint if isinstance(fingerprint, str) else "",
                sha256 if isinstance(sha256, str) else "",
                when if math.isfinite(when) else 0.0,
                status=status,
                extra=dict(data),
            )
        if not isinstance(data, dict) or not set(cls.KEYS) <= set(data):
            raise Unusable("an entry is not an object with fingerprint, sha256, at and result")
        fp, sha256, at = data["fingerprint"], data["sha256"], data["at"]
        if not isinstance(fp, str) or not 0 < len(fp) <= _MAX_TEXT:
            raise Unusable("an entry's fingerprint is not a short string")
        if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
            raise Unusable("an entry's sha256 is not 64 lower-case hex digits")
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
            raise Unusable("an entry's time is not a number")
        status, model = data.get("status"), data.get("model", LEGACY_MODEL)
        if status is not None and (not isinstance(status, str) or not 0 < len(status) <= 64):
            raise Unusable("an entry's status is not a short string")
        if not isinstance(model, str) or not 0 < len(model) <= 64:
            raise Unusable("an entry's model is not a short string")
        if status is None and "model" in data:
            status = PARSED if data["result"] is not None else READ
        result = None if data["result"] is None else Result.from_json(data["result"], sha256)
        if status in (PARSED, READ) and (status == PARSED) != (result is not None):
            raise Unusable(f"an entry's status {status!r} does not match its result")
        extra = _extra(data, (*cls.KEYS, "status", "model"))
        return cls(fp, sha256, float(at), result, model, status, extra)


def newer(entry: Entry, other: Entry | None) -> bool:
    """Whether ``entry`` wins over ``other`` (or stands alone): the merge of every writer's objects in any order."""
    return other is None or entry.order() > other.order()


@dataclass(frozen=True)
class Parsed:
    """One manifest object as read: its valid entries, whether a compaction may fold it, what was dropped."""

    entries: dict[str, Entry]
    #: False when it holds what this release does not understand (top-level keys, an entry of a later
    #: status): such an object is never deleted.
    foldable: bool
    #: The entries of a known status that were not valid, each with why (dropped alone).
    rejected: list[str]


def parse(data: bytes, shard: str) -> Parsed | None:
    """An object's entries, validated one by one; None for a later version (left alone, with a warning).

    Raises:
        Unusable: the object as a whole is not what this module writes (not JSON, not a manifest
            object, a version it does not know, another shard's).
    """
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise Unusable("not JSON") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise Unusable("not a manifest object")
    version = document.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        log.warning(
            "A manifest object of format version %s is left alone (this provider reads %s)",
            version,
            VERSION,
        )
        return None
    if (
        version not in READABLE_VERSIONS
        or isinstance(version, bool)
        or document.get("shard") != shard
        or not isinstance(document.get("entries"), dict)
    ):
        raise Unusable("wrong version, shard or entries")
    entries, rejected = {}, []
    for source, value in document["entries"].items():
        if not 0 < len(source) <= _MAX_URI or shard_of(source) != shard:
            rejected.append(f"{source[:200]!r}: its source does not belong in this shard")
            continue
        try:
            entries[source] = Entry.from_json(value)
        except Unusable as unusable:
            rejected.append(f"{source}: {unusable}")
    foldable = set(document) <= OBJECT_KEYS and all(entry.usable for entry in entries.values())
    return Parsed(entries, foldable, rejected)


def object_name(shard: str, kind: str) -> str:
    """A new object's name, never another's: the shard, ``base`` or ``delta``, a timestamp and a random id."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{shard}.{kind}.{stamp}.{uuid.uuid4().hex}.json"


def encode(shard: str, writer: str, entries: Mapping[str, Entry]) -> bytes:
    """A manifest object of :data:`VERSION` holding these entries of one shard, sorted by source."""
    return json.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "shard": shard,
            "writer": writer,
            "entries": {source: entry.to_json() for source, entry in sorted(entries.items())},
        },
        separators=(",", ":"),
    ).encode()
