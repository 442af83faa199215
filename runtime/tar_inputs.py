"""WebDataset tar shards as inputs of `interactive index`: one input per image member.

A sample is WebDataset's: consecutive members sharing a key, the member path up to the first dot
of its basename (`dir/abc.seg.png` -> key `dir/abc`, extension `seg.png`). Every regular member
whose last suffix is an image suffix (index_sources.IMAGE_SUFFIXES) is an input, with `path`
`TAR/MEMBER` (the tar as SOURCE or the list spells it, `/`, the member name) and the sample's
`json` (its text, checked to be JSON), `cls` (int64) and `txt` (text) members as extra columns
(null when the sample has none).

Listing reads the headers (seeking past the data) and the small metadata members; a worker reads
an image member by byte range (inputs.read_where). The id of a member is the hash of the tar's
identity (its absolute path or URL), the member name, its data offset and size, and its header's
checksum (which covers its mtime and mode): a rerun on the same tar resumes; a member added,
removed or rewritten is a new input, and so is every member after a change that moved it.

A tar that cannot be listed (not a tar, compressed, cut inside a header) is one error row; so is
a metadata member that is not what its extension says (the rows of that sample's images).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import pyarrow as pa

from .inputs import BLOCK, IMAGE_SUFFIXES, Input, Where
from .paths import display_name
from .remote import FetchError, is_url, open_url

# Compressed ones are recognised only to be refused with a reason (check_tar).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
# The sample fields carried into the rows, as WebDataset names them, and their column types.
FIELDS = (pa.field("json", pa.string()), pa.field("cls", pa.int64()), pa.field("txt", pa.string()))
FIELD_NAMES = frozenset(f.name for f in FIELDS)
FIELD_BYTES = 16 * 2**20  # a metadata member larger than this is an error, not read
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def is_tar(name: str) -> bool:
    """Whether `name` names a tar by its suffix (a URL's query, e.g. a presigned one, aside)."""
    path = name.split("?", 1)[0] if is_url(name) else name
    return path.lower().endswith(TAR_SUFFIXES)


def split_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name, as WebDataset splits it: at the first dot of
    the basename (`a/b.c.jpg` -> (`a/b`, `c.jpg`)); a name without a dot has extension ''."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension if dot else ""


def _open(tar: str) -> BinaryIO:
    if is_url(tar):
        return open_url(tar, "rb", block_size=2**20)
    return open(tar, "rb")


def check_tar(tar: str) -> str | None:
    """Why `tar` cannot be listed (missing, compressed, not a tar), or None."""
    try:
        with _open(tar) as f:
            head = f.read(BLOCK)
    except (OSError, FetchError) as err:
        return f"cannot read: {getattr(err, 'strerror', None) or err}"
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            return (
                f"a {kind}-compressed tar: members are read by byte range, so shards must be "
                "uncompressed tars (decompress it first)"
            )
    if not head:
        return "empty file, not a tar"
    try:
        tarfile.TarInfo.frombuf(head.ljust(BLOCK, b"\0"), "utf-8", "surrogateescape")
    except tarfile.HeaderError as err:
        return f"not a tar ({err})"
    return None


def tar_inputs(tar: str, label: str, base: str, extras: tuple[Any, ...] = ()) -> Iterator[Input]:
    """The image members of `tar` (a local path or URL) as Inputs, in tar order.

    `label`: the tar as the user spelled it (the `path` prefix); `base`: its identity (absolute
    path or URL); `extras`: values carried before the sample fields (a list file's columns).
    """
    problem = check_tar(tar)
    if problem is not None:
        yield _tar_error(label, base, f"{display_name(label)}: {problem}", extras)
        return
    sample: list[tuple[tarfile.TarInfo, Any]] = []  # a sample's members, their field values
    members, failure, trailing = 0, None, False
    try:
        with _open(tar) as f, tarfile.open(fileobj=f, mode="r:", errors="surrogateescape") as tf:
            for member in _members(tf):
                if sample and split_key(member.name)[0] != split_key(sample[0][0].name)[0]:
                    yield from _sample_inputs(sample, label, base, tar, extras)
                    sample = []
                sample.append((member, _field_value(tf, member)))
                members += 1
            trailing = _garbage_after(f, tf.offset)
    except (tarfile.TarError, OSError, FetchError, EOFError) as err:
        failure = f"corrupt or truncated tar after {members} members: {err}"
    yield from _sample_inputs(sample, label, base, tar, extras)  # those listed before a failure
    if trailing:
        failure = f"not a tar header after {members} members: the members after it are not indexed"
    if failure is not None:
        yield _tar_error(label, base, f"{display_name(label)}: {failure}", extras)


def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members one by one, without tarfile's growing list of all of them."""
    while (member := tf.next()) is not None:
        tf.members.clear()  # type: ignore[attr-defined]
        yield member


def _garbage_after(f: BinaryIO, offset: int) -> bool:
    """Whether tarfile stopped at a block that is not the end-of-archive zeros (it stops
    silently at an invalid header)."""
    f.seek(offset)
    block = f.read(BLOCK)
    return bool(block.strip(b"\0"))


def _tar_error(label: str, base: str, reason: str, extras: tuple[Any, ...]) -> Input:
    return Input(label, f"tar-error\0{base}", error=reason, extras=extras + (None,) * len(FIELDS))


def _member_key(base: str, member: tarfile.TarInfo) -> str:
    return f"tar\0{base}\0{member.name}\0{member.offset_data}\0{member.size}\0{member.chksum}"


_NOT_A_FIELD = object()


def _field_value(tf: tarfile.TarFile, member: tarfile.TarInfo) -> Any:
    """A metadata member's value (a ValueError when it is bad); _NOT_A_FIELD for the others."""
    extension = split_key(member.name)[1]
    if extension not in FIELD_NAMES or not member.isreg():
        return _NOT_A_FIELD
    try:
        return _field(tf, member, extension)
    except ValueError as err:
        return err


def _sample_inputs(
    sample: list[tuple[tarfile.TarInfo, Any]],
    label: str,
    base: str,
    tar: str,
    extras: tuple[Any, ...],
) -> Iterator[Input]:
    fields: dict[str, Any] = {}
    problem = None
    for member, value in sample:
        if isinstance(value, ValueError):
            problem = f"{display_name(member.name)}: {value}"
        elif value is not _NOT_A_FIELD:
            fields[split_key(member.name)[1]] = value
    values = extras + tuple(fields.get(f.name) for f in FIELDS)
    for member, _ in sample:
        if os.path.splitext(member.name)[1].lower() not in IMAGE_SUFFIXES:
            continue
        path = f"{label}/{member.name}"
        key = _member_key(base, member)
        error = problem
        if not member.isreg():
            error = f"not a regular file in the tar ({_kind(member)}); not read"
        elif member.issparse():
            error = "a sparse member; not read"
        if error is not None:
            yield Input(path, key, error=f"{display_name(path)}: {error}", extras=values)
            continue
        where = Where(tar, member.offset_data, member.size, member.chksum)
        yield Input(path, key, where=where, extras=values)


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.isdir():
        return "a directory"
    return "a special file"


def _field(tf: tarfile.TarFile, member: tarfile.TarInfo, extension: str) -> Any:
    """A metadata member's value (ValueError saying what is wrong with it)."""
    if member.size > FIELD_BYTES:
        raise ValueError(f"{member.size} bytes, more than {FIELD_BYTES} for a .{extension}")
    handle = tf.extractfile(member)
    data = handle.read() if handle is not None else b""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err})") from None
    if extension == "cls":
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or not -(2**63) <= value < 2**63:
            raise ValueError(f"not an int64 class: {text[:40]!r}")
        return value
    if extension == "json":
        try:
            json.loads(text)
        except ValueError as err:
            raise ValueError(f"not JSON ({err})") from None
    return text
