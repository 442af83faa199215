"""File names as the OS gives them, and as text: every name must survive output and messages.

POSIX file names are bytes. Python hands a name that is not valid UTF-8 to us as a `str` with
each undecodable byte as a lone surrogate (U+DC80..U+DCFF, PEP 383 "surrogateescape"), and such a
string cannot be encoded as UTF-8: Parquet string columns, JSON, logs and a strict stdout all
refuse it. Here the one spelling for people and text columns (`display_name`: each undecodable
byte shown as `\\xNN`) and the exact bytes for getting back to the file (`name_bytes`).
No imports beyond the standard library (the CLI uses it before numpy is loaded).
"""

from __future__ import annotations

import codecs
import os


def is_utf8(name: str) -> bool:
    """Whether `name` encodes as UTF-8 as it is (no surrogates from undecodable bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display_name(name: str | os.PathLike[str] | bytes) -> str:
    """`name` as valid UTF-8 text: unchanged when it is valid, else each byte that is not valid
    UTF-8 is written `\\xNN` (b"caf\\xff.jpg" -> "caf\\\\xff.jpg", i.e. the text caf\\xff.jpg).

    Works on any string, messages included (a lone surrogate that is not an escaped byte is
    written `\\udNNN`), so that whatever embeds a file name can be printed and stored.
    """
    if isinstance(name, bytes):
        return name.decode("utf-8", "backslashreplace")
    text = os.fspath(name)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    if is_utf8(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that do not stand for bytes
        return text.encode("utf-8", "backslashreplace").decode("ascii")
    return raw.decode("utf-8", "backslashreplace")


def name_bytes(name: str | os.PathLike[str]) -> bytes | None:
    """The exact bytes of a file name that is not valid UTF-8 (`os.fsencode`), else None: the
    `path_bytes` column, from which `os.fsdecode(path_bytes)` opens the very file."""
    text = os.fspath(name)
    if isinstance(text, bytes):
        return None if _valid_utf8_bytes(text) else text
    return None if is_utf8(text) else os.fsencode(text)


def _valid_utf8_bytes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


ESCAPE_ERRORS = "interactive.escape"


def _escape(err: UnicodeError) -> tuple[str, int]:
    """Codec error handler: a surrogate standing for an undecodable byte is written `\\xNN`
    (the byte, as `display_name` does), anything else unencodable as `backslashreplace` would."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    out = []
    for char in err.object[err.start : err.end]:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out), err.end


codecs.register_error(ESCAPE_ERRORS, _escape)
