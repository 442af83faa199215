"""Decoding input images into RGB pixel arrays at their bucket size (export/ALGORITHM.md
section 2, steps 1-2).

Every failure caused by the input itself (missing, unreadable, empty or special file, not an
image, truncated data, decompression bomb, unsupported array) is an ``ImageError`` whose message
names the input and the reason, so a batch run can log it and go on with the next image.

Policies a caller may care about:

- Orientation: the EXIF orientation tag (and XMP ``tiff:Orientation``) is applied; sizes are the
  displayed sizes.
- Alpha and transparency are dropped, not composited onto a background: the colour stored under a
  transparent pixel is kept.
- Colour profiles (ICC): an RGB image (or palette image) with an embedded RGB profile other than
  sRGB is converted to sRGB with ``PIL.ImageCms`` (littleCMS, its default perceptual intent); an
  sRGB profile, no profile, or a greyscale or CMYK one leaves the pixels as Pillow decodes them
  (CMYK uses Pillow's plain CMYK -> RGB conversion). A profile littleCMS cannot read is ignored
  (logged at debug level), never an error.
- Formats: JPEG (and MPO), PNG, GIF, BMP, TIFF, WebP, PPM, AVIF where this Pillow decodes it, and
  HEIC/HEIF through the optional ``pillow-heif`` plugin (the ``heic`` extra);
  nothing else, so that Pillow never hands a file to Ghostscript (EPS, PS, PDF).
- 16-bit greyscale (``I;16*``) is scaled to 8 bits with 65535 -> 255; mode ``I`` (32-bit) is read
  as 16-bit data (clipped to 0..65535, then scaled); mode ``F`` is read on Pillow's 0..255 scale.
- Animations: only the first frame is used.
- A ``PIL.Image.Image`` input is treated as a decoded file: EXIF orientation, mode conversion and
  ICC as above, on a copy (the caller's image is never changed or closed).
- Only numpy and Pillow are used; this module must never import torch.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import os
import stat
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps

from .paths import display_name

ImageSource: TypeAlias = str | os.PathLike[str] | bytes | np.ndarray | Image.Image

_log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000

# EXIF orientations 5-8 rotate by 90 degrees: stored width is displayed height.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# Raster photo formats only: Pillow would otherwise hand EPS/PDF-like inputs to external programs
# (Ghostscript), an attack route for a service that reads untrusted files.
PHOTO_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # JPEG opens MPO too
# Also allowed when this Pillow can open them: AVIF (Pillow's own plugin, built with libavif) and
# HEIF (registered by the optional pillow-heif package).
OPTIONAL_FORMATS = ("AVIF", "HEIF")
HEIC_HINT = "HEIC/HEIF image: decoding it needs pillow-heif: pip install pillow-heif"
AVIF_HINT = "AVIF image: this Pillow cannot decode AVIF (needs Pillow >= 11.2 built with libavif)"
# ISO base media (HEIF family) brands, at bytes 8-12 after "ftyp" at bytes 4-8.
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
# Formats decoded by libjpeg, whose DCT scaling Pillow exposes through Image.draft.
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
# Pillow's plugins signal corrupt or truncated data with many exception types; any of these
# raised while decoding is the file's fault, not the caller's.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    Image.DecompressionBombError,
)


class ImageError(ValueError):
    """An input that cannot be turned into RGB pixels; ``str()`` is ``"<input>: <reason>"``.

    ``label`` is ``describe(source)``, ``reason`` says what is wrong. Picklable (batch workers
    send it between processes).
    """

    def __init__(self, label: str, reason: str) -> None:
        # Both go into args so that pickling rebuilds the same error.
        super().__init__(label, reason)
        self.label = label
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.label}: {self.reason}"


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """An image ready for the network.

    ``pixels``: HxWx3 uint8 RGB at the bucket size (H = bucket[1], W = bucket[0]).
    ``width``, ``height``: the original displayed size (after EXIF orientation), before any draft
    reduction or resize. ``bucket``: ``(W, H)`` as returned by the bucket function.
    """

    pixels: np.ndarray
    width: int
    height: int
    bucket: tuple[int, int]


def describe(source: object) -> str:
    """A short label for ``source`` in messages.

    The path (as text: a name that is not valid UTF-8 has its undecodable bytes as ``\\xNN``),
    ``<bytes 1234>``, ``<array 3x4x3 uint8>``, or ``<TypeName>`` for anything else.
    """
    if isinstance(source, np.ndarray):
        shape = "x".join(str(n) for n in source.shape)
        return f"<array {shape} {source.dtype}>"
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<bytes {len(source)}>"
    if isinstance(source, str | os.PathLike):
        return display_name(os.fsdecode(source))
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    return f"<{type(source).__name__}>"


# --------------------------------------------------------------------------------------------
# Opening (header only)


_FILE_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)
# Reasons for the errno of a failed stat, open or read: the file's fault, said plainly.
_ERRNO_REASONS = {
    errno.ENOENT: "no such file",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied (operation not permitted)",
    errno.EISDIR: "is a directory, not an image file",
    errno.ENOTDIR: "no such file (a component of the path is not a directory)",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop?)",
    errno.EIO: "input/output error while reading (failing disk or network filesystem?)",
}


def os_error_reason(err: OSError) -> str:
    """A short reason for a file-level OSError (no errno: its message)."""
    reason = _ERRNO_REASONS.get(err.errno) if err.errno is not None else None
    if reason is not None:
        return reason
    return f"cannot read file: {err.strerror or err}"


def _pseudo_filesystems() -> frozenset[int]:
    """Device ids of /proc and /sys, whose files claim size 0 whatever they hold."""
    devices = set()
    for root in ("/proc", "/sys"):
        with contextlib.suppress(OSError):
            devices.add(os.stat(root).st_dev)
    return frozenset(devices)


_PSEUDO_DEVICES: frozenset[int] | None = None


def _is_pseudo_file(info: os.stat_result) -> bool:
    global _PSEUDO_DEVICES
    if _PSEUDO_DEVICES is None:
        _PSEUDO_DEVICES = _pseudo_filesystems()
    return info.st_dev in _PSEUDO_DEVICES


def _stat_file(path: str, label: str) -> None:
    """Turn the common file-level problems into clear reasons before Pillow sees the file.

    Only a regular file is ever opened: a FIFO would block the reader for ever, a device could
    stream without end.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageError(label, f"broken symbolic link (to {_link_target(path)})") from None
        raise ImageError(label, "no such file") from None
    except OSError as e:
        raise ImageError(label, os_error_reason(e)) from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(label, "is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "special")
        raise ImageError(label, f"not a regular file ({kind}); not opened")
    if _is_pseudo_file(info):
        raise ImageError(label, "not a regular file (/proc or /sys pseudo-file); not opened")
    if info.st_size == 0:
        raise ImageError(label, "empty file")


def _link_target(path: str) -> str:
    try:
        return display_name(os.readlink(path))
    except OSError:
        return "?"


def _file_object(source: object, label: str) -> str | io.BytesIO:
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageError(label, "empty data (0 bytes)")
        return io.BytesIO(bytes(source))
    if isinstance(source, str | os.PathLike):
        path = os.fsdecode(source)
        _stat_file(path, label)
        return path
    raise ImageError(
        label, "unsupported input type (expected a path, bytes, a numpy array or a PIL image)"
    )


def _check_pixels(size: tuple[int, int], label: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(label, f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(
            label,
            f"refused as a possible decompression bomb: {w}x{h} = {w * h} pixels "
            f"exceeds the limit of {max_pixels}",
        )


@functools.cache
def allowed_formats() -> tuple[str, ...]:
    """The formats ``Image.open`` may try: PHOTO_FORMATS plus the OPTIONAL_FORMATS this Pillow
    (and pillow-heif, registered here when importable) can open. Computed once per process."""
    with contextlib.suppress(ImportError):
        from pillow_heif import register_heif_opener  # type: ignore[import-not-found,unused-ignore]

        register_heif_opener()
    Image.init()  # registers every plugin (MPO, TIFF, WEBP, AVIF)
    return PHOTO_FORMATS + tuple(f for f in OPTIONAL_FORMATS if f in Image.OPEN)


def _unidentified_reason(fp: str | io.BytesIO) -> str:
    """Why a file Pillow could not identify is refused: a HEIC or AVIF file this process cannot
    decode says what it needs; anything else is not an image."""
    head = b""
    with contextlib.suppress(OSError):
        if isinstance(fp, io.BytesIO):
            head = fp.getvalue()[:12]
        else:
            with open(fp, "rb") as f:
                head = f.read(12)
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIC_BRANDS and "HEIF" not in allowed_formats():
            return HEIC_HINT
        if brand in _AVIF_BRANDS and "AVIF" not in allowed_formats():
            return AVIF_HINT
    return "not an image (cannot identify format)"


@contextlib.contextmanager
def _opened(source: object, label: str, max_pixels: int) -> Iterator[Image.Image]:
    """Open ``source`` (header only) and refuse it if it claims more than ``max_pixels``."""
    fp = _file_object(source, label)
    try:
        # Our own limit below is the one that decides; Pillow's warning (at its smaller
        # MAX_IMAGE_PIXELS) must not leak to the caller. Its hard error (twice that) still fires.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=allowed_formats())
    except Image.UnidentifiedImageError:
        raise ImageError(label, _unidentified_reason(fp)) from None
    except Image.DecompressionBombError as e:
        raise ImageError(label, f"refused as a possible decompression bomb: {e}") from None
    except OSError as e:
        if e.errno is not None:  # the file's own problem (permission, vanished, I/O), not data
            raise ImageError(label, os_error_reason(e)) from None
        raise ImageError(label, f"corrupt image header: {e}") from None
    except _DECODE_ERRORS as e:
        raise ImageError(label, f"corrupt image header: {e}") from None
    with im:
        _check_pixels(im.size, label, max_pixels)
        yield im


def _header_orientation(im: Image.Image, label: str) -> int:
    """The EXIF orientation (1-8) as far as it is known without decoding pixels.

    PNG keeps EXIF in an eXIf chunk that may follow the pixel data, and Pillow's PNG ``getexif``
    decodes the whole image to find it; when it has not been seen yet, 1 is assumed here (the
    decode step still applies the real orientation).
    """
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS as e:
        raise ImageError(label, f"corrupt EXIF data: {e}") from None
    return value if isinstance(value, int) else 1


def _displayed_size(im: Image.Image, label: str) -> tuple[int, int]:
    w, h = im.size
    if _header_orientation(im, label) in _SWAPPING_ORIENTATIONS:
        return h, w
    return w, h


# --------------------------------------------------------------------------------------------
# Decoding


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_size(name: str, size: object) -> tuple[int, int]:
    if isinstance(size, tuple) and len(size) == 2:
        w, h = size
        if _is_positive_int(w) and _is_positive_int(h):
            return w, h
    raise ValueError(f"{name} must be a (width, height) tuple of positive ints, got {size!r}")


def _apply_draft(im: Image.Image, min_size: tuple[int, int] | None, label: str) -> bool:
    """Let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale, never below ``min_size``.

    ``min_size`` is in displayed orientation; the draft works on the stored image, so it is swapped
    for EXIF orientations 5-8. Returns whether a draft was requested.
    """
    if min_size is None or im.format not in _DRAFT_FORMATS:
        return False
    min_w, min_h = min_size
    if _header_orientation(im, label) in _SWAPPING_ORIENTATIONS:
        min_w, min_h = min_h, min_w
    w, h = im.size
    if w < 2 * min_w or h < 2 * min_h:
        return False
    # Pillow picks the largest scale 1/s with s <= min(w // min_w, h // min_h), so each decoded
    # side, ceil(side / s), stays >= the requested one.
    im.draft("RGB", (min_w, min_h))
    return True


def _decode(
    im: Image.Image, label: str, min_size: tuple[int, int] | None
) -> tuple[Image.Image, bool]:
    """Decode the first frame, apply EXIF orientation; returns (image, whether drafted)."""
    drafted = _apply_draft(im, min_size, label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
    except OSError as e:
        if e.errno is not None:
            raise ImageError(label, os_error_reason(e)) from None
        raise ImageError(label, f"truncated or corrupt image data: {e}") from None
    except _DECODE_ERRORS as e:
        raise ImageError(label, f"truncated or corrupt image data: {e}") from None
    return im, drafted


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 with rounding (65535 -> 255); Pillow's own convert clips instead."""
    v = np.clip(values, 0, 65535).astype(np.uint32)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    return np.rint(np.clip(v, 0.0, 255.0)).astype(np.uint8)


_SRGB = ImageCms.createProfile("sRGB")
# Modes whose colours an RGB profile describes (after conversion to RGB).
_RGB_PROFILE_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA"})


@functools.lru_cache(maxsize=32)
def _srgb_transform(icc: bytes) -> ImageCms.ImageCmsTransform | None:
    """The RGB -> sRGB transform for an embedded profile; None when the pixels stay as they are
    (sRGB itself, not an RGB profile, or unreadable: logged). Cached: a collection holds few."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space
        description = ImageCms.getProfileDescription(profile) or ""
        if space.strip() != "RGB":
            _log.debug("ICC profile %r is %r, not RGB: ignored", description, space)
            return None
        if "srgb" in description.lower():
            return None
        return ImageCms.buildTransform(profile, _SRGB, "RGB", "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError, AttributeError) as e:
        _log.debug("embedded ICC profile ignored (%s: %s)", type(e).__name__, e)
        return None


def _to_srgb(im: Image.Image, icc: object, label: str) -> Image.Image:
    """An RGB image converted from its embedded profile to sRGB (unchanged when not needed)."""
    if not isinstance(icc, bytes) or not icc:
        return im
    transform = _srgb_transform(icc)
    if transform is None:
        return im
    try:
        converted = ImageCms.applyTransform(im, transform)
    except (ImageCms.PyCMSError, OSError, ValueError) as e:
        _log.debug("%s: ICC conversion failed, profile ignored (%s)", label, e)
        return im
    return im if converted is None else converted


def _to_rgb_array(im: Image.Image, label: str) -> np.ndarray:
    """Any Pillow mode -> HxWx3 uint8 RGB, C-contiguous and writable (sRGB: see ICC above)."""
    mode = im.mode
    if mode == "I" or mode.startswith("I;16"):
        return _grey_to_rgb(_scale_16bit(np.asarray(im)))
    if mode == "F":
        return _grey_to_rgb(_float_to_uint8(np.asarray(im)))
    icc = im.info.get("icc_profile") if mode in _RGB_PROFILE_MODES else None
    if mode != "RGB":
        try:
            if "transparency" in im.info:
                # Via RGBA: Pillow warns when converting a palette image with per-entry
                # transparency straight to RGB. The alpha is then dropped like any other.
                im = im.convert("RGBA")
            im = im.convert("RGB")
        except ValueError as e:
            raise ImageError(label, f"unsupported image mode {mode}: {e}") from None
    if icc:
        im = _to_srgb(im, icc, label)
    return np.array(im, dtype=np.uint8)


def _decode_pil(source: Image.Image, label: str, max_pixels: int) -> Image.Image:
    """A caller's PIL image, decoded like a file: a copy with EXIF orientation applied."""
    _check_pixels(source.size, label, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            oriented = ImageOps.exif_transpose(source)  # a new image (a copy when upright)
    except OSError as e:
        if e.errno is not None:
            raise ImageError(label, os_error_reason(e)) from None
        raise ImageError(label, f"truncated or corrupt image data: {e}") from None
    except _DECODE_ERRORS as e:  # also a closed image (ValueError)
        raise ImageError(label, f"truncated or corrupt image data: {e}") from None
    return oriented


def _check_array(pixels: np.ndarray, label: str) -> None:
    if pixels.dtype != np.uint8:
        raise ImageError(label, f"unsupported array dtype {pixels.dtype} (expected uint8)")
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))):
        raise ImageError(label, "unsupported array shape (expected HxW, HxWx3 or HxWx4)")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageError(label, "empty array (no pixels)")


def _array_to_rgb(pixels: np.ndarray, label: str) -> np.ndarray:
    _check_array(pixels, label)
    if pixels.ndim == 2:
        return _grey_to_rgb(pixels)
    if pixels.shape[2] == 3 and pixels.flags.c_contiguous:
        return pixels
    return np.ascontiguousarray(pixels[:, :, :3])


# --------------------------------------------------------------------------------------------
# Public API


def image_size(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as displayed (after EXIF orientation), from the header only: fast.

    Raises ImageError for anything ``load_image`` would refuse before decoding (missing, empty or
    unidentifiable file, more than ``max_pixels`` pixels); truncated pixel data is only found by
    ``load_image``. For a PNG whose EXIF follows the pixel data the orientation is not seen here.
    """
    label = describe(source)
    if isinstance(source, np.ndarray):
        _check_array(source, label)
        return int(source.shape[1]), int(source.shape[0])
    if isinstance(source, Image.Image):
        _check_pixels(source.size, label, max_pixels)
        return _displayed_size(source, label)
    with _opened(source, label, max_pixels) as im:
        return _displayed_size(im, label)


def load_image(
    source: ImageSource,
    *,
    min_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode ``source`` into an HxWx3 uint8 RGB array (C-contiguous), EXIF orientation applied.

    ``source``: a path, the encoded bytes of an image file, a ``PIL.Image.Image`` (decoded like a
    file, on a copy), or an array (HxWx3 uint8 is returned as is, HxW uint8 is replicated to 3
    channels, HxWx4 uint8 loses its alpha).

    ``min_size=(W, H)``, in displayed orientation (normally the bucket), lets a JPEG at least twice
    as large in both sides be decoded at a reduced DCT scale (1/2, 1/4 or 1/8) that is still at
    least ``min_size``; the result is then not the full size. Ignored for other formats and arrays.

    Images with more than ``max_pixels`` pixels are refused from the header, before decoding
    (Pillow's own hard limit, twice ``PIL.Image.MAX_IMAGE_PIXELS``, also applies). Raises
    ImageError for bad inputs, ValueError for a malformed ``min_size``.
    """
    label = describe(source)
    if min_size is not None:
        _check_size("min_size", min_size)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, label)
    if isinstance(source, Image.Image):
        return _to_rgb_array(_decode_pil(source, label, max_pixels), label)
    with _opened(source, label, max_pixels) as im:
        decoded, _ = _decode(im, label, min_size)
        return _to_rgb_array(decoded, label)


def resize_to(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize HxWx3 uint8 ``pixels`` to ``size = (W, H)``: bilinear, antialiased when shrinking.

    Returns ``pixels`` itself (no resampling, no copy) when it already has that size.
    """
    w, h = _check_size("size", size)
    label = describe(pixels)
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageError(label, "resize_to needs an HxWx3 uint8 array")
    _check_array(pixels, label)
    if pixels.shape[:2] == (h, w):
        return pixels
    # Pillow widens the bilinear kernel by the shrink factor: that is the antialiasing.
    resized = Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)


def prepare_image(
    source: ImageSource,
    bucket_fn: Callable[[int, int], tuple[int, int]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedImage:
    """Decode ``source`` and resize it to ``bucket_fn(width, height)`` (the displayed size).

    The file is opened once: the bucket comes from the header, then the JPEG is decoded with
    ``min_size=bucket`` (see ``load_image``) and resized to the bucket. Raises ImageError for bad
    inputs.
    """
    label = describe(source)
    if isinstance(source, np.ndarray):
        pixels = _array_to_rgb(source, label)
        size = (pixels.shape[1], pixels.shape[0])
        bucket = bucket_fn(*size)
    elif isinstance(source, Image.Image):
        pixels = _to_rgb_array(_decode_pil(source, label, max_pixels), label)
        size = (pixels.shape[1], pixels.shape[0])
        bucket = bucket_fn(*size)
    else:
        with _opened(source, label, max_pixels) as im:
            size = _displayed_size(im, label)
            bucket = bucket_fn(*size)
            decoded, drafted = _decode(im, label, min_size=bucket)
            if not drafted and decoded.size != size:
                # The orientation was only found while decoding (PNG eXIf after the pixels).
                size = decoded.size
                bucket = bucket_fn(*size)
            pixels = _to_rgb_array(decoded, label)
    return PreparedImage(resize_to(pixels, bucket), size[0], size[1], bucket)
