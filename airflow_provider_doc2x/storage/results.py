"""Results in object storage: one folder per image with its Markdown, its figures and a JSON sidecar.

Layout under ``output_path`` (a local directory or any ``ObjectStoragePath`` URI)::

    invoice-1f2e3d4c5b6a/            # the image's name, then the first 12 hex digits of its sha256
        invoice.md                   # the Markdown; figure links point at images/...
        images/<figure>.jpg          # the figures of convert_zip (PDF lane: of the PDF's export)
        invoice.json                 # the sidecar, written last: its presence means "complete"
        convert_zip.raw              # only when Doc2X's convert_zip was not a usable zip
    invoice-<all 64 hex of the sha256>/   # only when the short name holds another content's result
    invoice.v3-2026-1f2e3d4c5b6a/    # only when invoice-1f2e3d4c5b6a/ holds this content by another model

The hash in the folder name keeps two images of the same name apart, and makes the content cache
cheap: the sidecar's name says where a content's complete result would be. Twelve hex digits are
not unique in a corpus of millions, so a folder is a content's result only if its sidecar records
that very sha256; when the short name is taken by another content, the result gets the folder named
with the whole sha256 instead, and the other result is left as it is.

A folder keeps the model of the first result written into it. A result of the same content by
another model gets a folder of its own, ``<stem>.<model>-<hash>``, and the old model's result stays
where it was: the manifest's entries (and any record handed out) point at a folder whose result
never changes model under them, so an entry of one model never answers with another model's result.

The sidecar, one versioned format (``format_version``) read by every release::

    {"format": "airflow-provider-doc2x result", "format_version": 1,
     "source", "sha256", "model", "uid", "parsed_at", "markdown", "figures",
     "pages": [{"page_idx", "page_width", "page_height"}], "raw_convert_zip", "warnings",
     "provider_version", "source_fingerprint"?, "lane"?, "page_idx"?}

- ``model`` is the Doc2X model that made the result. A result is reused only for the same content
  *and* the same model. A sidecar without one was written before the model was recorded, when
  every result was made by ``v2``: it counts as ``v2``.
- A sidecar of a higher ``format_version`` belongs to a later release whatever its keys look like:
  it is never overwritten (the result goes to another folder), and it is a hit only if the keys
  this release reads (``sha256``, ``model``, ``markdown`` as a file name, ``figures`` as a list)
  are usable as they are; otherwise the image is parsed again into a folder of this release's.
- Later releases add keys (room is left for a document's ``pages`` with each page's number in its
  source document, and for provenance such as ``source_document``) without changing the meaning
  of the keys above; a change of meaning raises ``format_version``. A reader uses the keys it
  knows and ignores the others; a rewrite of the same source's result keeps the keys it does not
  know; a sidecar of a higher ``format_version`` is never overwritten.
- A sidecar that cannot be *read* (a 5xx, a throttled or timed-out GET) is an error, never "no
  result": after :func:`~airflow_provider_doc2x.storage.objects.storage_call`'s retries the task fails,
  retryably, naming the sidecar. Only a missing sidecar, or one that was read and is not a
  result, means "no result".

The figures come from :func:`airflow_provider_doc2x.storage.archives.unpack_figures`, which refuses what
is unsafe; a figure that cannot be written is skipped with a warning. Whatever ``convert_zip``
holds, the Markdown is written and the task goes on.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from airflow_provider_doc2x import __version__, protocol
from airflow_provider_doc2x.exceptions import Doc2XStorageError
from airflow_provider_doc2x.storage.archives import (
    MAX_ZIP_BYTES,
    MAX_ZIP_ENTRIES,
    Figures,
    safe_member_path,
    unpack_figures,
)
from airflow_provider_doc2x.storage.objects import remove_object, storage_call, storage_path

log = logging.getLogger(__name__)

RAW_PAYLOAD_NAME = "convert_zip.raw"
#: What a sidecar says it is, and the version of its format this release writes.
SIDECAR_FORMAT = "airflow-provider-doc2x result"
SIDECAR_VERSION = 1
#: The model of a result whose sidecar (or manifest entry) records none: written before the model
#: was recorded, when every result came from Doc2X's ``v2`` (the image API's, and the PDF API's
#: default).
LEGACY_MODEL = "v2"
#: The sidecar keys this release writes and understands; a rewrite keeps any other key.
SIDECAR_KEYS = frozenset(
    {
        "format",
        "format_version",
        "source",
        "sha256",
        "model",
        "uid",
        "parsed_at",
        "pages",
        "markdown",
        "figures",
        "raw_convert_zip",
        "warnings",
        "provider_version",
        "source_fingerprint",
        "lane",
        "page_idx",
        "source_format",
        "converted",
        "document",
    }
)
#: Sidecar keys that are also the record's (how the source travelled, whether it is a document).
RECORD_KEYS = ("source_format", "converted", "document")
_IMAGE_LINK = re.compile(r"""(<img\s[^>]*?src=["']|!\[[^\]]*\]\()([^"')\s]+)""")
_HASH_TAIL = re.compile(r"^(?:[0-9a-f]{12}|[0-9a-f]{64})$")
#: Object stores, where a folder is only a key prefix: ``mkdir`` creates nothing there and costs a
#: request (s3fs: a HEAD of the bucket), so it is skipped.
OBJECT_STORE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss"})
#: The longest stem of a folder name (the manifest refuses a folder of a longer one).
MAX_STEM = 80


def write(path: Any, data: bytes) -> None:
    """Write ``data`` as the object at ``path`` (an ``ObjectStoragePath``), whole; see :func:`put_object`."""
    put_object(path.fs, path.path, data, uri=str(path))


def put_object(fs: Any, path: str, data: bytes, *, uri: str) -> None:
    """Write ``data`` as the object at ``path`` on the fsspec filesystem ``fs`` (``uri`` names it in errors).

    A write the storage fails to take (a PUT throttled past the filesystem's own tries, a reset) is
    tried again, whole (the same bytes under the same name), and then fails the task retryably,
    naming the object: a paid result is never dropped for a busy bucket.
    """

    def put() -> None:
        with fs.open(path, mode="wb") as handle:
            handle.write(data)

    storage_call(put, what="writing the result file", uri=uri)


def link_figures(markdown: str, files: dict[str, bytes]) -> str:
    """Point each figure link at its unpacked file: Doc2X writes ``NAME.jpg``, the zip holds ``images/NAME.jpg``."""
    by_name = {posixpath.basename(path): path for path in files}

    def relink(match: re.Match) -> str:
        target = match.group(2)
        if target in files or target not in by_name:
            return match.group(0)
        return match.group(1) + by_name[target]

    return _IMAGE_LINK.sub(relink, markdown)


def folder_name(source: str, sha256: str, *, whole: bool = False, model: str | None = None) -> str:
    """``<stem>-<first 12 hex of sha256>``: readable, and apart from any other content of the same name.

    ``whole``: ``<stem>-<all 64 hex>``, the folder of a content whose short name holds another's result.
    ``model``: ``<stem>.<model>-<hash>``, the folder of a content whose own folder holds its result
    by another model (which stays there).
    """
    stem = posixpath.splitext(posixpath.basename(source.rstrip("/")))[0] or "image"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:MAX_STEM].lstrip(".") or "image"
    if model is not None:
        tag = model_tag(model)
        stem = f"{stem[: MAX_STEM - len(tag) - 1]}.{tag}"
    return f"{stem}-{sha256 if whole else sha256[:12]}"


def model_tag(model: str) -> str:
    """A model's name as it appears in a folder name: plain characters, at most 40."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", model)[:40] or "model"


def model_of(meta: Mapping[str, Any]) -> str:
    """The model that made a stored result: its sidecar's (or entry's) ``model``, else :data:`LEGACY_MODEL`."""
    model = meta.get("model")
    return model if isinstance(model, str) and model else LEGACY_MODEL


def _newer_format(meta: Mapping[str, Any]) -> bool:
    version = meta.get("format_version")
    return isinstance(version, int) and not isinstance(version, bool) and version > SIDECAR_VERSION


def _readable(meta: Mapping[str, Any]) -> bool:
    """Whether the keys a record is made of have the shape this release reads."""
    markdown, figures = meta.get("markdown"), meta.get("figures", [])
    return (
        isinstance(markdown, str)
        and markdown.endswith(".md")
        and safe_member_path(markdown) == markdown
        and "/" not in markdown  # a file of its own folder, never another's
        and isinstance(figures, list)
        and all(isinstance(path, str) and safe_member_path(path) == path for path in figures)
    )


def markdown_text(markdown: str) -> bytes:
    """The Markdown as written to a file: ending with one newline, as text files do."""
    return (markdown.rstrip("\n") + "\n").encode()


def read_sidecar(fs: Any, folder_path: str, folder_uri: str) -> dict[str, Any] | None:
    """The sidecar of the folder at ``folder_path`` on ``fs``, as read (``folder_uri`` names it in errors).

    A later release's is returned whatever its keys look like (it is taken, not ours).
    """
    name = f"{posixpath.basename(folder_path.rstrip('/')).rsplit('-', 1)[0]}.json"
    path = f"{folder_path.rstrip('/')}/{name}"
    try:
        # One GET: an ``open`` (or s3fs's whole-object ``cat_file``) first asks for the object's
        # size, on S3 a HEAD, and a LIST when it is missing, to tell a folder from nothing; a read
        # from byte 0 on is one GET, or one 404.
        data = storage_call(
            lambda: fs.cat_file(path, start=0),
            what="reading the sidecar",
            uri=f"{folder_uri.rstrip('/')}/{name}",
        )
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None  # no sidecar: an interrupted write, not a result
    try:
        meta = json.loads(data)
    except ValueError:
        return None  # read, and not a sidecar
    if not isinstance(meta, dict) or meta.get("format", SIDECAR_FORMAT) != SIDECAR_FORMAT:
        return None
    if _newer_format(meta):
        return meta  # never overwritten; a hit only if what this release reads is usable
    if not _readable(meta):
        return None
    return meta


def folder_record(folder_uri: str, meta: dict[str, Any], *, cached: bool) -> dict[str, Any]:
    """The record of the result folder ``folder_uri``, from its sidecar's (validated) metadata."""
    stem = meta["markdown"][: -len(".md")]
    folder = folder_uri.rstrip("/")
    record = {
        "source": meta.get("source"),
        "uid": meta.get("uid"),
        "sha256": meta.get("sha256"),
        "markdown_path": f"{folder}/{meta['markdown']}",
        "figure_paths": [f"{folder}/{path}" for path in meta.get("figures", [])],
        "sidecar_path": f"{folder}/{stem}.json",
        "cached": cached,
    }
    page_idx = meta.get("page_idx")
    if isinstance(page_idx, int) and not isinstance(page_idx, bool):
        record["page_idx"] = page_idx  # the PDF lane's: the image's page in the PDF ``uid``
    for key in RECORD_KEYS:
        if isinstance(meta.get(key), (str, bool)):
            record[key] = meta[key]
    if meta.get("document") is True and isinstance(meta.get("pages"), list):
        # A document's pages: each one's number in the source and its page_idx in the PDF parsed.
        record["pages"] = [
            {"page": page.get("page"), "page_idx": page.get("page_idx")}
            for page in meta["pages"]
            if isinstance(page, dict)
        ]
    return record


class ResultStore:
    """Writes and finds results under ``output_path``, on the filesystem its ``ObjectStoragePath`` gives.

    Inside, a result folder is its name under the root: its URI and its path on the filesystem are
    strings made from the root's, and no ``ObjectStoragePath`` is made for the files in it (a join
    costs tens of microseconds, and a backfill makes tens of thousands).
    """

    def __init__(
        self,
        output_path: str,
        *,
        model: str = protocol.DEFAULT_MODEL,
        overwrite: bool = False,
        max_zip_entries: int = MAX_ZIP_ENTRIES,
        max_zip_bytes: int = MAX_ZIP_BYTES,
    ) -> None:
        """Point at ``output_path`` (nothing is read until asked); zips are unpacked within the caps.

        ``model`` is the Doc2X model that makes this store's new results: a stored result of
        another model is not reused; with ``overwrite``, none is (the task parses everything again
        and writes over what it finds), which every lane and the records read from here.
        """
        self.model = model
        self.overwrite = overwrite
        self.max_zip_entries = max_zip_entries
        self.max_zip_bytes = max_zip_bytes
        self.root = storage_path(output_path)
        root_uri, root_path = str(self.root), self.root.path
        self._uri_prefix = root_uri if root_uri.endswith("/") else f"{root_uri}/"
        self._path_prefix = root_path if root_path.endswith("/") else f"{root_path}/"
        self._written: dict[str, dict[str, Any]] = {}
        # The root's listing and the index by hash are built once, under this lock, and published
        # only whole: the upload threads that look meanwhile wait for them instead of finding nothing.
        self._lock = threading.RLock()
        self._by_hash: dict[str, list[str]] | None = None
        self._children: list[str] | None = None
        self._sidecars: dict[str, dict[str, Any] | None] = {}
        #: Each source's storage fingerprint taken before it was read (see
        #: :mod:`airflow_provider_doc2x.storage.manifest`); written into the sidecar so that a lost manifest
        #: can be rebuilt from the sidecars without reading the images again.
        self.fingerprints: dict[str, str] = {}
        #: The URI of every file this store wrote but sidecars, in order (the task's lineage names them).
        self.written_files: list[str] = []

    def cached(self, sha256: str, source: str) -> dict[str, Any] | None:
        """The record of a complete earlier result of this content by this store's model, or None.

        The folder of the image's own name first (and, when that holds something else, the
        folder of its name and this model), then any folder named for this hash (the same content
        under another name, or a folder of its own after a clash); a folder counts only if its
        sidecar records this sha256 and this model.
        """
        if sha256 in self._written:
            return self._written[sha256]
        own = folder_name(source, sha256)
        meta = self.sidecar_named(own)
        if meta is not None and self.holds(meta, sha256):
            return self.record_of(own, meta)
        probed = {own}
        if meta is not None:
            by_model = folder_name(source, sha256, model=self.model)
            probed.add(by_model)
            meta = self.sidecar_named(by_model)
            if meta is not None and self.holds(meta, sha256):
                return self.record_of(by_model, meta)
        for candidate in self._folders_of(sha256):
            meta = self.sidecar_named(candidate) if candidate not in probed else None
            if meta is not None and self.holds(meta, sha256):
                return self.record_of(candidate, meta)
        return None

    def holds(self, meta: Mapping[str, Any], sha256: str) -> bool:
        """Whether a sidecar is a result of this content by this store's model (a hit).

        A later release's sidecar is one only if the keys this release reads are usable as they are.
        """
        return meta.get("sha256") == sha256 and model_of(meta) == self.model and _readable(meta)

    def remember(self, record: dict[str, Any]) -> None:
        """Answer :meth:`cached` for this record's content from memory (a result known from the manifest)."""
        self._written[record["sha256"]] = {**record, "cached": True}

    def folder_names(self) -> list[str]:
        """The names of the root's children, from one fresh listing made at the first call.

        A listing that fails (after retries) raises :class:`Doc2XStorageError`: an unlisted root
        is not an empty one.
        """
        with self._lock:
            if self._children is None:
                self._children = storage_call(
                    self._list_root, what="listing the results under", uri=str(self.root)
                )
            return self._children

    def uri_of(self, name: str) -> str:
        """The URI of the folder ``name`` under the root: ``str(root / name)``, made without a join."""
        return self._uri_prefix + name

    def _list_root(self) -> list[str]:
        """One listing of the root (``iterdir`` would list it twice: once to ask whether it is a folder)."""
        fs, base = self.root.fs, self.root.path.rstrip("/")
        fs.invalidate_cache(base)  # another process may have written since this one listed
        try:
            listed = fs.ls(base, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []  # nothing written here yet
        names = {
            posixpath.basename(item["name"].rstrip("/"))
            for item in listed
            if isinstance(item, dict) and isinstance(item.get("name"), str)
        }
        own = posixpath.basename(base)
        return [name for name in sorted(names) if name and name not in (own, ".", "..")]

    def _folders_of(self, sha256: str) -> list[str]:
        """Folders whose name ends in this hash (12 or 64 hex), from one listing of the root made at the first miss."""
        index = self._by_hash
        if index is None:
            with self._lock:
                if self._by_hash is None:
                    built: dict[str, list[str]] = {}
                    for child in self.folder_names():
                        tail = child.rsplit("-", 1)[-1]
                        if _HASH_TAIL.fullmatch(tail):
                            built.setdefault(tail[:12], []).append(child)
                    self._by_hash = built
                index = self._by_hash
        return index.get(sha256[:12], [])

    def sidecar_named(self, name: str) -> dict[str, Any] | None:
        """The sidecar of the result folder ``name`` under the root, validated, read once per store.

        None if it is missing or not a result.

        Raises :class:`Doc2XStorageError` naming the sidecar when it cannot be read.
        """
        if name not in self._sidecars:
            self._sidecars[name] = read_sidecar(self.root.fs, self._path_prefix + name, self.uri_of(name))
        return self._sidecars[name]

    def _folder_for(self, source: str, sha256: str) -> tuple[str, dict[str, Any] | None]:
        """Where this content's new result goes, with the sidecar there now (None: none, or not a result).

        The image's own folder (``<stem>-<12 hex>``) if it is free or holds this content by this
        model. If it holds another content's result (or a later release's sidecar): ``<stem>-<64
        hex>``. If it holds this content by another model: ``<stem>.<model>-<12 hex>`` (and its
        ``-<64 hex>`` twin, by the same rules). Another content's, another model's or a later
        release's result is never overwritten.
        """
        taken: list[tuple[str, str]] = []
        for model in (None, self.model):
            for whole in (False, True):
                folder = folder_name(source, sha256, whole=whole, model=model)
                meta = self.sidecar_named(folder)
                if meta is None or (
                    meta.get("sha256") == sha256 and model_of(meta) == self.model and not _newer_format(meta)
                ):
                    if taken:
                        log.warning(
                            "Result folder %s holds %s: the result of %s (sha256 %s) by %s goes to %s",
                            self._uri_prefix + taken[0][0],
                            taken[0][1],
                            source,
                            sha256,
                            self.model,
                            self._uri_prefix + folder,
                        )
                    return folder, meta
                if _newer_format(meta):
                    taken.append((folder, "a newer release's result"))
                elif meta.get("sha256") == sha256:
                    taken.append((folder, f"this image's result by the model {model_of(meta)}"))
                    break  # this content by another model: a folder named for this model
                else:
                    taken.append((folder, "another image's result"))
        raise Doc2XStorageError(
            f"The result of {source} (sha256 {sha256}) by {self.model} cannot be stored: "
            + "; ".join(f"{self._uri_prefix}{folder} holds {what}" for folder, what in taken)
            + ". This provider overwrites none of them; move those folders away, or parse the image "
            "with the release that wrote them",
            source=source,
        )

    def write(
        self,
        source: str,
        sha256: str,
        result: protocol.Doc2XResult,
        *,
        figures: Figures | None = None,
        extra: Mapping[str, Any] | None = None,
        markdown: str | None = None,
    ) -> dict[str, Any]:
        """Write one image's result (figures, Markdown, then the sidecar); return its record of paths.

        ``figures`` are files already at hand (relative paths made of plain characters; the PDF
        lane's, from an export zip): then ``convert_zip`` is not read. ``extra`` adds fields to the
        sidecar (the PDF lane's ``lane`` and ``page_idx``; a source's ``source_format``,
        ``converted``, and ``document`` for a whole document); those are in the record too.
        ``markdown`` is written instead of the result's own (a document's, with its page markers).
        Each page of the sidecar has its number in the source (``page``): a document's pages count
        from 1; an image is page 1 of itself.
        The folder is the image's own (``<stem>-<12 hex>``) unless that holds another content's
        result (then ``<stem>-<64 hex>``) or another model's (then ``<stem>.<model>-<12 hex>``).
        """
        folder, previous = self._folder_for(source, sha256)
        on_object_store = self.root.protocol in OBJECT_STORE_SCHEMES
        fs, folder_path = self.root.fs, self._path_prefix + folder
        if not on_object_store:
            fs.makedirs(folder_path, exist_ok=True)
        stem = folder.rsplit("-", 1)[0]
        if previous is not None:
            # Rewriting a complete result in place (overwrite, a result fetched again): its sidecar
            # goes first, so that a rewrite cut short leaves a folder that is not a hit, never a
            # valid sidecar beside a half-written Markdown.
            self._sidecars[folder] = None
            self._written.pop(sha256, None)
            remove_object(
                self.root.joinpath(folder, f"{stem}.json"), what="removing the sidecar before rewriting"
            )
        if figures is None:
            figures = unpack_figures(
                result.convert_zip,
                source=source,
                max_entries=self.max_zip_entries,
                max_bytes=self.max_zip_bytes,
            )
        written: dict[str, bytes] = {}
        for path, data in figures.files.items():
            try:
                if not on_object_store:
                    fs.makedirs(posixpath.dirname(f"{folder_path}/{path}"), exist_ok=True)
                self._put(folder, path, data)
            except (OSError, ValueError) as error:
                figures.warnings.append(
                    f"figure {path!r} of {source} could not be written ({error}); skipped"
                )
                continue
            written[path] = data
        for warning in figures.warnings:
            log.warning("%s", warning)
        if figures.raw is not None:
            self._put(folder, RAW_PAYLOAD_NAME, figures.raw)
        text = result.markdown if markdown is None else markdown
        self._put(folder, f"{stem}.md", markdown_text(link_figures(text, written)))
        document = bool((extra or {}).get("document"))
        # Keys a later release added to this source's earlier sidecar are kept.
        kept = (
            {key: value for key, value in previous.items() if key not in SIDECAR_KEYS}
            if previous is not None and previous.get("source") == source
            else {}
        )
        meta = {
            **kept,
            "format": SIDECAR_FORMAT,
            "format_version": SIDECAR_VERSION,
            "source": source,
            "sha256": sha256,
            "model": self.model,
            "uid": result.uid,
            "parsed_at": datetime.now(timezone.utc).isoformat(),
            "pages": [
                {
                    "page": page.page_idx + 1 if document else 1,
                    "page_idx": page.page_idx,
                    "page_width": page.page_width,
                    "page_height": page.page_height,
                }
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
        self._put(folder, f"{stem}.json", json.dumps(meta, indent=2).encode(), bookkeeping=True)
        self._sidecars[folder] = meta
        record = folder_record(self.uri_of(folder), meta, cached=False)
        self._written[sha256] = {**record, "cached": True}
        return record

    def _put(self, folder: str, name: str, data: bytes, *, bookkeeping: bool = False) -> None:
        """Write the file ``name`` of the folder ``folder``, whole; no join made; a sidecar is ``bookkeeping``."""
        uri = f"{self.uri_of(folder)}/{name}"
        put_object(self.root.fs, f"{self._path_prefix}{folder}/{name}", data, uri=uri)
        if not bookkeeping:
            self.written_files.append(uri)

    def record_of(self, folder_name: str, meta: dict[str, Any]) -> dict[str, Any]:
        """The record of an earlier result in ``folder_name`` under the root, from its (validated) metadata."""
        return folder_record(self.uri_of(folder_name), meta, cached=True)
