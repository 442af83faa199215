"""One input of `interactive index`, and where its bytes are.

An input is a local image file (read at its path, as before), a remote object (a URL) or a
member of a tar shard (a byte range of a local or remote tar). Listing (runtime/index_sources.py,
runtime/tar_inputs.py) makes `Input`s; the job keys them by `key` (runtime/index.py); a worker
process reads a `Where` directly (`read_where`: one ranged read, never the whole tar).
"""

from __future__ import annotations

import tarfile
from typing import Any, NamedTuple

from .remote import FetchError, is_url, read_range

BLOCK = tarfile.BLOCKSIZE  # 512: a tar header block
MAX_MEMBER_BYTES = 1 << 30  # a tar member read whole into memory: larger ones are error rows
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".avif", ".heic", ".heif"}
)


class Where(NamedTuple):
    """Where an input's bytes are when they are not the local file its `path` names.

    `url`: a local path or a URL; `offset`, `size`: the byte range (size -1: the whole object);
    `header`: for a tar member, the checksum of its header block (the BLOCK bytes before
    `offset`), checked on every read so that a tar rewritten since it was listed is an error row,
    never another member's pixels.
    """

    url: str
    offset: int = 0
    size: int = -1
    header: int | None = None


class Input(NamedTuple):
    """One entry to index.

    `path`: the `path` column (a file path, a URL, or `TAR/MEMBER` for a tar member);
    `key`: what the id is the hash of (runtime/index.py `key_id`); `where`: None to read the
    local file `path`; `error`: the row's status, known while listing (a bad tar, a bad
    metadata member): the input is not read; `extras`: the carried column values.
    """

    path: str
    key: str
    where: Where | None = None
    error: str | None = None
    extras: tuple[Any, ...] = ()


def _read(url: str, start: int, size: int) -> bytes:
    if is_url(url):
        return read_range(url, start, size)
    with open(url, "rb") as f:
        f.seek(start)
        return f.read() if size < 0 else f.read(size)


def read_where(where: Where) -> bytes:
    """The input's bytes; OSError (FetchError for a URL) with a reason when they cannot be read.

    A tar member is read with its header block in the same read, and refused when that header is
    not the one listed (the tar changed) or the data is cut short (a truncated tar)."""
    if where.header is None:
        return _read(where.url, where.offset, where.size)
    if where.size > MAX_MEMBER_BYTES:  # a header can claim any size: never read that much
        raise OSError(f"a tar member of {where.size} bytes, more than {MAX_MEMBER_BYTES}: not read")
    data = _read(where.url, where.offset - BLOCK, BLOCK + where.size)
    header, body = data[:BLOCK], data[BLOCK : BLOCK + where.size]
    if len(header) < BLOCK or _checksum_field(header) != where.header:
        raise OSError(f"{where.url} changed since it was listed (no member header at its offset)")
    if len(body) < where.size:
        raise OSError(f"truncated tar: member has {len(body)} of its {where.size} bytes")
    return body


def _checksum_field(header: bytes) -> int | None:
    try:
        return int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return None


__all__ = ["BLOCK", "IMAGE_SUFFIXES", "FetchError", "Input", "Where", "read_where"]
