"""A file's format from its first bytes, never from its name, and words for errors about it.

Doc2X takes JPEG and PNG images and PDF documents; the provider also reads TIFF, WebP, BMP, GIF and
HEIF files and converts them first. A name can lie (``scan.pdf`` that is an HTML error page saved
by a browser), so the format is told by magic bytes alone. This module has no imports from the
package and none of Pillow, img2pdf or pypdf: a DAG file may import it at every parse.
"""

from __future__ import annotations

#: Bytes read to sniff a file: a PDF's ``%PDF-`` header may start anywhere in its first 1024 bytes
#: (Adobe's PDF reference, implementation note 13: readers accept junk before it).
HEAD_BYTES = 1024

JPEG, PNG, PDF, TIFF, WEBP, BMP, GIF, HEIF = "jpeg", "png", "pdf", "tiff", "webp", "bmp", "gif", "heif"
#: Every format :func:`sniff` can answer.
FORMATS = (JPEG, PNG, PDF, TIFF, WEBP, BMP, GIF, HEIF)
#: Formats read as raster images (pixels), every one but PDF.
RASTER_FORMATS = frozenset(FORMATS) - {PDF}

_DESCRIPTIONS = {
    JPEG: "a JPEG image",
    PNG: "a PNG image",
    PDF: "a PDF document",
    TIFF: "a TIFF image",
    WEBP: "a WebP image",
    BMP: "a BMP image",
    GIF: "a GIF image",
    HEIF: "a HEIF/HEIC image",
}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
#: BigTIFF: the classic magic with 43 for 42, then the offset size (8) and a zero.
_BIGTIFF_MAGIC = (b"II+\x00\x08\x00\x00\x00", b"MM\x00+\x00\x08\x00\x00")
#: The sizes of the BMP info headers Pillow reads (the core header, Windows' v1 to v5, OS/2 2.x).
_BMP_INFO_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})
#: ISO media ``ftyp`` brands of HEIF images and image sequences (HEVC-coded, or generic ``mif1``).
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
#: AVIF's brands: HEIF's container with AV1 inside, which pillow-heif no longer reads.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})

#: What other files look like, by their first bytes: for errors only, never to accept a file.
_OTHER_MAGIC = (
    (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
    (b"PK\x05\x06", "an empty ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an older Office document (.doc, .xls or .ppt)"),
    (b"{\\rtf", "an RTF document"),
    (b"%!PS", "a PostScript document"),
    (b"AT&TFORM", "a DjVu document"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (b"\xffO\xffQ", "a JPEG 2000 image"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "a JPEG XL image"),
    (b"\xff\n", "a JPEG XL image"),
    (b"\x97JB2\r\n\x1a\n", "a JBIG2 image"),
    (b"8BPS", "a Photoshop document"),
    (b"\x00\x00\x01\x00", "an icon (ICO)"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\x7fELF", "an executable program"),
)


def sniff(head: bytes) -> str | None:
    """The format of a file from its first bytes (:data:`HEAD_BYTES` of them), or None if unknown.

    Magic bytes only. A raster's magic must open the file; a PDF's ``%PDF-`` may follow junk within
    the first :data:`HEAD_BYTES`, as PDF readers allow, so it is looked for last: a PNG that mentions
    ``%PDF-`` in a text chunk stays a PNG.
    """
    head = head[:HEAD_BYTES]
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(_PNG_MAGIC):
        return PNG
    if head[:4] in _TIFF_MAGIC or head[:8] in _BIGTIFF_MAGIC:
        return TIFF
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return GIF
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_INFO_SIZES:
        return BMP
    brands = _ftyp_brands(head)
    if brands and not _AVIF_BRANDS & set(brands) and _HEIF_BRANDS & set(brands):
        return HEIF
    if b"%PDF-" in head:
        return PDF
    return None


def _ftyp_brands(head: bytes) -> tuple[bytes, ...]:
    """The brands of an ISO media file's leading ``ftyp`` box (major brand first), or none.

    HEIF, AVIF, MP4 and QuickTime files all open with this box; its brands say which one it is.
    """
    if len(head) < 16 or head[4:8] != b"ftyp":
        return ()
    box_end = min(int.from_bytes(head[:4], "big"), len(head))
    compatible = [head[start : start + 4] for start in range(16, box_end - 3, 4)]
    return (head[8:12], *compatible)


def describe(fmt: str | None) -> str:
    """A format in words, with its article, for error texts: ``"a PDF document"``, ``"a WebP image"``."""
    if fmt is None:
        return "a file of an unknown format"
    return _DESCRIPTIONS.get(fmt, f"a {fmt} file")


def describe_content(head: bytes) -> str:
    """What a file seems to be, from its first bytes: ``"an HTML page"``, ``"a ZIP archive ..."``.

    For the error that refuses a file, so that it names what the file is (a login page saved
    in place of a scan, a zipped folder); never the bytes themselves, which may hold anything.
    """
    if not head:
        return "an empty file"
    fmt = sniff(head)
    if fmt is not None:
        return describe(fmt)
    brands = _ftyp_brands(head)
    if brands:
        return "an AVIF image" if _AVIF_BRANDS & set(brands) else "an ISO media file (MP4, QuickTime, ...)"
    for magic, kind in _OTHER_MAGIC:
        if head.startswith(magic):
            return kind
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "text (UTF-16)"
    text = _text(head.removeprefix(b"\xef\xbb\xbf"))
    if text is None:
        return "an unknown binary format"
    return _describe_text(text)


def _text(head: bytes) -> str | None:
    """The head as UTF-8 text (a character cut by the end of the head is dropped), or None."""
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3 or error.reason != "unexpected end of data":
            return None
        return head[: error.start].decode("utf-8")


def _describe_text(text: str) -> str:
    start = text.lstrip().lower()
    if start.startswith(("<!doctype html", "<html", "<head", "<body")):
        return "an HTML page"
    if start.startswith("<svg") or (start.startswith("<?xml") and "<svg" in start):
        return "an SVG image"
    if start.startswith("<?xml"):
        return "an XML document"
    if start.startswith(("{", "[")):
        return "JSON text"
    if all(character.isprintable() or character.isspace() for character in text):
        return "text"
    return "an unknown format"
