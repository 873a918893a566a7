"""Tests for keeneye.data.decode: formats, colours, orientation, reduced decoding, bad files."""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from badfiles import (
    DROPPED,
    EXPECTED_REASONS,
    NON_ASCII_NAME,
    SKIPPED,
    USED,
    good_jpeg_bytes,
    make_bad_files_folder,
    textured_rgb,
)
from PIL import Image, ImageOps

from keeneye.data import decode as dec
from keeneye.data.decode import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    DecodeError,
    decode_image_bytes,
    load_image,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def pil_bytes(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def red_blue(height: int = 30, width: int = 40) -> np.ndarray:
    """Left half pure red, right half pure blue (RGB): catches BGR/RGB swaps and mirroring."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2] = RED
    img[:, width // 2 :] = BLUE
    return img


def assert_rgb_image(img: np.ndarray, shape: tuple[int, int]) -> None:
    assert img.dtype == np.uint8
    assert img.ndim == 3 and img.shape == (*shape, 3)
    assert img.flags["C_CONTIGUOUS"]


def assert_colour(pixel: np.ndarray, expected: tuple[int, int, int], tol: int = 6) -> None:
    assert np.abs(pixel.astype(int) - np.array(expected)).max() <= tol, (pixel, expected)


def reason_of(data: bytes, size: int | None = None) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image_bytes(data, size)
    assert str(info.value) == info.value.reason
    return info.value.reason


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# --- public constants -------------------------------------------------------------------


def test_image_extensions() -> None:
    assert isinstance(IMAGE_EXTENSIONS, frozenset)
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def test_decode_error_reason_and_pickle() -> None:
    err = DecodeError("empty file (0 bytes)")
    assert err.reason == str(err) == "empty file (0 bytes)"
    again = pickle.loads(pickle.dumps(err))  # crosses process boundaries intact
    assert again.reason == "empty file (0 bytes)"


# --- formats and colours ----------------------------------------------------------------

RGB_FORMATS = {
    "png": lambda im: pil_bytes(im, "PNG"),
    "jpeg": lambda im: pil_bytes(im, "JPEG", quality=95),
    "bmp": lambda im: pil_bytes(im, "BMP"),
    "tiff": lambda im: pil_bytes(im, "TIFF"),
    "tiff_lzw": lambda im: pil_bytes(im, "TIFF", compression="tiff_lzw"),
    "webp_lossless": lambda im: pil_bytes(im, "WEBP", lossless=True),
    "webp_lossy": lambda im: pil_bytes(im, "WEBP", quality=95),
    "gif": lambda im: pil_bytes(im, "GIF"),
    "palette_png": lambda im: pil_bytes(im.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG"),
    "cmyk_jpeg": lambda im: pil_bytes(im.convert("CMYK"), "JPEG", quality=95),
    "rgb16_png": lambda im: cv2.imencode(".png", np.asarray(im)[..., ::-1].astype(np.uint16) * 257)[1].tobytes(),
    "progressive_jpeg": lambda im: pil_bytes(im, "JPEG", quality=95, progressive=True),
}


@pytest.mark.parametrize("fmt", sorted(RGB_FORMATS))
def test_colour_formats_decode_to_rgb(fmt: str) -> None:
    data = RGB_FORMATS[fmt](Image.fromarray(red_blue()))
    img = decode_image_bytes(data)
    assert_rgb_image(img, (30, 40))
    tol = 12 if "webp_lossy" in fmt else 6
    assert_colour(img[15, 5], RED, tol)  # red on the left, in RGB order
    assert_colour(img[15, 35], BLUE, tol)


def test_cmyk_jpeg_from_new_image() -> None:
    # Pure red in CMYK is C=0, M=100%, Y=100%, K=0.
    data = pil_bytes(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_image_bytes(data)
    assert_rgb_image(img, (30, 40))
    assert_colour(img.reshape(-1, 3).mean(axis=0).round(), RED, 4)


def test_grayscale_png_becomes_three_equal_channels() -> None:
    gray = cv2.cvtColor(textured_rgb(), cv2.COLOR_RGB2GRAY)
    img = decode_image_bytes(pil_bytes(Image.fromarray(gray, "L"), "PNG"))
    assert_rgb_image(img, (30, 40))
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], gray)


def test_grayscale_jpeg() -> None:
    gray = cv2.cvtColor(textured_rgb(), cv2.COLOR_RGB2GRAY)
    img = decode_image_bytes(pil_bytes(Image.fromarray(gray, "L"), "JPEG", quality=95))
    assert_rgb_image(img, (30, 40))
    assert np.abs(img[..., 0].astype(int) - gray).mean() < 3


def test_16bit_gray_png_scaled_not_wrapped() -> None:
    # A full-range ramp 0..65535: scaled to 0..255 and monotonic, not wrapped modulo 256.
    ramp = np.linspace(0, 65535, 40, dtype=np.float64).round().astype(np.uint16)
    gray16 = np.tile(ramp, (30, 1))
    img = decode_image_bytes(cv2.imencode(".png", gray16)[1].tobytes())
    assert_rgb_image(img, (30, 40))
    row = img[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    assert np.abs(row - ramp / 257.0).max() <= 1.0
    assert (img[..., 0] == img[..., 2]).all()


def test_16bit_rgb_png_mid_values() -> None:
    bgr16 = np.zeros((30, 40, 3), np.uint16)
    bgr16[..., 2] = 65535  # R
    bgr16[..., 1] = 32768  # G
    img = decode_image_bytes(cv2.imencode(".png", bgr16)[1].tobytes())
    assert_colour(img[0, 0], (255, 128, 0), 1)


def test_rgba_png_alpha_is_dropped() -> None:
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., :3] = red_blue()
    rgba[..., 3] = 255
    rgba[:, :10, 3] = 0  # fully transparent, colour underneath is red
    img = decode_image_bytes(pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert_rgb_image(img, (30, 40))
    assert_colour(img[15, 2], RED, 0)  # dropped, not composited on white
    assert_colour(img[15, 35], BLUE, 0)


def test_gray_alpha_png() -> None:
    la = Image.fromarray(np.full((30, 40), 77, np.uint8), "L").convert("LA")
    img = decode_image_bytes(pil_bytes(la, "PNG"))
    assert_colour(img[0, 0], (77, 77, 77), 0)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.fromarray(np.full((30, 40, 3), c, np.uint8)) for c in (RED, BLUE)]
    data = pil_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert_colour(decode_image_bytes(data)[0, 0], RED, 0)


# --- size -------------------------------------------------------------------------------


def test_size_none_keeps_original_size() -> None:
    img = decode_image_bytes(good_jpeg_bytes(30, 40))
    assert_rgb_image(img, (30, 40))


@pytest.mark.parametrize(
    ("size", "interpolation"),
    [(20, cv2.INTER_AREA), (26, cv2.INTER_AREA), (27, cv2.INTER_LINEAR), (35, cv2.INTER_LINEAR), (64, cv2.INTER_LINEAR), (40, cv2.INTER_LINEAR)],
)
def test_resize_is_squash_with_documented_interpolation(size: int, interpolation: int) -> None:
    data = pil_bytes(Image.fromarray(textured_rgb(30, 40)), "PNG")
    full = decode_image_bytes(data)
    img = decode_image_bytes(data, size)
    assert_rgb_image(img, (size, size))
    np.testing.assert_array_equal(img, cv2.resize(full, (size, size), interpolation=interpolation))


def test_resize_to_same_size_is_identity() -> None:
    data = pil_bytes(Image.fromarray(textured_rgb(32, 32)), "PNG")
    np.testing.assert_array_equal(decode_image_bytes(data, 32), decode_image_bytes(data))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_invalid_size_is_a_programming_error(bad: object) -> None:
    with pytest.raises(ValueError):
        decode_image_bytes(good_jpeg_bytes(), bad)  # type: ignore[arg-type]


# --- EXIF orientation ---------------------------------------------------------------------


def jpeg_with_orientation(array: np.ndarray, orientation: int, **kwargs: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return pil_bytes(Image.fromarray(array), "JPEG", exif=exif.tobytes(), quality=95, **kwargs)


def test_exif_orientation_6_is_applied() -> None:
    # Orientation 6 = display rotated 90 degrees clockwise: left (red) ends up on top.
    data = jpeg_with_orientation(red_blue(30, 40), 6)
    img = decode_image_bytes(data)
    assert_rgb_image(img, (40, 30))
    assert_colour(img[2, 15], RED)
    assert_colour(img[37, 15], BLUE)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_exif_orientations_match_pillow(orientation: int) -> None:
    data = jpeg_with_orientation(textured_rgb(24, 40), orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    img = decode_image_bytes(data)
    assert img.shape == expected.shape
    assert np.abs(img.astype(int) - expected).mean() < 2


def test_exif_orientation_in_reduced_path(monkeypatch: pytest.MonkeyPatch) -> None:
    flags_seen = spy_imdecode(monkeypatch)
    data = jpeg_with_orientation(red_blue(600, 1000), 6)
    img = decode_image_bytes(data, 64)  # 1000x600 -> factor 8 (125x75 >= 64)
    assert flags_seen == [dec._FLAGS[8]]
    assert_rgb_image(img, (64, 64))
    assert_colour(img[3, 32], RED)  # red (left) rotated to the top
    assert_colour(img[60, 32], BLUE)


def test_exif_orientation_png() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = pil_bytes(Image.fromarray(red_blue(30, 40)), "PNG", exif=exif.tobytes())
    img = decode_image_bytes(data)
    assert img.shape == (40, 30, 3)
    assert_colour(img[2, 15], RED, 0)


# --- reduced-size JPEG decoding ------------------------------------------------------------


def spy_imdecode(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    real = cv2.imdecode

    def spy(buf: np.ndarray, flags: int) -> np.ndarray | None:
        seen.append(flags)
        return real(buf, flags)

    monkeypatch.setattr(dec.cv2, "imdecode", spy)
    return seen


@pytest.mark.parametrize(
    ("width", "height", "size", "factor"),
    [
        (3000, 2000, 224, 8),
        (1600, 1200, 224, 4),
        (800, 600, 224, 2),
        (447, 600, 224, 2),  # ceil(447 / 2) == 224 is still enough
        (446, 600, 224, 1),
        (224, 224, 224, 1),
        (100, 100, 224, 1),
        (1792, 1792, 224, 8),
    ],
)
def test_reduction_factor(width: int, height: int, size: int, factor: int) -> None:
    assert dec._reduction_factor(width, height, size) == factor


def test_reduced_sides_match_libjpeg_rounding() -> None:
    data = good_jpeg_bytes(301, 447)
    for factor in (2, 4, 8):
        out = cv2.imdecode(np.frombuffer(data, np.uint8), dec._FLAGS[factor])
        assert out.shape[:2] == (-(-301 // factor), -(-447 // factor))


def smooth_photo(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack(
        [127 + 100 * np.sin(x / 37), 127 + 100 * np.cos(y / 53), 127 + 100 * np.sin((x + y) / 71)], -1
    )
    img += np.random.default_rng(0).normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_reduced_decode_close_to_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    data = pil_bytes(Image.fromarray(smooth_photo(1200, 1600)), "JPEG", quality=90)
    full = cv2.imdecode(np.frombuffer(data, np.uint8), dec._FLAGS[1])
    reference = cv2.resize(full, (224, 224), interpolation=cv2.INTER_AREA)
    flags_seen = spy_imdecode(monkeypatch)
    img = decode_image_bytes(data, 224)
    assert flags_seen == [dec._FLAGS[4]]  # 1600x1200 -> 400x300 at 1/4
    assert_rgb_image(img, (224, 224))
    diff = np.abs(img.astype(int) - reference)
    assert diff.mean() < 1.5 and diff.max() < 20


def test_no_reduction_without_size_or_for_png(monkeypatch: pytest.MonkeyPatch) -> None:
    flags_seen = spy_imdecode(monkeypatch)
    decode_image_bytes(good_jpeg_bytes(480, 640))
    decode_image_bytes(pil_bytes(Image.fromarray(textured_rgb(480, 640)), "PNG"), 32)
    assert flags_seen == [dec._FLAGS[1], dec._FLAGS[1]]


def test_jpeg_header_parser() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    for kwargs in ({}, {"progressive": True}, {"exif": exif.tobytes()}):
        data = pil_bytes(Image.fromarray(textured_rgb(37, 53)), "JPEG", **kwargs)
        header = dec._jpeg_header(data)
        assert (header.width, header.height) == (53, 37)  # stored size, before rotation
        assert header.sos is not None and data[header.sos : header.sos + 2] == b"\xff\xda"
        assert not header.ran_out


# --- bad data --------------------------------------------------------------------------


def test_empty() -> None:
    assert reason_of(b"") == "empty file (0 bytes)"


@pytest.mark.parametrize(
    "data",
    [b"hello, this is text\n" * 5, bytes(100), b"<html><body>404</body></html>", b"\x00\x00\x00\x01Bud1"],
)
def test_not_an_image(data: bytes) -> None:
    assert reason_of(data) == "not an image (unrecognised format)"


@pytest.mark.parametrize("cut", [0.95, 0.5, 0.1])
def test_truncated_jpeg(cut: float) -> None:
    data = good_jpeg_bytes(120, 160, seed=3)
    assert reason_of(data[: int(len(data) * cut)]) == "truncated JPEG (no end-of-image marker)"


def test_truncated_jpeg_missing_only_eoi() -> None:
    data = good_jpeg_bytes()
    assert data.endswith(b"\xff\xd9")
    assert reason_of(data[:-2]) == "truncated JPEG (no end-of-image marker)"
    assert reason_of(data[:-2], 16) == "truncated JPEG (no end-of-image marker)"


def test_truncated_jpeg_with_exif_thumbnail_eoi() -> None:
    # The EXIF thumbnail's own EOI sits before the scan and must not count.
    thumb = good_jpeg_bytes(8, 8)
    app1 = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + b"\x00\x00" + bytes(4) + thumb
    data = good_jpeg_bytes(120, 160, seed=3)
    data = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    assert decode_image_bytes(data).shape == (120, 160, 3)
    assert reason_of(data[: len(data) * 3 // 4]) == "truncated JPEG (no end-of-image marker)"


def test_jpeg_trailing_bytes_after_eoi_are_fine() -> None:
    data = good_jpeg_bytes()
    expected = decode_image_bytes(data)
    np.testing.assert_array_equal(decode_image_bytes(data + b"CAMERA-TRAILER" * 10), expected)
    np.testing.assert_array_equal(decode_image_bytes(data + bytes(512)), expected)


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_png(cut: float) -> None:
    data = pil_bytes(Image.fromarray(textured_rgb(60, 80)), "PNG")
    assert reason_of(data[: int(len(data) * cut)]) == "truncated PNG (no IEND chunk)"
    assert reason_of(data[:-2]) == "truncated PNG (no IEND chunk)"


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP", "GIF"])
def test_truncated_other_formats_could_not_be_decoded(fmt: str) -> None:
    data = pil_bytes(Image.fromarray(textured_rgb(60, 80)), fmt)
    assert reason_of(data[: len(data) // 2]) == f"could not be decoded (corrupt or unsupported {fmt})"


def test_jpeg_magic_with_garbage_could_not_be_decoded() -> None:
    data = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"
    assert reason_of(data) == "could not be decoded (corrupt or unsupported JPEG)"


def test_heic_is_recognised_but_unsupported() -> None:
    data = struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic" + bytes(100)
    assert reason_of(data) == "could not be decoded (corrupt or unsupported HEIF/AVIF)"


def test_float_tiff_could_not_be_decoded() -> None:
    data = cv2.imencode(".tiff", np.full((8, 8, 3), 0.5, np.float32))[1].tobytes()
    assert reason_of(data).startswith("could not be decoded")


def jpeg_header_only(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xda" + struct.pack(">H", 12) + bytes(10) + b"\xff\xd9"


def test_huge_jpeg_refused_from_header() -> None:
    assert 20000 * 15000 > MAX_PIXELS
    assert reason_of(jpeg_header_only(20000, 15000)) == "image too large: 20000x15000"


def test_huge_png_refused_from_header() -> None:
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 15000, 8, 2, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")
    assert reason_of(data) == "image too large: 20000x15000"


def test_huge_bmp_and_gif_refused_from_header() -> None:
    bmp = b"BM" + bytes(12) + struct.pack("<Iii", 40, 30000, -30000) + bytes(40)
    assert reason_of(bmp) == "image too large: 30000x30000"
    gif = b"GIF89a" + struct.pack("<HH", 65535, 65535) + bytes(20)
    assert reason_of(gif) == "image too large: 65535x65535"


def test_max_pixels_boundary_not_refused_from_header() -> None:
    # Exactly at the limit is allowed by the header check (it then fails for lack of data).
    side = int(MAX_PIXELS**0.5)
    assert not reason_of(jpeg_header_only(side, side)).startswith("image too large")


def test_fuzzed_inputs_only_raise_decode_error() -> None:
    rng = np.random.default_rng(1234)
    seeds = [good_jpeg_bytes(24, 32), pil_bytes(Image.fromarray(textured_rgb(24, 32)), "PNG")]
    for base in seeds:
        for _ in range(60):
            data = bytearray(base)
            if rng.random() < 0.5:
                data = data[: int(rng.integers(1, len(data)))]
            for _ in range(int(rng.integers(1, 6))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
            try:
                img = decode_image_bytes(bytes(data), 16)
            except DecodeError as exc:
                assert exc.reason
            else:
                assert_rgb_image(img, (16, 16))


def test_accepts_bytearray_and_memoryview() -> None:
    data = good_jpeg_bytes()
    expected = decode_image_bytes(data)
    np.testing.assert_array_equal(decode_image_bytes(bytearray(data)), expected)
    np.testing.assert_array_equal(decode_image_bytes(memoryview(data)), expected)


# --- files -----------------------------------------------------------------------------


def test_load_image_non_ascii_path(tmp_path: Path) -> None:
    folder = tmp_path / "données_überprüfung_検査"
    folder.mkdir()
    path = folder / NON_ASCII_NAME
    path.write_bytes(pil_bytes(Image.fromarray(red_blue()), "PNG"))
    img = load_image(path)
    assert_colour(img[0, 0], RED, 0)
    assert load_image(str(path), 8).shape == (8, 8, 3)


def test_load_image_unreadable(tmp_path: Path) -> None:
    with pytest.raises(DecodeError) as info:
        load_image(tmp_path / "missing.jpg")
    assert info.value.reason == "unreadable: No such file or directory"
    with pytest.raises(DecodeError) as info:
        load_image(tmp_path)
    assert info.value.reason == "unreadable: Is a directory"


def test_bad_files_folder(tmp_path: Path) -> None:
    expected = make_bad_files_folder(tmp_path)
    assert set(expected.values()) == {USED, DROPPED, SKIPPED}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    for name, outcome in expected.items():
        path = tmp_path / name
        if outcome == USED:
            assert path.suffix.lower() in IMAGE_EXTENSIONS
            img = load_image(path)
            assert_rgb_image(img, (30, 40))
            assert img.std() > 5, name  # real content, not a constant or grey fill
            assert load_image(path, 224).shape == (224, 224, 3)
        elif outcome == DROPPED:
            assert path.suffix.lower() in IMAGE_EXTENSIONS
            with pytest.raises(DecodeError) as info:
                load_image(path)
            assert info.value.reason == EXPECTED_REASONS[name], name
        else:
            is_image_ext = path.suffix.lower() in IMAGE_EXTENSIONS
            assert not is_image_ext or name.startswith(".") or path.stem.endswith(("_mask", "_label"))
            if is_image_ext:
                load_image(path)  # masks are valid PNGs: skipping them is the scanner's job


def test_bad_files_truncated_jpeg_is_cut_inside_the_scan(tmp_path: Path) -> None:
    make_bad_files_folder(tmp_path)
    data = (tmp_path / "truncated.jpg").read_bytes()
    header = dec._jpeg_header(data)
    assert header.sos is not None and header.sos < len(data) - 1000


def test_bad_files_folder_is_deterministic(tmp_path: Path) -> None:
    first = make_bad_files_folder(tmp_path / "a")
    second = make_bad_files_folder(tmp_path / "b")
    assert first == second
    for name in first:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_bad_files_colours_right(tmp_path: Path) -> None:
    make_bad_files_folder(tmp_path)
    rgb = textured_rgb(30, 40, seed=1)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(int)
    for name in ("good_rgb.jpg", "cmyk.jpg", NON_ASCII_NAME):  # lossy: compare with Pillow's decode
        reference = np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)
        assert np.abs(load_image(tmp_path / name).astype(int) - reference).mean() < 2, name
    assert np.abs(load_image(tmp_path / "good_rgb.jpg").astype(int) - rgb).mean() < 5
    assert np.abs(load_image(tmp_path / "cmyk.jpg").astype(int) - rgb).mean() < 5
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgb)
    assert np.abs(load_image(tmp_path / "gray16.png")[..., 1].astype(int) - gray).max() <= 1
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png")[..., 0], gray)


def test_thread_pool_matches_serial() -> None:
    blobs = [good_jpeg_bytes(120, 160, seed=s) for s in range(12)]
    serial = [decode_image_bytes(b, 64) for b in blobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda b: decode_image_bytes(b, 64), blobs))
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(a, b)
