"""Property-based tests (hypothesis): whatever the bytes, the decoder raises only its own error.

Arbitrary bytes rarely get past the format sniffer, so the strategies also start from real
headers (each format's magic bytes, a valid small image) and cut, extend or flip them: that
is what reaches the header parsers and OpenCV.
"""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from keeneye.data.decode import DecodeError, decode_image_bytes, probe
from keeneye.serving.inputs import ImageRejected, prepare_image
from keeneye.serving.settings import ServeSettings


def _valid(fmt: str) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


VALID = [_valid(fmt) for fmt in ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")]
MAGIC = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP", b"GIF89a",
         b"\x00\x00\x00\x18ftypheic"]


@st.composite
def image_like(draw) -> bytes:
    """Arbitrary bytes, a magic number followed by noise, or a valid image cut / flipped / padded."""
    kind = draw(st.sampled_from(["noise", "magic", "mutated"]))
    if kind == "noise":
        return draw(st.binary(max_size=400))
    if kind == "magic":
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=40))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=image_like(), size=st.sampled_from([None, 8, 32]))
def test_decoder_raises_only_decode_error(data, size):
    try:
        image = decode_image_bytes(data, size)
    except DecodeError as exc:
        assert exc.reason
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        if size is not None:
            assert image.shape[:2] == (size, size)
    fmt, declared, cut_short = probe(data)  # the header reader never raises
    assert fmt is None or isinstance(fmt, str)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=image_like())
def test_service_image_check_raises_only_image_rejected(data):
    try:
        image = prepare_image(data, 16, ServeSettings())
    except ImageRejected as exc:
        assert exc.code and exc.message
    else:
        assert image.shape == (16, 16, 3)
