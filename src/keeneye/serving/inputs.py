"""Turning an HTTP request into images, or into a precise reason why not.

Two kinds of failure, kept apart on purpose:

* `RequestRejected` — the request as a whole is unusable (empty body, malformed JSON, wrong
  content type, too large, too many images). It becomes a 4xx JSON error.
* `ImageRejected` — one image of the request is unusable (not an image, truncated, too many
  pixels, format not accepted...). It is reported in that image's slot of the response; the
  other images of the request are still predicted.

Everything here is synchronous and runs in the server's decode threads, never on the event loop.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydantic_core

# The format sniffer and header readers live in the decoder (one place for magic bytes); the
# server needs them *before* decoding, to enforce its own pixel limit and format list.
from keeneye.data.decode import DecodeError, decode_image_bytes, probe
from keeneye.errors import ServiceError
from keeneye.data.preprocess import InputSpec
from keeneye.serving.settings import ServeSettings

MAX_NAME_LENGTH = 200


class RequestRejected(ServiceError):
    """The whole request is unusable: answered with `status` and a JSON error body (serving/errors.py)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(code, message)
        self.status = status
        self.headers = headers or {}


class ImageRejected(ServiceError):
    """One image is unusable: reported in its own slot of the answer, or 422 when no image was usable."""


@dataclass
class Upload:
    """One image as received: its name and bytes, or the reason its bytes could not be read."""

    name: str
    data: bytes | None
    error: ImageRejected | None = None


def clean_name(name: str | None, index: int) -> str:
    name = (name or "").strip() or f"image-{index}"
    return name if len(name) <= MAX_NAME_LENGTH else name[: MAX_NAME_LENGTH - 3] + "..."


# --- request bodies ----------------------------------------------------------------------


def _b64decode(text: str) -> bytes:
    if text.startswith("data:"):  # data URL: data:image/png;base64,....
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise ImageRejected("invalid_base64", "data URL is not base64-encoded")
    if any(space in text for space in " \t\r\n"):  # tolerate line breaks (a copy, only when there are any)
        text = "".join(text.split())
    if len(text) % 4:
        text += "=" * (-len(text) % 4)
    try:  # reads the str's ASCII buffer in place: no copy of a 30 MB string (base64.b64decode makes two)
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageRejected("invalid_base64", f"'data' is not valid base64 ({exc})") from None


#: JSON bytes that open a container or separate values ('[', '{', ','). Base64 has none of them, so
#: a valid body holds a handful per image; counting them (bytes.count: no parsing, no allocation)
#: bounds how many Python objects parsing can create (`[],` * 10 million would become 10 million lists).
_JSON_STRUCTURE = (b"[", b"{", b",")
JSON_VALUES_PER_IMAGE = 16


def load_json(body: bytes, settings: ServeSettings) -> Any:
    """The one gate between request bytes and Python objects: size, value count, depth, then syntax.

    Parsed by pydantic-core (jiter, written in Rust, no recursion in Python), which also stops
    at 200 levels of nesting; `max_json_depth` is the tighter limit checked afterwards. Anything
    wrong becomes a RequestRejected (4xx): never a RecursionError, MemoryError or a 500.
    """
    if len(body) > settings.max_body_bytes:
        raise RequestRejected(413, "body_too_large", f"request body is larger than max_body_bytes={settings.max_body_bytes}")
    budget = JSON_VALUES_PER_IMAGE * settings.max_images_per_request + 16
    n_structure = sum(body.count(byte) for byte in _JSON_STRUCTURE)
    if n_structure > budget:
        raise RequestRejected(
            400, "json_too_complex",
            f"JSON body has {n_structure} arrays, objects or separators; at most {budget} are accepted "
            f"({JSON_VALUES_PER_IMAGE} per image for max_images_per_request={settings.max_images_per_request})",
        )
    try:
        document = pydantic_core.from_json(body)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise _too_deep(settings) from None
        raise RequestRejected(400, "malformed_json", f"malformed JSON: {exc}") from None
    if _depth_exceeds(document, settings.max_json_depth):
        raise _too_deep(settings)
    return document


def _too_deep(settings: ServeSettings) -> RequestRejected:
    return RequestRejected(
        400, "json_too_deep",
        f"JSON body is nested more than max_json_depth={settings.max_json_depth} levels deep "
        '(expected {"images": [{"name": ..., "data": ...}]}, 3 levels)',
    )


def _depth_exceeds(document: Any, limit: int) -> bool:
    """True when arrays/objects nest deeper than `limit` (iterative: no recursion to exhaust)."""
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_json_body(body: bytes, settings: ServeSettings) -> list[Upload]:
    """`{"images": [{"name": "a.jpg", "data": "<base64>"}, ...]}` -> uploads (RequestRejected otherwise)."""
    document = load_json(body, settings)
    if not isinstance(document, dict) or "images" not in document:
        raise RequestRejected(
            422, "invalid_request",
            'JSON body must be an object with an "images" list: {"images": [{"name": "a.jpg", "data": "<base64>"}]}',
        )
    images = document["images"]
    if not isinstance(images, list):
        raise RequestRejected(422, "invalid_request", f'"images" must be a list, got {type(images).__name__}')
    if not images:
        raise RequestRejected(400, "no_images", '"images" is empty: send at least one image')
    check_count(len(images), settings)
    uploads = []
    for index, item in enumerate(images):
        if not isinstance(item, dict):
            raise RequestRejected(422, "invalid_request", f'images[{index}] must be an object with "data" (base64) and optional "name"')
        name = item.get("name")
        if name is not None and not isinstance(name, str):
            raise RequestRejected(422, "invalid_request", f"images[{index}].name must be a string")
        data = item.get("data")
        if not isinstance(data, str):
            raise RequestRejected(422, "invalid_request", f'images[{index}].data must be a base64 string, got {type(data).__name__}')
        name = clean_name(name, index)
        try:
            uploads.append(Upload(name, _b64decode(data)))
        except ImageRejected as exc:
            uploads.append(Upload(name, None, exc))
    return uploads


def check_count(n_images: int, settings: ServeSettings) -> None:
    if n_images > settings.max_images_per_request:
        raise RequestRejected(
            413, "too_many_images",
            f"{n_images} images in one request; at most max_images_per_request={settings.max_images_per_request}",
        )


# --- one image ---------------------------------------------------------------------------


def prepare_image(data: bytes, size: int | InputSpec, settings: ServeSettings) -> np.ndarray:
    """Check the limits from the header, then decode and prepare as the model takes it (`size`: the
    bundle's InputSpec, resize rule and tiles; a plain size: squashed to (size, size, 3) uint8 RGB)."""
    if not data:
        raise ImageRejected("empty", "empty file (0 bytes)")
    if len(data) > settings.max_image_bytes:
        raise ImageRejected("file_too_large", f"{len(data)} bytes; at most max_image_bytes={settings.max_image_bytes}")
    fmt, declared, cut_short = probe(data)
    if fmt is None:
        raise ImageRejected("not_an_image", "not an image (unrecognised format)")
    if fmt not in settings.allowed_formats:
        raise ImageRejected("unsupported_format", f"{fmt} images are not accepted (allowed: {', '.join(settings.allowed_formats)})")
    if cut_short:
        raise ImageRejected("truncated", f"truncated {fmt} (the file ends inside its header)")
    if declared is None or not declared[0] or not declared[1]:
        raise ImageRejected("unreadable_header", f"the {fmt} header does not state the image size (corrupt or truncated)")
    width, height = declared
    if width * height > settings.max_pixels:
        raise ImageRejected(
            "too_many_pixels", f"image is {width}x{height} = {width * height} pixels; at most max_pixels={settings.max_pixels}",
        )
    try:
        if isinstance(size, InputSpec):
            return size.from_bytes(data)
        return decode_image_bytes(data, size)
    except DecodeError as exc:
        code = "truncated" if exc.reason.startswith("truncated") else "decode_error"
        raise ImageRejected(code, exc.reason) from None
