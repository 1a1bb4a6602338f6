"""Text encodings of data files: telling them apart, naming them to a user, decoding them as the readers do.

UTF-8 is the default. GBK/GB18030 (Chinese text saved by Windows tools) and UTF-16/32 are
detected; any other codec is read when named (``--encoding cp1252``). Nothing here reports
problems: the readers in :mod:`fewtune.data.formats` turn what these find into located errors.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import re
from pathlib import Path
from typing import Iterator

LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what editors count as a line; str.splitlines also splits on U+2028 etc.
LINE_BREAK_BYTES = re.compile(rb"\r\n|\r|\n")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_encoding: contextvars.ContextVar[str] = contextvars.ContextVar("fewtune_data_encoding", default="utf-8")

ENCODING_NAMES = {  # where files in an encoding come from, to go with its name in messages
    "gb18030": "Chinese text as Windows tools and Excel save it, code page 936",
    "utf-16": "what Windows calls \"Unicode\", e.g. Excel's \"Unicode Text\"",
    "utf-16-le": "what Windows calls \"Unicode\", here without a byte-order mark",
    "utf-16-be": "without a byte-order mark",
    "utf-32": "four bytes per character",
}


def check_encoding(encoding: str) -> str:
    """``auto``, or the canonical name of a Python codec (``gbk`` -> ``gbk``); ValueError for an unknown one."""
    if encoding.lower() == "auto":
        return "auto"
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}: use utf-8 (the default), auto (detect), or a Python codec "
                         "name such as gb18030, gbk, utf-16, cp1252") from None


@contextlib.contextmanager
def reading_encoding(encoding: str | None) -> Iterator[None]:
    """Inside the block, :func:`read_records` calls that name no ``encoding`` use this one.

    The collecting reader (:func:`fewtune.data.collect.collect`) calls ``read_records``
    without an encoding; ``data check``/``clean``/``split``/... set it around that call.
    """
    if not encoding:
        yield
        return
    token = _encoding.set(check_encoding(encoding))
    try:
        yield
    finally:
        _encoding.reset(token)


def _decodes(raw: bytes, codec: str) -> bool:
    try:
        raw.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return False
    return True


def detect_encoding(raw: bytes) -> str | None:
    """The encoding of a file's bytes when it can be told, else None.

    ``utf-8``; ``utf-16``/``utf-32`` with a byte-order mark, ``utf-16-le``/``-be`` without one
    (text that is mostly ASCII has a NUL byte in every other place); ``gb18030`` when the bytes
    decode strictly as GB18030 (a superset of GBK) and the result is plausibly Chinese: the
    non-ASCII characters are nearly all in GB2312, the common simplified set, with at least
    one ideograph. (Latin-1 text also decodes as GB18030 now and then, but into rare
    characters outside GB2312.)
    """
    if raw.startswith(codecs.BOM_UTF8):
        return "utf-8" if _decodes(raw, "utf-8-sig") else None
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)) and _decodes(raw, "utf-32"):
        return "utf-32"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16" if _decodes(raw, "utf-16") else None
    if _decodes(raw, "utf-8"):
        return "utf-8"
    head = raw[: 1 << 20]
    if len(head) >= 4 and b"\x00" in head:
        even, odd = head[0::2].count(0), head[1::2].count(0)
        half = len(head) / 2
        for nuls, other, codec in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
            if nuls > 0.3 * half and other < 0.05 * half and _decodes(raw[: len(raw) // 2 * 2], codec):
                return codec
    try:
        text = raw.decode("gb18030")
    except UnicodeDecodeError:
        return None
    sample = _NON_ASCII.findall(text[: 1 << 20])
    common = sum(_decodes_to(ch, "gb2312") for ch in sample)
    if sample and common >= 0.9 * len(sample) and _HAN.search("".join(sample)):
        return "gb18030"
    return None


def _decodes_to(ch: str, codec: str) -> bool:
    try:
        ch.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def encoding_name(codec: str, raw: bytes = b"") -> str:
    """How to name a detected encoding to a user (GBK when the bytes are GBK, GB18030 otherwise)."""
    if codec == "gb18030":
        return "GBK" if raw and _decodes(raw, "gbk") else "GB18030"
    return codec.upper().replace("-LE", " little-endian").replace("-BE", " big-endian")


def file_encoding(path: str | Path) -> str | None:
    """:func:`detect_encoding` of a file (None when it cannot be read or told)."""
    try:
        return detect_encoding(Path(path).read_bytes())
    except (OSError, MemoryError):
        return None


def ascii_compatible(codec: str) -> bool:
    try:
        return "\n{}[],\"a".encode(codec) == b"\n{}[],\"a"
    except (UnicodeEncodeError, LookupError):
        return False


def read_hint(codec: str) -> str:
    if codec == "utf-8":
        return "leave out --encoding (UTF-8 is the default)"
    return (f"read it with `--encoding {codec}` (or `--encoding auto`), or convert it to UTF-8: "
            f"iconv -f {codec.upper()} -t UTF-8 FILE > FILE.utf8")


def chosen_encoding(encoding: str | None) -> str:
    """The encoding a reader call means: the one it names (checked), else the one :func:`reading_encoding` set."""
    return check_encoding(encoding) if encoding else _encoding.get()


def reading_codec(raw: bytes, encoding: str | None) -> str:
    """The codec the readers decode ``raw`` with for ``encoding`` (UTF-8 as ``utf-8-sig``: a BOM is skipped)."""
    encoding = chosen_encoding(encoding)
    codec = (detect_encoding(raw) or "utf-8") if encoding == "auto" else encoding
    return "utf-8-sig" if codec in ("utf-8", "utf-8-sig") else codec


def split_lines(text: str) -> list[str]:
    """The lines of a text as the readers number them: \\n, \\r\\n and a lone \\r end a line, nothing else."""
    return LINE_BREAK.split(text)


def utf8_read_as_other(raw: bytes, codec: str) -> bool:
    """Whether valid UTF-8 would be garbled, without a trace, by reading it as ``codec``: never done.

    For codecs that keep ASCII as it is (GB18030, cp1252), that is a file with non-ASCII bytes;
    for UTF-16/32, any UTF-8 file without NUL bytes (their ASCII characters all hold one)."""
    if not _decodes(raw, "utf-8"):
        return False
    if ascii_compatible(codec):
        return NON_ASCII_BYTES.search(raw) is not None
    return b"\x00" not in raw


def without_bom(text: str, codec: str) -> str:
    """The decoded text less a byte-order mark the codec keeps (utf-8-sig, utf-16 and utf-32 drop theirs)."""
    keeps = codec.endswith(("-le", "-be"))
    return text[1:] if keeps and text.startswith("\ufeff") else text


NON_ASCII_BYTES = re.compile(rb"[\x80-\xff]")
