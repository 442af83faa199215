"""Synthetic image files for the image-loading tests: every bad or exotic input kind.

Each function writes one file into ``directory`` and returns its path (``missing_file`` returns a
path that does not exist). Pixel contents are chosen so that tests can check the decoded result.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, textured HxWx3 uint8 image that JPEG compresses like a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(
        0, 256, size=(max(height // 40, 2), max(width // 40, 2), 3), dtype=np.uint8
    )
    smooth = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(smooth)


def save(directory: Path, name: str, image: Image.Image, **params: object) -> Path:
    path = directory / name
    image.save(path, **params)
    return path


def missing_file(directory: Path) -> Path:
    return directory / "does-not-exist.jpg"


def empty_file(directory: Path) -> Path:
    path = directory / "empty.jpg"
    path.write_bytes(b"")
    return path


def not_an_image(directory: Path) -> Path:
    path = directory / "notes.jpg"
    path.write_text("this is a text file with a .jpg extension\n")
    return path


def jpeg(directory: Path, width: int, height: int, name: str = "photo.jpg", seed: int = 0) -> Path:
    return save(directory, name, Image.fromarray(photo_like(width, height, seed)), quality=90)


def truncated_jpeg(directory: Path) -> Path:
    """A real JPEG cut in half."""
    data = jpeg(directory, 320, 240, name="whole.jpg").read_bytes()
    path = directory / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_png(directory: Path) -> Path:
    whole = save(directory, "whole.png", Image.fromarray(photo_like(200, 150)))
    data = whole.read_bytes()
    path = directory / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    return path


def grey_jpeg(directory: Path, value: int = 100) -> Path:
    """Mode L, constant ``value``."""
    return save(directory, "grey.jpg", Image.new("L", (64, 48), value), quality=95)


def rgba_png(directory: Path) -> Path:
    """Left half: colour (10, 20, 30) fully transparent; right half: (200, 100, 50) opaque."""
    pixels = np.zeros((40, 60, 4), np.uint8)
    pixels[:, :30] = (10, 20, 30, 0)
    pixels[:, 30:] = (200, 100, 50, 255)
    return save(directory, "rgba.png", Image.fromarray(pixels, "RGBA"))


def palette_png(directory: Path, transparency: bool = True) -> Path:
    """Mode P, left half palette entry 0 = RED, right half entry 1 = BLUE.

    With ``transparency`` entry 0 is fully and entry 1 half transparent: a tRNS chunk with several
    values, which Pillow keeps as bytes (the case it warns about when converting to RGB).
    """
    image = Image.new("P", (40, 20), 0)
    image.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    image.paste(1, (20, 0, 40, 20))
    name = "palette_trns.png" if transparency else "palette.png"
    params: dict[str, object] = {"transparency": b"\x00\x80"} if transparency else {}
    return save(directory, name, image, **params)


def cmyk_jpeg(directory: Path) -> Path:
    """Mode CMYK, pure cyan (C=255): RGB (0, 255, 255)."""
    return save(directory, "cmyk.jpg", Image.new("CMYK", (64, 48), (255, 0, 0, 0)), quality=95)


def grey16_png(directory: Path) -> Path:
    """Mode I;16, 8 rows of a horizontal gradient 0..65535 over 256 columns."""
    row = np.linspace(0, 65535, 256).round().astype(np.uint16)
    return save(directory, "grey16.png", Image.fromarray(np.tile(row, (8, 1))))


def gradient16_values() -> np.ndarray:
    """The 16-bit values of one row of ``grey16_png``."""
    return np.linspace(0, 65535, 256).round().astype(np.uint16)


def bilevel_png(directory: Path) -> Path:
    """Mode 1: left half black, right half white."""
    image = Image.new("1", (32, 16), 0)
    image.paste(1, (16, 0, 32, 16))
    return save(directory, "bilevel.png", image)


def grey_alpha_png(directory: Path) -> Path:
    """Mode LA: grey 100, alpha 0 (the grey must be kept, not composited)."""
    return save(directory, "grey_alpha.png", Image.new("LA", (16, 16), (100, 0)))


def int32_tiff(directory: Path) -> Path:
    """Mode I: values 0, 32768, 65535 and 100000 (clipped to 65535) in four columns."""
    values = np.array([[0, 32768, 65535, 100000]], np.int32).repeat(4, axis=0)
    return save(directory, "int32.tif", Image.fromarray(values))


def float_tiff(directory: Path) -> Path:
    """Mode F: values -5, 0.4, 127.6, 300 and NaN in five columns."""
    values = np.array([[-5.0, 0.4, 127.6, 300.0, np.nan]], np.float32).repeat(3, axis=0)
    return save(directory, "float.tif", Image.fromarray(values))


def ycbcr_tiff(directory: Path) -> Path:
    """Mode YCbCr, mid grey (128, 128, 128)."""
    return save(directory, "ycbcr.tif", Image.new("YCbCr", (16, 16), (128, 128, 128)))


def animated_gif(directory: Path) -> Path:
    """Three frames: RED, GREEN, BLUE; the first must be used."""
    frames = [Image.new("RGB", (32, 24), colour) for colour in (RED, GREEN, BLUE)]
    return save(
        directory,
        "animated.gif",
        frames[0],
        save_all=True,
        append_images=frames[1:],
        duration=100,
        loop=0,
    )


def halves(
    width: int, height: int, first: tuple[int, int, int], second: tuple[int, int, int]
) -> np.ndarray:
    """HxWx3: left half ``first``, right half ``second``."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = first
    pixels[:, width // 2 :] = second
    return pixels


def exif_rotated_jpeg(
    directory: Path, orientation: int = 6, pixels: np.ndarray | None = None, name: str = ""
) -> Path:
    """A JPEG with an EXIF orientation tag.

    Default pixels: stored 40x20, left half RED, right half BLUE. With orientation 6 ("rotate 90
    degrees clockwise to display") it is displayed 20x40 with RED on top and BLUE below.
    """
    if pixels is None:
        pixels = halves(40, 20, RED, BLUE)
    exif = Image.Exif()
    exif[0x0112] = orientation
    name = name or f"exif{orientation}.jpg"
    return save(directory, name, Image.fromarray(pixels), exif=exif, quality=95)


def exif_rotated_png(directory: Path, late: bool = False) -> Path:
    """PNG, stored 40x20 (RED | BLUE), EXIF orientation 6.

    ``late`` moves the eXIf chunk behind the pixel data, where a header-only read cannot see it.
    """
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(directory, "exif6.png", Image.fromarray(halves(40, 20, RED, BLUE)), exif=exif)
    if late:
        chunks = _png_chunks(path.read_bytes())
        exif_chunks = [c for tag, c in chunks if tag == b"eXIf"]
        rest = [c for tag, c in chunks if tag != b"eXIf"]
        path = directory / "exif6_late.png"
        # Keep IEND last.
        path.write_bytes(_PNG_SIGNATURE + b"".join(rest[:-1] + exif_chunks + rest[-1:]))
    return path


def mpo(directory: Path, width: int, height: int) -> Path:
    """A two-frame MPO (the multi-picture JPEG many phones write)."""
    frames = [Image.fromarray(photo_like(width, height, seed)) for seed in (1, 2)]
    return save(
        directory, "multi.mpo", frames[0], format="MPO", save_all=True, append_images=frames[1:]
    )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data)
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], len(_PNG_SIGNATURE)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos : pos + 12 + length]))
        pos += 12 + length
    return chunks


def bomb_png(directory: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG whose header claims ``width`` x ``height`` 8-bit grey pixels.

    Only the first row's data is present, as in a hostile file: the header alone must be enough
    to refuse it, and nothing may try to allocate the full image.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    first_row = zlib.compress(b"\x00" * (width + 1))
    data = (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", first_row)
        + _png_chunk(b"IEND", b"")
    )
    path = directory / f"bomb_{width}x{height}.png"
    path.write_bytes(data)
    return path
