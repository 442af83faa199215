"""Image decoding: every bad or exotic input, draft mode, resizing, preparation for a bucket."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from interactive_features.runtime.buckets import bucket_for
from interactive_features.runtime.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    PreparedImage,
    describe,
    image_size,
    load_image,
    prepare_image,
    resize_to,
)
from PIL import Image

import imagegen

DATA = Path(__file__).parent / "data"
PHOTOS = sorted(DATA.glob("*.jpg"))


@pytest.fixture
def no_warnings() -> Iterator[None]:
    """Any warning raised inside the test is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def assert_close(actual: np.ndarray, expected: tuple[int, ...], tol: int) -> None:
    diff = np.abs(actual.astype(int) - np.array(expected)).max()
    assert diff <= tol, f"{actual.reshape(-1, 3)[:3]} vs {expected}"


def check_rgb(pixels: np.ndarray, height: int, width: int) -> None:
    assert pixels.shape == (height, width, 3)
    assert pixels.dtype == np.uint8
    assert pixels.flags.c_contiguous


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (imagegen.missing_file, "no such file"),
        (imagegen.empty_file, "empty (file|data)"),
        (imagegen.not_an_image, r"not an image \(cannot identify format\)"),
        (imagegen.truncated_jpeg, "truncated or corrupt image data"),
        (imagegen.truncated_png, "truncated or corrupt image data"),
    ],
)
def test_bad_files(tmp_path: Path, make, reason: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ImageError, match=reason) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert info.value.label == str(path)
    # The same error for the same bytes.
    if path.exists():
        data = path.read_bytes()
        with pytest.raises(ImageError, match=reason) as info:
            load_image(data)
        assert str(info.value).startswith(f"<bytes {len(data)}>: ")


def test_header_errors_found_by_image_size(tmp_path: Path) -> None:
    for make in (imagegen.missing_file, imagegen.empty_file, imagegen.not_an_image):
        with pytest.raises(ImageError):
            image_size(make(tmp_path))
    # Truncated pixel data is only found when decoding.
    assert image_size(imagegen.truncated_jpeg(tmp_path)) == (320, 240)


def test_directory_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file$"):
        load_image(imagegen.empty_file(tmp_path))
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="unsupported input type"):
        load_image(42)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match=r"<bytes 0>: empty data"):
        load_image(b"")


def test_image_error_is_value_error_and_pickles() -> None:
    error = ImageError("a.jpg", "empty file")
    assert isinstance(error, ValueError)
    assert str(error) == "a.jpg: empty file"
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.label, copy.reason) == ("a.jpg: empty file", "a.jpg", "empty file")


def test_describe() -> None:
    assert describe("x/y.jpg") == "x/y.jpg"
    assert describe(Path("x/y.jpg")) == "x/y.jpg"
    assert describe(b"1234") == "<bytes 4>"
    assert describe(np.zeros((3, 4, 3), np.uint8)) == "<array 3x4x3 uint8>"
    assert describe(3.5) == "<float>"


# --- decompression bombs ----------------------------------------------------------------------


def test_bomb_refused_from_header(tmp_path: Path, no_warnings: None) -> None:
    path = imagegen.bomb_png(tmp_path, 20000, 20000)
    for call in (load_image, image_size):
        with pytest.raises(ImageError, match="decompression bomb") as info:
            call(path)
        assert str(path) in str(info.value)
    # Pillow's own hard limit (2 * MAX_IMAGE_PIXELS) is reported the same way.
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(path, max_pixels=10**10)


def test_our_limit_decides_and_pillow_warning_never_escapes(
    tmp_path: Path, no_warnings: None
) -> None:
    # 96M pixels: above Pillow's warning threshold (~89.5M), below DEFAULT_MAX_PIXELS.
    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS < 12000 * 8000 <= DEFAULT_MAX_PIXELS
    path = imagegen.bomb_png(tmp_path, 12000, 8000)
    assert image_size(path) == (12000, 8000)
    with pytest.raises(ImageError, match="exceeds the limit of 90000000"):
        image_size(path, max_pixels=90_000_000)


def test_small_limit_refuses_real_image(tmp_path: Path) -> None:
    path = imagegen.jpeg(tmp_path, 200, 100)
    assert load_image(path, max_pixels=20_000).shape == (100, 200, 3)
    with pytest.raises(ImageError, match="20000 pixels exceeds the limit of 19999"):
        load_image(path, max_pixels=19_999)
    with pytest.raises(ImageError, match="decompression bomb"):
        prepare_image(path, bucket_for, max_pixels=19_999)


# --- modes -------------------------------------------------------------------------------------


def test_grey_jpeg_replicated(tmp_path: Path) -> None:
    with Image.open(imagegen.grey_jpeg(tmp_path)) as im:
        assert im.mode == "L"
    pixels = load_image(tmp_path / "grey.jpg")
    check_rgb(pixels, 48, 64)
    assert_close(pixels, (100, 100, 100), 1)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_rgba_alpha_dropped_not_composited(tmp_path: Path) -> None:
    pixels = load_image(imagegen.rgba_png(tmp_path))
    check_rgb(pixels, 40, 60)
    assert (pixels[:, :30] == (10, 20, 30)).all()
    assert (pixels[:, 30:] == (200, 100, 50)).all()


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_png(tmp_path: Path, transparency: bool, no_warnings: None) -> None:
    path = imagegen.palette_png(tmp_path, transparency)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert ("transparency" in im.info) == transparency
    pixels = load_image(path)
    check_rgb(pixels, 20, 40)
    assert (pixels[:, :20] == imagegen.RED).all()
    assert (pixels[:, 20:] == imagegen.BLUE).all()


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = imagegen.cmyk_jpeg(tmp_path)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    pixels = load_image(path)
    check_rgb(pixels, 48, 64)
    assert_close(pixels, (0, 255, 255), 3)


def test_16bit_png_scaled_not_clipped(tmp_path: Path) -> None:
    path = imagegen.grey16_png(tmp_path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
    pixels = load_image(path)
    check_rgb(pixels, 8, 256)
    values = imagegen.gradient16_values().astype(np.int64)
    expected = np.floor(values * 255 / 65535 + 0.5).astype(np.uint8)
    assert (pixels[3, :, 1] == expected).all()
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255
    assert pixels[0, 128, 0] == 128  # 32896 * 255 / 65535 = 128.0
    # Monotone and spanning the whole range, unlike a clipping conversion.
    assert (np.diff(pixels[0, :, 0].astype(int)) >= 0).all()
    assert len(np.unique(pixels[0, :, 0])) == 256


def test_int32_and_float_modes(tmp_path: Path) -> None:
    pixels = load_image(imagegen.int32_tiff(tmp_path))
    check_rgb(pixels, 4, 4)
    assert pixels[0, :, 0].tolist() == [0, 128, 255, 255]
    pixels = load_image(imagegen.float_tiff(tmp_path))
    check_rgb(pixels, 3, 5)
    assert pixels[0, :, 2].tolist() == [0, 0, 128, 255, 0]


def test_bilevel_grey_alpha_ycbcr(tmp_path: Path) -> None:
    pixels = load_image(imagegen.bilevel_png(tmp_path))
    check_rgb(pixels, 16, 32)
    assert (pixels[:, :16] == 0).all() and (pixels[:, 16:] == 255).all()
    pixels = load_image(imagegen.grey_alpha_png(tmp_path))
    assert (pixels == 100).all()
    path = imagegen.ycbcr_tiff(tmp_path)
    with Image.open(path) as im:
        assert im.mode == "YCbCr"
    assert_close(load_image(path), (128, 128, 128), 1)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    path = imagegen.animated_gif(tmp_path)
    with Image.open(path) as im:
        assert im.n_frames == 3
    pixels = load_image(path)
    check_rgb(pixels, 24, 32)
    assert (pixels == imagegen.RED).all()


# --- orientation -------------------------------------------------------------------------------


def test_exif_orientation_6(tmp_path: Path) -> None:
    path = imagegen.exif_rotated_jpeg(tmp_path, 6)
    with Image.open(path) as im:
        assert im.size == (40, 20)
    assert image_size(path) == (20, 40)
    pixels = load_image(path)
    check_rgb(pixels, 40, 20)
    # Stored RED | BLUE, rotated 90 degrees clockwise: RED on top, BLUE below.
    assert_close(pixels[2:18], imagegen.RED, 40)
    assert_close(pixels[22:38], imagegen.BLUE, 40)


@pytest.mark.parametrize(
    ("orientation", "size"), [(1, (40, 20)), (3, (40, 20)), (5, (20, 40)), (8, (20, 40))]
)
def test_other_orientations(tmp_path: Path, orientation: int, size: tuple[int, int]) -> None:
    path = imagegen.exif_rotated_jpeg(tmp_path, orientation)
    assert image_size(path) == size
    assert load_image(path).shape == (size[1], size[0], 3)


def test_png_exif_orientation(tmp_path: Path) -> None:
    early = imagegen.exif_rotated_png(tmp_path)
    assert image_size(early) == (20, 40)
    late = imagegen.exif_rotated_png(tmp_path, late=True)
    # Documented limitation: the header read does not see EXIF stored after the pixels...
    assert image_size(late) == (40, 20)
    # ...but decoding does, and prepare_image reports the displayed size and its bucket.
    for path in (early, late):
        pixels = load_image(path)
        assert (pixels[:20] == imagegen.RED).all() and (pixels[20:] == imagegen.BLUE).all()
        prepared = prepare_image(path, bucket_for)
        assert (prepared.width, prepared.height) == (20, 40)
        assert prepared.bucket == bucket_for(20, 40)


# --- arrays ------------------------------------------------------------------------------------


def test_arrays() -> None:
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    assert load_image(rgb) is rgb
    assert image_size(rgb) == (5, 4)
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    out = load_image(grey)
    check_rgb(out, 4, 5)
    assert (out == grey[:, :, None]).all()
    rgba = np.dstack([rgb, np.full((4, 5), 7, np.uint8)])
    out = load_image(rgba)
    check_rgb(out, 4, 5)
    assert (out == rgb).all()
    # A strided view is made contiguous.
    check_rgb(load_image(rgb[:, ::2]), 4, 3)


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((4, 5, 3), np.float32), "dtype float32"),
        (np.zeros((4, 5, 3), np.uint16), "dtype uint16"),
        (np.zeros((4, 5, 3), bool), "dtype bool"),
        (np.zeros((4, 5, 2), np.uint8), "shape"),
        (np.zeros((4, 5, 1), np.uint8), "shape"),
        (np.zeros((2, 4, 5, 3), np.uint8), "shape"),
        (np.zeros(5, np.uint8), "shape"),
        (np.zeros((0, 5, 3), np.uint8), "no pixels"),
    ],
)
def test_bad_arrays(array: np.ndarray, reason: str) -> None:
    with pytest.raises(ImageError, match=reason) as info:
        load_image(array)
    assert str(info.value).startswith(describe(array))
    with pytest.raises(ImageError):
        prepare_image(array, bucket_for)


# --- draft mode --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return imagegen.jpeg(tmp_path_factory.mktemp("big"), 4000, 3000, name="big.jpg")


def test_draft_reduces_decode_size(big_jpeg: Path) -> None:
    assert load_image(big_jpeg).shape == (3000, 4000, 3)
    pixels = load_image(big_jpeg, min_size=(576, 448))
    # min(4000 // 576, 3000 // 448) = 6, so libjpeg decodes at 1/4.
    check_rgb(pixels, 750, 1000)


def test_draft_content_matches_full_decode(big_jpeg: Path) -> None:
    drafted = resize_to(load_image(big_jpeg, min_size=(576, 448)), (576, 448))
    full = resize_to(load_image(big_jpeg), (576, 448))
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 2.0


def test_draft_needs_twice_the_size(big_jpeg: Path) -> None:
    # 4000 < 2 * 2001: no reduction possible without going below min_size.
    assert load_image(big_jpeg, min_size=(2001, 448)).shape == (3000, 4000, 3)
    # Never below min_size: 4000 // 1000 = 4, 3000 // 1400 = 2 -> 1/2.
    assert load_image(big_jpeg, min_size=(1000, 1400)).shape == (1500, 2000, 3)


def test_draft_with_exif_rotation(tmp_path: Path) -> None:
    # Stored 2400x600, displayed 600x2400. In stored orientation min_size (250, 1000) becomes
    # (1000, 250): 1/2 scale is allowed; unswapped, 600 < 2 * 1000 would forbid it.
    stored = imagegen.photo_like(2400, 600)
    path = imagegen.exif_rotated_jpeg(tmp_path, 6, pixels=stored, name="tall.jpg")
    assert image_size(path) == (600, 2400)
    pixels = load_image(path, min_size=(250, 1000))
    check_rgb(pixels, 1200, 300)
    # The reduced decode is rotated like the full one.
    full = load_image(path)
    check_rgb(full, 2400, 600)
    diff = resize_to(full, (300, 1200)).astype(int) - pixels.astype(int)
    assert np.abs(diff).mean() < 3.0
    # And the full decode is the stored image turned clockwise (np.rot90 turns counterclockwise).
    assert np.abs(np.rot90(full, k=1).astype(int) - stored.astype(int)).mean() < 3.0


def test_draft_mpo(tmp_path: Path) -> None:
    path = imagegen.mpo(tmp_path, 2000, 1500)
    with Image.open(path) as im:
        assert im.format == "MPO"
    check_rgb(load_image(path, min_size=(448, 336)), 375, 500)


def test_draft_ignored_for_png(tmp_path: Path) -> None:
    path = imagegen.save(tmp_path, "big.png", Image.fromarray(imagegen.photo_like(1200, 900)))
    assert load_image(path, min_size=(224, 224)).shape == (900, 1200, 3)


@pytest.mark.parametrize("bad", [(0, 5), (5,), [5, 5], (5.0, 5), (True, 5)])
def test_bad_min_size(big_jpeg: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="min_size"):
        load_image(big_jpeg, min_size=bad)  # type: ignore[arg-type]


# --- resize and prepare ------------------------------------------------------------------------


def test_resize_to_same_size_is_identity() -> None:
    pixels = imagegen.photo_like(64, 48)
    assert resize_to(pixels, (64, 48)) is pixels


def test_resize_to_sizes() -> None:
    pixels = imagegen.photo_like(500, 375)
    check_rgb(resize_to(pixels, (576, 448)), 448, 576)
    check_rgb(resize_to(pixels, (224, 1184)), 1184, 224)
    with pytest.raises(ValueError, match="size"):
        resize_to(pixels, (0, 10))
    with pytest.raises(ImageError):
        resize_to(pixels[:, :, 0], (10, 10))


def test_resize_to_antialiases_when_shrinking() -> None:
    # A one-pixel checkerboard shrunk 4x: an antialiased filter averages it to mid grey, a plain
    # 2x2 bilinear sample would keep values near 0 and 255.
    board = (np.indices((400, 400)).sum(axis=0) % 2 * 255).astype(np.uint8)
    small = resize_to(np.repeat(board[:, :, None], 3, axis=2), (100, 100))
    assert small.min() >= 100 and small.max() <= 155


@pytest.mark.parametrize("photo", PHOTOS, ids=[p.name for p in PHOTOS])
def test_prepare_real_photos(photo: Path) -> None:
    with Image.open(photo) as im:
        width, height = im.size
    prepared = prepare_image(photo, bucket_for)
    assert isinstance(prepared, PreparedImage)
    assert (prepared.width, prepared.height) == (width, height)
    assert prepared.bucket == bucket_for(width, height)
    check_rgb(prepared.pixels, prepared.bucket[1], prepared.bucket[0])
    # Real photos: plenty of distinct colours survive.
    assert len(np.unique(prepared.pixels.reshape(-1, 3), axis=0)) > 1000
    # Bytes give the same result as the path.
    again = prepare_image(photo.read_bytes(), bucket_for)
    assert (again.pixels == prepared.pixels).all()


def test_test_photos_present() -> None:
    assert 4 <= len(PHOTOS) <= 6
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 300_000
    ratios = set()
    for photo in PHOTOS:
        with Image.open(photo) as im:
            assert im.format == "JPEG"
            ratios.add(bucket_for(*im.size))
    assert len(ratios) >= 4


def test_prepare_image_at_bucket_size_is_not_resampled(tmp_path: Path) -> None:
    path = imagegen.jpeg(tmp_path, 576, 448)
    prepared = prepare_image(path, bucket_for)
    assert prepared.bucket == (576, 448)
    assert (prepared.pixels == load_image(path)).all()


def test_prepare_image_draft_and_array(big_jpeg: Path) -> None:
    prepared = prepare_image(big_jpeg, bucket_for)
    assert (prepared.width, prepared.height, prepared.bucket) == (4000, 3000, (576, 448))
    check_rgb(prepared.pixels, 448, 576)
    calls: list[tuple[int, int]] = []

    def recording(w: int, h: int) -> tuple[int, int]:
        calls.append((w, h))
        return 224, 224

    array = imagegen.photo_like(300, 200)
    prepared = prepare_image(array, recording)
    assert calls == [(300, 200)]
    assert (prepared.width, prepared.height, prepared.bucket) == (300, 200, (224, 224))
    check_rgb(prepared.pixels, 224, 224)


def test_prepare_image_exif_rotated(tmp_path: Path) -> None:
    stored = imagegen.photo_like(2400, 600)
    path = imagegen.exif_rotated_jpeg(tmp_path, 6, pixels=stored, name="tall.jpg")
    prepared = prepare_image(path, bucket_for)
    assert (prepared.width, prepared.height) == (600, 2400)
    assert prepared.bucket == bucket_for(600, 2400) == (256, 1024)
    check_rgb(prepared.pixels, 1024, 256)


def test_runtime_does_not_import_torch() -> None:
    code = (
        "import sys, interactive_features.runtime.images, interactive_features.runtime.buckets; "
        "sys.exit('torch' in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_non_photo_formats_are_refused(tmp_path: Path) -> None:
    """EPS would be handed to Ghostscript: only raster photo formats are opened."""
    path = tmp_path / "drawing.eps"
    Image.new("RGB", (8, 8), "red").save(path, format="EPS")
    with pytest.raises(ImageError, match="not an image"):
        load_image(path)


def test_special_files_are_never_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("Image.open called on a special file")

    monkeypatch.setattr(Image, "open", never)
    for source, reason in [
        (fifo, "not a regular file (FIFO); not opened"),
        ("/dev/zero", "not a regular file (character device); not opened"),
        ("/proc/self/status", "not a regular file (/proc or /sys pseudo-file); not opened"),
    ]:
        for call in (load_image, image_size):
            with pytest.raises(ImageError) as info:
                call(source)
            assert str(info.value) == f"{source}: {reason}"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (errno.EACCES, "permission denied"),
        (errno.EIO, "input/output error while reading"),
        (errno.ENOENT, "no such file"),  # vanished between the stat and the open
    ],
)
def test_file_errors_are_not_called_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, reason: str
) -> None:
    path = imagegen.jpeg(tmp_path, 64, 64)

    def failing(*args: object, **kwargs: object) -> None:
        raise OSError(error, os.strerror(error), str(path))

    monkeypatch.setattr(Image, "open", failing)
    with pytest.raises(ImageError, match=f"photo.jpg: {reason}") as info:
        load_image(path)
    assert "corrupt" not in str(info.value)


def test_link_and_name_problems(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.symlink_to("nowhere.jpg")
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    cases = {
        broken: "broken symbolic link (to nowhere.jpg)",
        loop: "too many levels of symbolic links (a symlink loop?)",
        tmp_path / ("y" * 300 + ".jpg"): "file name too long",
        imagegen.jpeg(tmp_path, 8, 8) / "x.jpg": "no such file (a component of the path is not a "
        "directory)",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageError) as info:
            load_image(path)
        assert info.value.reason == reason


def test_non_utf8_name_in_messages(tmp_path: Path) -> None:
    path = tmp_path / os.fsdecode(b"bad\xff.jpg")
    path.write_bytes(b"not an image")
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.label == f"{tmp_path}/bad\\xff.jpg"
    str(info.value).encode("utf-8")  # printable, storable
