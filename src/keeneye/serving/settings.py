"""Serving settings: every limit of the REST service in one validated, JSON-serialisable object."""

from __future__ import annotations

from typing import Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keeneye.data.decode import FORMAT_EXTENSIONS, MAX_PIXELS
from keeneye.errors import ConfigError

MiB = 1024 * 1024

#: Formats the decoder can read, by the names `keeneye.data.decode` sniffs from magic bytes; by
#: default the service accepts all of them, the same rule as `train` and `predict` (by extension).
KNOWN_FORMATS = tuple(FORMAT_EXTENSIONS)
_FORMAT_ALIASES = {"JPG": "JPEG", "JPE": "JPEG", "TIF": "TIFF"}
DEFAULT_FORMATS = KNOWN_FORMATS

#: Micro-batching by default only where benchmarks/load_test.py measured it faster (2-core CPU,
#: 8 clients, one image per request; benchmarks/results/load_test_batching.json): ONNX Runtime answers one
#: image faster than it waits for a batch to form, TensorFlow gains from batches.
BATCHING_BY_ENGINE = {"onnx": False, "keras": True}


#: Peak copies in memory of a body of N bytes while it is read and parsed, by how it arrives (the
#: reasons are in serving/limits.py): what a request reserves from max_buffered_body_bytes per byte.
BODY_COPIES = {"json": 3, "multipart": 2, "raw": 1}

class ServeSettings(BaseModel):
    """Limits and batching of `keeneye serve` / `create_app` (all optional; defaults are safe)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str = Field("auto", description="Inference engine passed to Predictor ('auto' picks the fastest available).")
    batching: Optional[bool] = Field(
        None, description="Merge images of concurrent requests into one forward pass; None: the engine's default "
        "(BATCHING_BY_ENGINE, measured by benchmarks/load_test.py).",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="Most images in one forward pass.")
    max_batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="How long a request that finds the model idle waits for others to join its batch (under load, queued requests run at once).")
    max_body_bytes: int = Field(32 * MiB, ge=1024, description="Largest request body (413 beyond it).")
    max_json_depth: int = Field(
        16, ge=3, le=100,
        description='Deepest nesting of arrays/objects in a JSON body (400 beyond it); {"images": [{...}]} needs 3.',
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600,
        description="Longest time to receive one whole request body; a slower (or stalled) client gets 408 and the connection is closed.",
    )
    max_buffered_body_bytes: int = Field(
        128 * MiB, ge=1024,
        description=(
            "Memory for request bodies, all requests together: a request reserves its declared size (else max_body_bytes) "
            "times the copies it holds while parsed (1 for an image body, 2 for multipart or without Content-Length, 3 for base64 JSON); "
            "one that does not fit waits, its bytes left in the network, up to request_timeout_s (then 503). "
            "Unset: 128 MiB, or 3 x max_body_bytes when that is larger."
        ),
    )
    max_image_bytes: int = Field(16 * MiB, ge=1, description="Largest single encoded image (reported per image beyond it).")
    max_pixels: int = Field(
        50_000_000, ge=1, le=MAX_PIXELS,
        description="Largest width x height, read from the image header before decoding (decompression bombs).",
    )
    max_images_per_request: int = Field(32, ge=1, le=4096, description="Most images in one request (413 beyond it).")
    allowed_formats: Tuple[str, ...] = Field(DEFAULT_FORMATS, description="Accepted image formats (detected from the bytes, not the name).")
    max_pending_images: int = Field(1024, ge=1, description="Images waiting for the model before new requests get 503 (back-pressure).")
    request_timeout_s: float = Field(60.0, gt=0, description="Longest wait for the model per request (503 beyond it).")
    decode_threads: int = Field(2, ge=1, le=64, description="Threads that parse and decode uploads off the event loop.")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="On SIGTERM, how long in-flight requests may take to finish.")

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _normalise_formats(cls, value):
        if isinstance(value, str):
            value = [part for part in value.split(",")]
        names = []
        for item in value:
            name = str(item).strip().upper().lstrip(".")
            name = _FORMAT_ALIASES.get(name, name)
            if name not in KNOWN_FORMATS:
                raise ValueError(f"unknown image format {item!r} (known: {', '.join(KNOWN_FORMATS)})")
            if name not in names:
                names.append(name)
        if not names:
            raise ValueError("at least one image format must be allowed")
        return tuple(names)

    @model_validator(mode="before")
    @classmethod
    def _default_body_budget(cls, values):
        """Unset, the body budget grows with max_body_bytes so that the largest body always fits."""
        if isinstance(values, dict) and values.get("max_buffered_body_bytes") is None and "max_body_bytes" in values:
            try:
                largest = int(values["max_body_bytes"]) * max(BODY_COPIES.values())
            except (TypeError, ValueError):
                return values  # the field's own validation reports it
            values = {**values, "max_buffered_body_bytes": max(128 * MiB, largest)}
        return values

    @model_validator(mode="after")
    def _check_body_budget(self) -> "ServeSettings":
        largest = self.max_body_bytes * max(BODY_COPIES.values())
        if self.max_buffered_body_bytes < largest:
            raise ValueError(
                f"max_buffered_body_bytes={self.max_buffered_body_bytes} is smaller than {largest} "
                f"({max(BODY_COPIES.values())} x max_body_bytes={self.max_body_bytes}, what the largest JSON body occupies "
                "while parsed): a request of the largest accepted size could never be read"
            )
        return self

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, value: str) -> str:
        if not value or not value.strip():
            raise ValueError("must name an engine, e.g. 'auto'")
        return value.strip()


def make_settings(**values) -> ServeSettings:
    """ServeSettings from keyword values (None means 'default'); one ConfigError listing every mistake."""
    try:
        return ServeSettings(**{key: value for key, value in values.items() if value is not None})
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "settings"
            lines.append(f"serve setting {key}={error.get('input')!r}: {error['msg']}")
        raise ConfigError("\n".join(lines)) from None


def batching_for(settings: ServeSettings, engine_name: str) -> bool:
    """The batching mode the server runs with: the explicit setting, else the engine's measured default."""
    if settings.batching is not None:
        return settings.batching
    return BATCHING_BY_ENGINE.get(engine_name, True)
