"""Build a folder holding one file of each awkward kind a real data set contains.

Shared by the decoder, scanner and CLI tests (import with ``from badfiles import ...``;
pytest puts ``tests/`` on ``sys.path``). Everything is generated, deterministic and small.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

USED = "used"
DROPPED = "dropped"
SKIPPED = "skipped"

NON_ASCII_NAME = "défaut_ß_画像.jpg"

#: The DecodeError reason each "dropped" file must produce.
EXPECTED_REASONS: dict[str, str] = {
    "empty.jpg": "empty file (0 bytes)",
    "truncated.jpg": "truncated JPEG (no end-of-image marker)",
    "text_named.jpg": "not an image (unrecognised format)",
}


def textured_rgb(height: int = 30, width: int = 40, seed: int = 0) -> np.ndarray:
    """A deterministic RGB uint8 image with gradients, edges and noise (not constant)."""
    y, x = np.mgrid[0:height, 0:width]
    r = x * 255 // max(width - 1, 1)
    g = y * 255 // max(height - 1, 1)
    b = ((x // 5 + y // 5) % 2) * 200 + 20
    img = np.stack([r, g, b], axis=-1).astype(np.int16)
    img += np.random.default_rng(seed).integers(-12, 13, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _pil_bytes(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _cv_bytes(ext: str, array: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, encoded = cv2.imencode(ext, array, params or [])
    assert ok, ext
    return encoded.tobytes()


def good_jpeg_bytes(height: int = 30, width: int = 40, seed: int = 0) -> bytes:
    """A valid baseline RGB JPEG (quality 95, no chroma subsampling: close to the source)."""
    image = Image.fromarray(textured_rgb(height, width, seed))
    return _pil_bytes(image, "JPEG", quality=95, subsampling=0)


def make_bad_files_folder(folder: Path) -> dict[str, str]:
    """Write the awkward files into ``folder``; return filename -> expected outcome.

    Outcomes: "used" (decodes to an image), "dropped" (has an image extension but must
    raise DecodeError, see EXPECTED_REASONS), "skipped" (decided from the name alone: not
    an image extension, hidden, or a ``*_mask`` / ``*_label`` segmentation file).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = textured_rgb(30, 40, seed=1)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)

    files: dict[str, tuple[bytes, str]] = {}
    files["good_rgb.jpg"] = (good_jpeg_bytes(30, 40, seed=1), USED)
    # 16-bit values spanning the full 0..65535 range (a naive cast to uint8 would wrap).
    gray16 = (gray.astype(np.uint16) * 257).astype(np.uint16)
    files["gray16.png"] = (_cv_bytes(".png", gray16), USED)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :10, 3] = 0  # a transparent band
    files["rgba.png"] = (_pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), USED)
    files["gray.png"] = (_cv_bytes(".png", gray), USED)
    files["cmyk.jpg"] = (_pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), USED)
    files[NON_ASCII_NAME] = (good_jpeg_bytes(30, 40, seed=2), USED)

    files["empty.jpg"] = (b"", DROPPED)
    # Cut a JPEG big enough that half-way lands inside the entropy-coded scan data.
    big = good_jpeg_bytes(120, 160, seed=3)
    files["truncated.jpg"] = (big[: len(big) // 2], DROPPED)
    files["text_named.jpg"] = (b"This is a text file that someone named .jpg\n" * 4, DROPPED)

    mask = ((rgb[..., 0] > 128) * 255).astype(np.uint8)
    files["something_mask.png"] = (_cv_bytes(".png", mask), SKIPPED)
    files["other_label.png"] = (_cv_bytes(".png", mask // 255), SKIPPED)
    files["notes.txt"] = ("Camera 2, line B.\n".encode(), SKIPPED)
    files[".DS_Store"] = (b"\x00\x00\x00\x01Bud1" + bytes(64), SKIPPED)

    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: outcome for name, (_, outcome) in files.items()}
