"""Inputs: list files relative to their folder, AVIF/HEIC, embedded ICC profiles, PIL images."""

from __future__ import annotations

import io
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from interactive_features.runtime import Extractor, images
from interactive_features.runtime.images import ImageError, image_size, load_image, prepare_image
from interactive_features.runtime.index import IndexOptions, run_index, source_id
from interactive_features.runtime.index_local import LocalExecutor
from interactive_features.runtime.index_sources import iter_sources
from PIL import Image, ImageCms, features

import imagegen

INLINE = LocalExecutor(workers=0)


# ------------------------------------------------------------------------------------------------
# List files: relative entries are relative to the list's folder


def _lists(folder: Path, entries: list[str]) -> list[tuple[Path, list[str]]]:
    """The entries as a text list, and (but for names that are not UTF-8) Parquet and CSV."""
    text = folder / "list.txt"
    with open(text, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("# comment\n" + "\n".join(entries) + "\n")
    utf8 = [e for e in entries if e.isprintable()]
    pq.write_table(pa.table({"path": utf8}), folder / "list.parquet")
    pacsv.write_csv(pa.table({"path": utf8}), folder / "list.csv")
    return [(text, entries), (folder / "list.parquet", utf8), (folder / "list.csv", utf8)]


def test_list_entries_resolve_from_the_list_folder(tmp_path: Path, monkeypatch) -> None:
    sub = tmp_path / "lists"
    (sub / "photos").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    a = imagegen.jpeg(sub / "photos", 32, 32, name="a.jpg")
    b = imagegen.jpeg(tmp_path / "elsewhere", 32, 32, name="b.jpg")
    odd = os.fsdecode(b"c\xff.jpg")  # not UTF-8: surrogateescape all the way
    (sub / "photos" / odd).write_bytes(a.read_bytes())
    entries = ["photos/a.jpg", "./photos/a.jpg", str(b), "../elsewhere/b.jpg", f"photos/{odd}"]
    want = [str(a), str(a), str(b), str(b), str(sub / "photos" / odd)]
    other = tmp_path / "cwd"
    other.mkdir()
    monkeypatch.chdir(other)
    for listing, listed in _lists(sub, entries):
        got = list(iter_sources(listing))
        assert got[2] == str(b)  # absolute: unchanged
        assert [os.path.abspath(p) for p in got] == want[: len(listed)]
        assert all(os.path.isfile(p) for p in got)
        # spelled relatively from another directory: the same files, the same ids
        relative = os.path.relpath(listing, other)
        assert [source_id(p) for p in iter_sources(Path(relative))] == [source_id(p) for p in got]
    monkeypatch.chdir(sub)  # a list in the current directory: entries as listed
    assert list(iter_sources(Path("list.txt"))) == entries


def test_outdir_from_a_relative_list_resumes_from_another_cwd(
    narrow_engine: Path, tmp_path: Path, monkeypatch
) -> None:
    sub = tmp_path / "lists"
    (sub / "photos").mkdir(parents=True)
    for i in range(3):
        imagegen.jpeg(sub / "photos", 256, 256, name=f"p{i}.jpg", seed=i)
    (sub / "list.txt").write_text("".join(f"photos/p{i}.jpg\n" for i in range(3)))
    monkeypatch.chdir(tmp_path)
    first = run_index(Path("lists/list.txt"), narrow_engine, Path("out"), IndexOptions(), INLINE)
    assert first.new == 3 and first.errors == 0
    monkeypatch.chdir(sub)
    again = run_index(Path("list.txt"), narrow_engine, Path("../out"), IndexOptions(), INLINE)
    assert again.new == 0 and again.gone == 0 and again.written_shards == 0
    table = pq.read_table(tmp_path / "out")
    assert table["status"].to_pylist() == ["ok"] * 3


# ------------------------------------------------------------------------------------------------
# Formats


def test_ghostscript_formats_stay_blocked(tmp_path: Path) -> None:
    assert not {"EPS", "PDF", "PS"} & set(images.allowed_formats())
    eps = tmp_path / "x.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    pdf = tmp_path / "x.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    for path in (eps, pdf):
        with pytest.raises(ImageError, match="not an image"):
            load_image(path)


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")
def test_avif_decodes(tmp_path: Path) -> None:
    pixels = imagegen.photo_like(48, 32)
    path = tmp_path / "x.avif"
    Image.fromarray(pixels).save(path, quality=100)
    assert image_size(path) == (48, 32)
    got = load_image(path)
    assert got.shape == (32, 48, 3)
    np.testing.assert_array_equal(got, np.array(Image.open(path).convert("RGB")))
    assert np.abs(got.astype(int) - pixels).mean() < 8  # lossy, but the same picture
    assert list(iter_sources(tmp_path)) == [str(path)]


def test_heic_without_the_plugin_says_what_it_needs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(images, "allowed_formats", lambda: images.PHOTO_FORMATS)
    heic = tmp_path / "x.heic"
    heic.write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64))
    with pytest.raises(ImageError) as err:
        load_image(heic)
    assert err.value.reason == images.HEIC_HINT and "pip install pillow-heif" in str(err.value)
    avif = tmp_path / "x.avif"
    avif.write_bytes(b"\0\0\0\x1cftypavif" + bytes(64))
    with pytest.raises(ImageError, match="cannot decode AVIF"):
        load_image(avif.read_bytes())


def test_heic_with_pillow_heif(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif not installed")
    assert "HEIF" in images.allowed_formats()
    path = tmp_path / "x.heic"
    pixels = imagegen.photo_like(64, 48)
    heif = pillow_heif.from_pillow(Image.fromarray(pixels))
    heif.save(str(path), quality=95)
    assert image_size(path) == (64, 48)
    got = load_image(path)
    assert got.shape == (48, 64, 3) and np.abs(got.astype(int) - pixels).mean() < 12
    assert prepare_image(path.read_bytes(), lambda w, h: (32, 24)).pixels.shape == (24, 32, 3)


# ------------------------------------------------------------------------------------------------
# ICC profiles


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def matrix_profile(description: str = "Wide test RGB", gamma: float = 2.2) -> bytes:
    """An ICC v2 RGB matrix/TRC display profile with wide (Adobe-RGB-like, D50-adapted)
    primaries: a real RGB profile that is not sRGB."""

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)

    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    text = description.encode() + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.6097, 0.3111, 0.0195)),
        (b"gXYZ", xyz(0.2053, 0.6257, 0.0609)),
        (b"bXYZ", xyz(0.1492, 0.0632, 0.7446)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        (b"cprt", b"text\0\0\0\0no copyright\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = struct.pack(">I4sI4s4s4s", size, b"lcms", 0x02100000, b"mntr", b"RGB ", b"XYZ ")
    header += bytes(12) + b"acsp" + bytes(4 * 4 + 8 + 4)
    header += _s15(0.9642) + _s15(1.0) + _s15(0.8249) + bytes(4 + 16 + 28)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def _with_profile(tmp_path: Path, icc: bytes | None, name: str, fmt: str = "PNG") -> Path:
    im = Image.fromarray(imagegen.photo_like(40, 30, seed=3))
    path = tmp_path / name
    im.save(path, fmt, **({"icc_profile": icc} if icc is not None else {}))
    return path


def test_a_wide_gamut_profile_is_converted_to_srgb(tmp_path: Path) -> None:
    icc = matrix_profile()
    srgb = ImageCms.createProfile("sRGB")
    for fmt, name in (("PNG", "wide.png"), ("JPEG", "wide.jpg")):
        path = _with_profile(tmp_path, icc, name, fmt)
        raw = Image.open(path).convert("RGB")
        want = ImageCms.profileToProfile(
            raw, ImageCms.ImageCmsProfile(io.BytesIO(icc)), srgb, outputMode="RGB"
        )
        got = load_image(path)
        np.testing.assert_array_equal(got, np.array(want))
        assert not np.array_equal(got, np.array(raw))  # the profile did change the pixels
        bucket = prepare_image(path, lambda w, h: (w, h)).pixels
        np.testing.assert_array_equal(bucket, got)


def test_srgb_absent_or_broken_profiles_leave_pixels_alone(tmp_path: Path, caplog) -> None:
    plain = load_image(_with_profile(tmp_path, None, "plain.png"))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    named = matrix_profile("sRGB IEC61966-2.1", gamma=2.2)
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    with caplog.at_level(logging.DEBUG, logger="interactive_features.runtime.images"):
        for i, icc in enumerate([srgb, named, lab, b"not a profile at all" * 10]):
            got = load_image(_with_profile(tmp_path, icc, f"p{i}.png"))
            assert got.tobytes() == plain.tobytes()
    assert "not RGB: ignored" in caplog.text  # LAB
    assert "embedded ICC profile ignored" in caplog.text  # not a profile


# ------------------------------------------------------------------------------------------------
# PIL images as inputs


def test_pil_images_decode_like_files(tmp_path: Path) -> None:
    rotated = imagegen.exif_rotated_jpeg(tmp_path, 6)
    im = Image.open(rotated)
    assert image_size(im) == (20, 40)
    np.testing.assert_array_equal(load_image(im), load_image(rotated))
    assert im.size == (40, 20) and im.getexif().get(0x0112) == 6  # the caller's, untouched
    palette = imagegen.palette_png(tmp_path)
    np.testing.assert_array_equal(load_image(Image.open(palette)), load_image(palette))
    wide = _with_profile(tmp_path, matrix_profile(), "wide.png")
    np.testing.assert_array_equal(load_image(Image.open(wide)), load_image(wide))
    prepared = prepare_image(Image.open(rotated), lambda w, h: (w * 2, h * 2))
    assert (prepared.width, prepared.height, prepared.bucket) == (20, 40, (40, 80))
    assert "PIL image RGB 40x20" in images.describe(im)
    closed = Image.open(rotated)
    closed.close()
    with pytest.raises(ImageError):
        load_image(closed)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(Image.new("L", (200, 200)), max_pixels=100)


def test_extract_accepts_pil_images(narrow_engine: Path, tmp_path: Path) -> None:
    path = imagegen.jpeg(tmp_path, 256, 256)
    with Extractor.open(narrow_engine) as ex:
        from_path = ex.extract([path])
        mixed = ex.extract([Image.open(path), path.read_bytes(), path])
    for layer in ex.layers:
        for i in range(3):
            np.testing.assert_allclose(mixed[layer][i], from_path[layer][0], rtol=1e-5, atol=1e-6)
