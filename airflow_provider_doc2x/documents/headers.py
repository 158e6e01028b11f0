"""What a raster file's header says, read with ``struct`` alone: pixel sizes, TIFF pages, wholeness.

Pillow reads these headers too, but its own decompression-bomb check (``PIL.Image.MAX_IMAGE_PIXELS``,
one setting for the whole process) runs as it opens a file, and a TIFF's pages are only known to it
by walking the whole chain. Reading the few fields here first lets the limits of the Doc2X
connection decide, with their own words, before Pillow opens anything or a pixel is decoded:

- the pixel size of a JPEG, PNG, WebP, GIF or BMP (its first frame) and of every page of a TIFF;
- a TIFF's pages, counted up to a cap (a file of 100,000 pages is refused after the cap, in time and
  memory bounded by the cap), a chain of pages that loops back on itself, pixel data (strips or
  tiles) that the file ends before (a cut TIFF is refused from its directories, without decoding),
  and pages that share their pixel data (their strips claim more bytes than the file has: a
  small file that would decode the same bytes again and again);
- whether a JPEG, a PNG or a WebP is whole (its end marker, ``IEND`` chunk or RIFF length): those
  three may be sent to Doc2X as they are, so a truncated one must be caught without decoding it.

Every read is bounded by the file's size: a length or offset pointing past the end is an error,
never a seek into nothing. The functions take an open binary file and its size, and raise
:class:`HeaderError` with a reason in words about the file.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

#: Entries in one TIFF directory (IFD) past which the directory is refused: libtiff's own sanity
#: check (``TIFFFetchDirectory``: "Sanity check on directory count failed"). Real files hold a few
#: dozen; the cap bounds the bytes read per page.
MAX_IFD_ENTRIES = 4096

_JPEG_SIZE_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: JPEG markers that stand alone, without a length: TEM and the restart markers.
_JPEG_BARE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_END = b"\xff\xd9"
_SEARCH_CHUNK = 1024 * 1024
#: Largest PNG chunk length (the PNG specification's limit, 2**31 - 1).
_PNG_MAX_CHUNK = 2**31 - 1
#: TIFF field types that may hold an image's width or height: SHORT, LONG and BigTIFF's LONG8.
_TIFF_SIZE_TYPES = {3: "H", 4: "I", 16: "Q"}


class HeaderError(ValueError):
    """A header that cannot be read; ``truncated`` when the file ends before its header says it does."""

    def __init__(self, reason: str, *, truncated: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.truncated = truncated


@dataclass(frozen=True)
class TiffPages:
    """A TIFF's pages as its directories say: each page's ``(width, height)``, in order.

    ``more`` is True when the walk stopped at its cap with pages left: the file has more than
    ``len(sizes)`` pages, and how many more was not read.
    """

    sizes: tuple[tuple[int, int], ...]
    more: bool


def read_exactly(handle: BinaryIO, offset: int, count: int, file_size: int, what: str) -> bytes:
    """``count`` bytes at ``offset``, or a :class:`HeaderError` (truncated) naming ``what`` ends early."""
    if offset < 0 or offset + count > file_size:
        raise HeaderError(f"the file ends before {what}", truncated=True)
    handle.seek(offset)
    data = handle.read(count)
    if len(data) != count:
        raise HeaderError(f"the file ends before {what}", truncated=True)
    return data


def tiff_pages(handle: BinaryIO, file_size: int, *, max_pages: int) -> TiffPages:
    """Walk a TIFF's chain of directories: each page's size, at most ``max_pages + 1`` pages read.

    Reading ``max_pages + 1`` directories is enough to know there are too many, so the walk's time
    and memory are bounded by the cap, not by the file. A directory reached twice means the chain
    loops: it is refused, as libtiff refuses it, rather than cut where the loop closes.
    """
    header = read_exactly(handle, 0, 8, file_size, "its TIFF header")
    order = "<" if header[:2] == b"II" else ">"
    big = struct.unpack(f"{order}H", header[2:4])[0] == 43
    if big:
        offset = struct.unpack(f"{order}Q", read_exactly(handle, 8, 8, file_size, "its TIFF header"))[0]
        count_format, entry_size, next_format = "Q", 20, "Q"
    else:
        offset = struct.unpack(f"{order}I", header[4:8])[0]
        count_format, entry_size, next_format = "H", 12, "I"
    count_size, next_size = struct.calcsize(count_format), struct.calcsize(next_format)
    first_page_at: dict[int, int] = {}
    page_of_data: dict[bytes, int] = {}
    claimed = 0  # bytes of pixel data the pages claim: a file whose pages share data claims more than it has
    sizes: list[tuple[int, int]] = []
    while offset and len(sizes) <= max_pages:
        page = len(sizes) + 1
        if offset in first_page_at:
            raise HeaderError(
                f"its chain of pages loops: page {page - 1} points back to page {first_page_at[offset]}"
            )
        first_page_at[offset] = page
        where = f"the directory of page {page}"
        (entries,) = struct.unpack(
            f"{order}{count_format}", read_exactly(handle, offset, count_size, file_size, where)
        )
        if not 0 < entries <= MAX_IFD_ENTRIES:
            raise HeaderError(
                f"the directory of page {page} claims {entries} entries "
                f"(a TIFF reader takes 1 to {MAX_IFD_ENTRIES})"
            )
        block = read_exactly(handle, offset + count_size, entries * entry_size + next_size, file_size, where)
        sizes.append(_tiff_page_size(block, entries, entry_size, order, page))
        data = _tiff_data_at(block, entries, entry_size, order)
        if data is not None and data in page_of_data:
            raise HeaderError(
                f"its pages {page_of_data[data]} and {page} share their pixel data: a file made to cost "
                "far more to decode than its size"
            )
        if data is not None:
            page_of_data[data] = page
        claimed += _check_tiff_data_within(handle, block, entries, entry_size, order, file_size, page)
        if claimed > file_size:
            raise HeaderError(
                f"its pages share their pixel data: their strips claim {claimed:,} bytes by page {page}, "
                f"more than the file's {file_size:,}; a file made to cost far more to decode than its size"
            )
        (offset,) = struct.unpack(f"{order}{next_format}", block[-next_size:])
    if not sizes:
        raise HeaderError("its header points to no page (its first directory's offset is 0)")
    return TiffPages(tuple(sizes), more=bool(offset))


def _tiff_data_at(block: bytes, entries: int, entry_size: int, order: str) -> bytes | None:
    """Where a page's pixel data is: the raw value of its StripOffsets (273) or TileOffsets (324).

    One strip's offset, or the offset of the list of its strips: either way unique to a page in a
    file made by a scanner or a library. Pages that share it decode the same bytes again and again,
    so a small file could cost hours of decoding; they are refused.
    """
    value_at = 8 if entry_size == 12 else 12
    for start in range(0, entries * entry_size, entry_size):
        (tag,) = struct.unpack_from(f"{order}H", block, start)
        if tag in (273, 324):
            return block[start : start + 2] + block[start + value_at : start + entry_size]
    return None


#: A TIFF field type's ``struct`` code, for the types an offset or a byte count may have.
_TIFF_NUMBER_TYPES = {3: "H", 4: "I", 16: "Q"}
#: (offsets, byte counts) tags of a page's pixel data: strips, then tiles.
_TIFF_DATA_TAGS = ((273, 279), (324, 325))
#: Strips or tiles past which a page is refused: a scanner's page has tens to thousands (a strip
#: per row of an A4 page at 600 dpi is 7,000; tiles of 16 px of a page at the pixel limit 350,000).
MAX_TIFF_PARTS = 1_000_000


def _check_tiff_data_within(
    handle: BinaryIO, block: bytes, entries: int, entry_size: int, order: str, file_size: int, page: int
) -> int:
    """Refuse a page whose strips or tiles end past the file's end; answer the bytes they claim.

    Each strip's (or tile's) offset plus its byte count must be within the file: a cut TIFF is
    refused here, at the check, rather than when its pages are decoded. Without byte counts
    (allowed for uncompressed data) each offset must at least be inside the file. The lists are
    read from the directory (inline, or at the offset it gives, within the file) and walked, not
    kept. The bytes claimed let :func:`tiff_pages` refuse pages that share their data.
    """
    fields = _tiff_fields(block, entries, entry_size, order)
    for offsets_tag, counts_tag in _TIFF_DATA_TAGS:
        if offsets_tag not in fields:
            continue
        offsets = _tiff_values(handle, fields[offsets_tag], entry_size, order, file_size, page)
        if counts_tag not in fields:
            for index, (offset,) in enumerate(offsets):
                if offset >= file_size:
                    raise HeaderError(
                        f"the file ends before the pixel data of page {page}: its part {index + 1} starts "
                        f"at byte {offset:,}, the file has {file_size:,}",
                        truncated=True,
                    )
            return 0
        counts = _tiff_values(handle, fields[counts_tag], entry_size, order, file_size, page)
        claimed = 0
        try:
            for index, ((offset,), (count,)) in enumerate(zip(offsets, counts, strict=True)):
                if offset + count > file_size:
                    raise HeaderError(
                        f"the file ends before the pixel data of page {page}: its part {index + 1} runs "
                        f"to byte {offset + count:,}, the file has {file_size:,}",
                        truncated=True,
                    )
                claimed += count
        except ValueError as error:
            if isinstance(error, HeaderError):
                raise
            raise HeaderError(
                f"page {page} gives more offsets than byte counts of its pixel data, or fewer"
            ) from None
        return claimed
    return 0


def _tiff_fields(block: bytes, entries: int, entry_size: int, order: str) -> dict[int, bytes]:
    """The raw entries of the tags that place a page's pixel data, by tag."""
    wanted = {tag for pair in _TIFF_DATA_TAGS for tag in pair}
    found: dict[int, bytes] = {}
    for start in range(0, entries * entry_size, entry_size):
        (tag,) = struct.unpack_from(f"{order}H", block, start)
        if tag in wanted:
            found.setdefault(tag, block[start : start + entry_size])  # the first, as libtiff and Pillow read
    return found


def _tiff_values(
    handle: BinaryIO, entry: bytes, entry_size: int, order: str, file_size: int, page: int
) -> Iterator[tuple[int]]:
    """An entry's numbers (SHORT, LONG or LONG8), inline or read where it points (within the file), one by one."""
    big = entry_size == 20
    kind, count = struct.unpack_from(f"{order}H{'Q' if big else 'I'}", entry, 2)
    code = _TIFF_NUMBER_TYPES.get(kind)
    if code is None:
        raise HeaderError(f"page {page} places its pixel data with a field of type {kind}, not a number")
    if count > MAX_TIFF_PARTS:
        raise HeaderError(
            f"page {page} claims {count:,} strips or tiles (a reader takes up to {MAX_TIFF_PARTS:,})"
        )
    size = struct.calcsize(code)
    value_at, value_size = (12, 8) if big else (8, 4)
    if count * size <= value_size:
        data = entry[value_at : value_at + count * size]
    else:
        (offset,) = struct.unpack_from(f"{order}{'Q' if big else 'I'}", entry, value_at)
        data = read_exactly(handle, offset, count * size, file_size, f"the list of page {page}'s pixel data")
    return struct.iter_unpack(f"{order}{code}", data)


def _tiff_page_size(block: bytes, entries: int, entry_size: int, order: str, page: int) -> tuple[int, int]:
    """ImageWidth (256) and ImageLength (257) of one directory, read from its entries."""
    found: dict[int, int] = {}
    value_at = 8 if entry_size == 12 else 12
    for start in range(0, entries * entry_size, entry_size):
        tag, kind = struct.unpack_from(f"{order}HH", block, start)
        if tag in (256, 257) and kind in _TIFF_SIZE_TYPES:
            found[tag] = struct.unpack_from(f"{order}{_TIFF_SIZE_TYPES[kind]}", block, start + value_at)[0]
            if len(found) == 2:
                break
    width, height = found.get(256, 0), found.get(257, 0)
    if not (width and height):
        raise HeaderError(f"page {page} gives no pixel size (ImageWidth and ImageLength)")
    return width, height


def raster_size(handle: BinaryIO, fmt: str, file_size: int) -> tuple[int, int] | None:
    """The pixel size of a raster's first frame by its header; None for a format read only by a library.

    A JPEG, PNG or WebP is also checked whole here (see the module's doc). ``fmt`` is a format name
    of :mod:`~airflow_provider_doc2x.documents.formats`; a TIFF's first page is read as
    :func:`tiff_pages` reads it; HEIF's header is left to pillow-heif.
    """
    reader = _SIZE_READERS.get(fmt)
    if reader is not None:
        return reader(handle, file_size)
    if fmt == "tiff":
        return tiff_pages(handle, file_size, max_pages=0).sizes[0]
    return None


def _png_size(handle: BinaryIO, file_size: int) -> tuple[int, int]:
    head = read_exactly(handle, 0, 24, file_size, "its PNG header (IHDR)")
    if head[12:16] != b"IHDR":
        raise HeaderError("its first chunk is not the PNG header (IHDR)")
    width, height = struct.unpack(">II", head[16:24])
    position = 8
    while True:
        length, kind = struct.unpack(">I4s", read_exactly(handle, position, 8, file_size, "its IEND chunk"))
        name = kind.decode("latin-1")
        if length > _PNG_MAX_CHUNK:
            raise HeaderError(
                f"its chunk {name} at byte {position} claims {length} bytes, more than PNG allows"
            )
        if position + 12 + length > file_size:
            raise HeaderError(
                f"the file ends inside its chunk {name} at byte {position}, before its IEND chunk",
                truncated=True,
            )
        position += 12 + length
        if kind == b"IEND":
            return width, height


def _jpeg_size(handle: BinaryIO, file_size: int) -> tuple[int, int]:
    """The size in the frame header (SOF), then an end-of-image marker after the image data."""
    position, size = 2, None
    while True:
        prefix, marker = read_exactly(handle, position, 2, file_size, "its image data (SOS)")
        if prefix != 0xFF:
            raise HeaderError(f"its markers are corrupt at byte {position}")
        if marker == 0xFF:  # a fill byte before a marker
            position += 1
            continue
        if marker in _JPEG_BARE_MARKERS:
            position += 2
            continue
        if marker == 0xD9:
            raise HeaderError("it ends (EOI) before any image data")
        (length,) = struct.unpack(">H", read_exactly(handle, position + 2, 2, file_size, "a marker's length"))
        if length < 2:
            raise HeaderError(f"a marker at byte {position} claims a length of {length}")
        if marker in _JPEG_SIZE_MARKERS:
            height, width = struct.unpack(">xHH", read_exactly(handle, position + 4, 5, file_size, "its SOF"))
            size = (width, height)
        if marker == 0xDA:
            break
        position += 2 + length
    if size is None or not (size[0] and size[1]):
        raise HeaderError("its frame header (SOF) gives no pixel size")
    if not _ends_with_jpeg_end(handle, position, file_size):
        raise HeaderError("its image data has no end (EOI marker)", truncated=True)
    return size


def _ends_with_jpeg_end(handle: BinaryIO, scan_start: int, file_size: int) -> bool:
    """Whether an end-of-image marker follows the first scan: at the file's end, or further in.

    Image data cannot hold ``FF D9`` (a data byte ``FF`` is followed by ``00``), so the first one
    after the scan starts ends the image; bytes may follow it (a camera's trailer). Read in chunks.
    """
    if read_exactly(handle, file_size - 2, 2, file_size, "its end") == _JPEG_END:
        return True
    handle.seek(scan_start)
    carry = b""
    while chunk := handle.read(_SEARCH_CHUNK):
        if _JPEG_END in carry + chunk:
            return True
        carry = chunk[-1:]
    return False


def _webp_size(handle: BinaryIO, file_size: int) -> tuple[int, int]:
    head = read_exactly(handle, 0, 30, file_size, "its WebP header")
    riff_size = struct.unpack("<I", head[4:8])[0] + 8
    if riff_size > file_size:
        raise HeaderError(f"its header says {riff_size} bytes, the file has {file_size}", truncated=True)
    kind = head[12:16]
    if kind == b"VP8X":
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if kind == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    raise HeaderError(f"its first chunk {kind!r} is not a WebP image header")


def _gif_size(handle: BinaryIO, file_size: int) -> tuple[int, int]:
    width, height = struct.unpack("<HH", read_exactly(handle, 6, 4, file_size, "its GIF header"))
    return width, height


def _bmp_size(handle: BinaryIO, file_size: int) -> tuple[int, int]:
    head = read_exactly(handle, 0, 26, file_size, "its BMP header")
    if struct.unpack("<I", head[14:18])[0] == 12:
        width, height = struct.unpack("<HH", head[18:22])
        return width, height
    width, height = struct.unpack("<II", head[18:26])
    # A negative height (top-down rows) is read as Pillow reads it.
    return width, 2**32 - height if head[25] == 0xFF else height


_SIZE_READERS = {
    "png": _png_size,
    "jpeg": _jpeg_size,
    "webp": _webp_size,
    "gif": _gif_size,
    "bmp": _bmp_size,
}
