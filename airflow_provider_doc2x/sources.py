"""
Where images come from: a local path or any ``ObjectStoragePath`` URI (file://, s3://, gs://, ...).

Every image is checked (exists, not empty, JPEG/PNG by its magic bytes, at most 7 MB) from its size
and first bytes before any image of the batch is uploaded, so a bad file in a list costs nothing
and is named in the error. The full bytes are read only when the image is submitted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.exceptions import Doc2XInputError

_HEAD_BYTES = 16


@dataclass(frozen=True)
class ImageSource:
    """One image to parse; ``uri`` is how it is named in logs, errors, XCom and lineage."""

    uri: str
    path: Any  # ObjectStoragePath (file:// for a local path)

    @classmethod
    def of(cls, value: str | Path | Any) -> ImageSource:
        """A local path or a URI; every read goes through ObjectStoragePath, which feeds hook lineage."""
        from airflow.providers.common.compat.sdk import ObjectStoragePath

        if isinstance(value, ObjectStoragePath):
            return cls(str(value), value)
        text = str(value)
        uri = text if "://" in text else f"file://{os.path.abspath(text)}"
        return cls(text, ObjectStoragePath(uri))

    def check(self) -> None:
        """Raise :class:`Doc2XInputError` if Doc2X would refuse this image; reads only its first bytes."""
        self._check_file()
        with self.path.open("rb") as handle:
            head = handle.read(_HEAD_BYTES)
        protocol.check_image(head, source=self.uri)

    def read(self) -> bytes:
        self._check_file()  # before reading: never load a 2 GB file to find out it is too large
        with self.path.open("rb") as handle:  # open + read: the call Airflow's hook lineage sees
            data = handle.read()
        protocol.check_image(data, source=self.uri)
        return data

    def _check_file(self) -> None:
        """It exists, is a file, and its size is one Doc2X takes (from its metadata alone)."""
        try:
            is_file = self.path.is_file()
        except OSError as error:
            raise Doc2XInputError(f"Image {self.uri} cannot be read: {error}", source=self.uri) from error
        if not is_file:
            raise Doc2XInputError(
                f"Image {self.uri} does not exist or is not a file: give a path or URI of a JPEG/PNG file",
                source=self.uri,
            )
        protocol.check_image_size(self.path.stat().st_size, source=self.uri)


def resolve_images(value: str | Path | Sequence[str | Path]) -> list[ImageSource]:
    """The operator's ``image_path`` (one path/URI or a list of them) as sources, in order."""
    values = [value] if isinstance(value, (str, Path)) else list(value or [])
    if not values:
        raise Doc2XInputError("No image given: image_path is empty")
    return [ImageSource.of(item) for item in values]


def check_all(sources: Sequence[ImageSource]) -> None:
    """Check every image; report all the bad ones at once, before anything is sent."""
    problems = []
    for source in sources:
        try:
            source.check()
        except Doc2XInputError as error:
            problems.append(error.message)
    if problems:
        raise Doc2XInputError(
            f"{len(problems)} of {len(sources)} images cannot be sent to Doc2X; nothing was submitted:\n- "
            + "\n- ".join(problems)
        )


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
