"""Remote inputs of `interactive index`: URLs read through fsspec (what img2dataset uses).

Any protocol fsspec knows: `https://` and `http://` (aiohttp), `s3://` (s3fs), and `gs://`
(gcsfs) or `hf://` (huggingface_hub) when those are installed. `pip install
'interactive-features[remote]'` brings fsspec, s3fs and aiohttp; nothing imports fsspec until a
URL is read (optional_import), so the runtime works without it.

Every read is retried: RETRIES tries in all (3), waiting BACKOFF_S (0.5 s), then twice as long
each time, except for an answer that will not change (no such object, access denied). Each try
is bounded by TIMEOUT_S (30 s: connect and read; for HTTP the whole request). The environment
variables INTERACTIVE_REMOTE_RETRIES, INTERACTIVE_REMOTE_BACKOFF_S and
INTERACTIVE_REMOTE_TIMEOUT_S change them (read when a process first reads a URL; decoding
workers inherit them). Credentials and endpoints are
fsspec's and the protocol library's own: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`... for S3,
`FSSPEC_<PROTOCOL>_<OPTION>` environment variables for any filesystem option (fsspec's config).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, BinaryIO, TypeVar

from .optional import optional_import

RETRIES = 3  # tries per read, in all
BACKOFF_S = 0.5  # wait before the second try; doubled before each later one
TIMEOUT_S = 30.0  # per try: connect and read
ENV = "INTERACTIVE_REMOTE_"  # + RETRIES, BACKOFF_S, TIMEOUT_S
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
T = TypeVar("T")


class FetchError(OSError):
    """A remote read that failed for good; ``str()`` names the URL and the error."""


def is_url(name: str) -> bool:
    """Whether `name` is a URL (`scheme://...`) rather than a local path."""
    return bool(URL.match(name))


def fsspec_module() -> Any:
    return optional_import(
        "fsspec", "remote inputs (URLs) need fsspec", "pip install 'interactive-features[remote]'"
    )


def setting(name: str) -> float:
    """RETRIES, BACKOFF_S or TIMEOUT_S, from the environment when set there (a clear error for
    a value that is not a positive number)."""
    default = {"RETRIES": RETRIES, "BACKOFF_S": BACKOFF_S, "TIMEOUT_S": TIMEOUT_S}[name]
    text = os.environ.get(ENV + name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0 or (name == "RETRIES" and (value < 1 or value != int(value))):
        raise ValueError(f"{ENV}{name}={text!r}: not a valid value (default {default})")
    return value


def _storage_options(protocol: str) -> dict[str, Any]:
    """Timeouts per protocol (the library's own retries off: ours are the ones that count)."""
    timeout = setting("TIMEOUT_S")
    if protocol in ("http", "https"):
        aiohttp = optional_import(
            "aiohttp", "http(s) inputs need aiohttp", "pip install 'interactive-features[remote]'"
        )
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout)}}
    if protocol in ("s3", "s3a"):
        return {
            "config_kwargs": {
                "connect_timeout": timeout,
                "read_timeout": timeout,
                "retries": {"max_attempts": 1},
            },
        }
    return {}


@lru_cache(maxsize=16)
def _filesystem(protocol: str, pid: int) -> Any:
    fsspec = fsspec_module()
    try:
        # our cache (per process), not fsspec's: a fork must not reuse the parent's instance
        return fsspec.filesystem(protocol, skip_instance_cache=True, **_storage_options(protocol))
    except (ImportError, ValueError) as err:  # a protocol whose library is not installed
        raise FetchError(f"{protocol}:// inputs: {err}") from None


def filesystem(url: str) -> tuple[Any, str]:
    """(the fsspec filesystem of `url`, the path within it); one instance per protocol and
    process (fsspec's async filesystems must not cross a fork: workers make their own)."""
    protocol = url.split("://", 1)[0].lower()
    return _filesystem(protocol, os.getpid()), url


def _final(err: BaseException) -> bool:
    """An error a retry cannot fix."""
    return isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError)


def _reason(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "not found (404 / no such key)"
    if isinstance(err, PermissionError):
        return f"access denied: {err}"
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}" if type(err).__name__ not in text else text


def with_retries(url: str, what: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
    """`what()`, tried up to RETRIES times; FetchError naming `url` and the last error."""
    wait, tries = setting("BACKOFF_S"), int(setting("RETRIES"))
    for attempt in range(1, tries + 1):
        try:
            return what()
        except Exception as err:  # any library's error: each is this URL's failure
            if _final(err) or attempt == tries:
                after = "" if _final(err) else f" after {attempt} tries"
                raise FetchError(f"{url}: fetch failed{after}: {_reason(err)}") from None
        sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


def read_range(url: str, start: int = 0, size: int = -1) -> bytes:
    """The bytes [start, start + size) of the object at `url` (size -1: to its end)."""
    fs, path = filesystem(url)
    end = None if size < 0 else start + size

    def fetch() -> bytes:
        data = bytes(fs.cat_file(path, start=start or None, end=end))
        if end is not None and len(data) > end - start:
            # a server that ignores Range sends the whole object: keep the asked-for bytes
            data = data[start:end]
        return data

    return with_retries(url, fetch)


def open_url(url: str, mode: str = "rb", **kwargs: Any) -> BinaryIO:
    """An open (random-access where the server allows) file on `url`, opened with retries."""
    fs, path = filesystem(url)
    return with_retries(url, lambda: fs.open(path, mode, **kwargs))


def object_info(url: str) -> dict[str, Any]:
    """fsspec's `info` of `url` (size, ETag, ...), with retries."""
    fs, path = filesystem(url)
    return with_retries(url, lambda: fs.info(path))


def list_objects(url: str) -> list[tuple[str, dict[str, Any]]]:
    """(URL, fsspec info: size, ETag...) of every object under the folder `url`, sorted by URL,
    in one listing (with retries)."""
    fs, path = filesystem(url)
    protocol = url.split("://", 1)[0]
    found = with_retries(url, lambda: fs.find(path, detail=True))
    objects = []
    for name, info in found.items():
        if info.get("type", "file") == "file":
            full = name if is_url(name) else f"{protocol}://{name.lstrip('/')}"
            objects.append((full, info))
    return sorted(objects, key=lambda item: item[0])


def content_tag(info: dict[str, Any]) -> str:
    """What a listing says of an object's content: its ETag (or another version tag the store
    gives) and size; '' when it gives none."""
    for key in ("ETag", "etag", "md5Hash", "crc32c", "LastModified", "mtime", "updated"):
        if info.get(key) is not None:
            return f"{key}={info[key]}\0size={info.get('size')}"
    return f"size={info.get('size')}"


def join_url(folder: str, entry: str) -> str:
    """`entry` (relative, POSIX separators) under the URL folder `folder`."""
    return folder.rstrip("/") + "/" + entry
