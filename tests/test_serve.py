"""The REST service against a real trained bundle (tiny_bundle: real MobileNetV2 weights, 96 px).

TestClient is always used as a context manager so the lifespan runs (model warm-up, batcher,
drain on exit). No model is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from badfiles import good_jpeg_bytes
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from keeneye.inference.predictor import Predictor
from keeneye.serving import ServeSettings, create_app, make_settings
from keeneye.serving.app import public_metadata
from keeneye.serving.batcher import MicroBatcher, Unavailable
from keeneye.errors import ConfigError

LIMITS = dict(max_body_bytes=2 * 1024 * 1024, max_image_bytes=1024 * 1024, max_pixels=4_000_000, max_images_per_request=4)


# --- helpers -------------------------------------------------------------------------------


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A genuine, valid 1-bit PNG of width x height zeros: a few KB that decode to width*height pixels."""
    row = b"\x00" * (1 + (width + 7) // 8)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(row * height, 9)) + _chunk(b"IEND", b"")


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(buffer, "GIF")
    return buffer.getvalue()


def codes(response) -> list:
    return [r["error"]["code"] if r["error"] else None for r in response.json()["results"]]


def all_strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from all_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from all_strings(v)
    elif isinstance(value, str):
        yield value


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(tiny_bundle) -> Predictor:
    return Predictor.from_bundle(tiny_bundle.run_dir)


@pytest.fixture(scope="module")
def image_paths(demo_data) -> list[Path]:
    """Three good and three defect test images, interleaved."""
    good = sorted((demo_data / "testing" / "good").glob("*.png"))[:3]
    defect = sorted((demo_data / "testing" / "defect").glob("*.png"))[:3]
    return [p for pair in zip(good, defect) for p in pair]


@pytest.fixture(scope="module")
def images(image_paths) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in image_paths}


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, ServeSettings(**LIMITS))) as test_client:
        yield test_client


def multipart(*named: tuple[str, bytes], content_type: str = "application/octet-stream") -> list:
    return [("files", (name, data, content_type)) for name, data in named]


# --- endpoints -----------------------------------------------------------------------------


def test_health_ready_docs(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert client.get("/docs").status_code == 200
    assert "x-request-id" in {k.lower() for k in ready.headers}


def test_metadata_from_a_bundle_path_has_no_paths(tiny_bundle, tmp_path):
    """Served from a folder (loaded at startup) whose metadata mentions training-machine paths."""
    import shutil

    copy = tmp_path / "served"
    shutil.copytree(tiny_bundle.run_dir, copy)
    metadata = json.loads((copy / "metadata.json").read_text())
    metadata["backbone"]["weights"] = "/home/trainer/secret/mobilenet_v2.h5"
    metadata["data"] = [{"path": "/home/trainer/secret/data/a.png", "label": "good"}, *metadata["data"]]
    metadata["data_folder_path"] = "/home/trainer/secret/data"
    (copy / "metadata.json").write_text(json.dumps(metadata))
    with TestClient(create_app(str(copy), ServeSettings(**LIMITS))) as test_client:
        served = test_client.get("/metadata").json()
    assert served["class_names"] == list(tiny_bundle.class_names)
    assert served["threshold"] == pytest.approx(tiny_bundle.threshold)
    assert served["backbone"]["weights"] == "mobilenet_v2.h5"
    assert served["data"][0] == {"label": "good"} and "data_folder_path" not in served
    assert served["serving"]["settings"]["max_pixels"] == LIMITS["max_pixels"] and served["serving"]["image_size"] == 96
    assert served["serving"]["bundle"] == "served"
    for text in all_strings(served):
        assert not text.startswith(("/", "~")), text
        for secret in ("secret", str(tmp_path), str(tiny_bundle.run_dir.parent), str(Path.home())):
            assert secret not in text, text


def test_public_metadata_strips_path_like_values():
    raw = {
        "backbone": {"weights": "/home/alice/weights/mobilenet.h5", "weights_path": "/home/alice/w.h5"},
        "data": [{"path": "/data/a.jpg", "label": "ok", "split": "training"}],
        "preprocessing": {"inside_model": "x / 127.5 - 1"},
        "source": "https://example.org/x",
        "cache_dir": "C:\\Users\\bob\\cache",
        "relative": "data/train/x.jpg",
    }
    clean = public_metadata(raw)
    assert clean["backbone"] == {"weights": "mobilenet.h5"}
    assert clean["data"] == [{"label": "ok", "split": "training"}]
    assert clean["preprocessing"] == raw["preprocessing"] and clean["source"] == raw["source"]
    assert "cache_dir" not in clean and clean["relative"] == "x.jpg"


def test_stats_and_unknown_routes_are_json(client):
    stats = client.get("/stats").json()
    from keeneye.serving.settings import BATCHING_BY_ENGINE

    # no explicit batching setting: the engine's measured default
    assert stats["batching"] is BATCHING_BY_ENGINE[stats["engine"]] and "forward_passes" in stats["batcher"]
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = client.get("/predict")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


# --- predictions ---------------------------------------------------------------------------


def test_predict_multipart_matches_predictor(client, predictor, image_paths, tiny_bundle):
    response = client.post("/predict", files=multipart(*[(p.name, p.read_bytes()) for p in image_paths[:4]]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["n_images"] == 4 and body["n_ok"] == 4 and body["n_failed"] == 0
    expected = predictor.predict_paths([str(p) for p in image_paths[:4]])
    for result, (_, row) in zip(body["results"], expected.iterrows()):
        assert result["name"] == Path(row["path"]).name
        assert result["probability"] == pytest.approx(row["probability"], abs=1e-5)
        assert result["label"] == row["label"]
        assert result["threshold"] == pytest.approx(tiny_bundle.threshold)
        assert result["error"] is None


def test_predict_json_base64_and_raw_body(client, image_paths):
    data = [p.read_bytes() for p in image_paths[:2]]
    payload = {"images": [{"name": "a.png", "data": base64.b64encode(data[0]).decode()},
                          {"data": "data:image/png;base64," + base64.b64encode(data[1]).decode()}]}
    as_json = client.post("/predict", json=payload)
    assert as_json.status_code == 200, as_json.text
    names = [r["name"] for r in as_json.json()["results"]]
    assert names == ["a.png", "image-1"]
    as_files = client.post("/predict", files=multipart(("a.png", data[0]), ("b.png", data[1])))
    assert [r["probability"] for r in as_json.json()["results"]] == pytest.approx([r["probability"] for r in as_files.json()["results"]], abs=1e-6)
    raw = client.post("/predict", content=data[0], headers={"content-type": "image/png", "x-filename": "raw.png"})
    assert raw.status_code == 200 and raw.json()["results"][0]["name"] == "raw.png"
    assert raw.json()["results"][0]["probability"] == pytest.approx(as_json.json()["results"][0]["probability"], abs=1e-6)


def test_threshold_override(client, image_paths, tiny_bundle):
    files = multipart((image_paths[0].name, image_paths[0].read_bytes()))
    everything_positive = client.post("/predict?threshold=0", files=files).json()["results"][0]
    assert everything_positive["label"] == tiny_bundle.class_names[1] and everything_positive["threshold"] == 0
    bad = client.post("/predict?threshold=1.5", files=files)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request" and "threshold" in bad.json()["error"]["message"]


def test_mixed_request_answers_good_images_and_reports_bad_ones(client, image_paths):
    good = image_paths[0].read_bytes()
    response = client.post("/predict", files=multipart(
        ("good.png", good), ("cut.jpg", good_jpeg_bytes(60, 80)[:300]), ("notes.txt", b"hello, not an image"), ("empty.jpg", b""),
    ))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["n_ok"] == 1 and body["n_failed"] == 3
    assert codes(response) == [None, "truncated", "not_an_image", "empty"]
    assert 0.0 <= body["results"][0]["probability"] <= 1.0
    assert body["results"][1]["probability"] is None and body["results"][1]["label"] is None
    assert "truncated JPEG" in body["results"][1]["error"]["message"]


def test_request_where_every_image_failed_is_422_with_reasons(client):
    response = client.post("/predict", files=multipart(("a.bin", b"\x00\x01garbage"), ("b.jpg", good_jpeg_bytes()[:200])))
    assert response.status_code == 422
    body = response.json()
    assert body["error"]["code"] == "no_valid_images" and "a.bin: not an image" in body["error"]["message"]
    assert codes(response) == ["not_an_image", "truncated"]


# --- bad input: every case a 4xx with a message ---------------------------------------------

BAD_REQUESTS = {
    "empty body": (dict(content=b"", headers={"content-type": "application/json"}), 400, "empty_body", "empty request body"),
    "malformed json": (dict(content=b'{"images": [', headers={"content-type": "application/json"}), 400, "malformed_json", "line 1 column"),
    "json not an object": (dict(json=[1, 2]), 422, "invalid_request", '"images" list'),
    "json images not a list": (dict(json={"images": "abc"}), 422, "invalid_request", "must be a list"),
    "json no images": (dict(json={"images": []}), 400, "no_images", "empty"),
    "json data not a string": (dict(json={"images": [{"name": "x", "data": 5}]}), 422, "invalid_request", "images[0].data"),
    "wrong content type": (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported_media_type", "text/plain"),
    "no content type": (dict(content=b"hello"), 415, "unsupported_media_type", "missing Content-Type"),
    "multipart without boundary": (dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}), 400, "malformed_multipart", "boundary"),
    "multipart without files": (
        dict(content=b'--abc\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--abc--\r\n',
             headers={"content-type": "multipart/form-data; boundary=abc"}),
        400, "no_images", "only text fields: note",
    ),
    "body too large": (dict(content=b"\xff" * (3 * 1024 * 1024), headers={"content-type": "image/jpeg"}), 413, "body_too_large", "max_body_bytes"),
    "too many files": (dict(files=multipart(*[(f"{i}.jpg", good_jpeg_bytes()) for i in range(5)])), 413, "too_many_images", "max_images_per_request=4"),
    "too many json images": (dict(json={"images": [{"data": ""}] * 5}), 413, "too_many_images", "5 images"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_that_says_why(client, case):
    kwargs, status, code, words = BAD_REQUESTS[case]
    response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert words in error["message"]


BAD_IMAGES = {
    "random bytes": (lambda: np.random.default_rng(0).bytes(5000), "not_an_image", "not an image"),
    "truncated jpeg": (lambda: good_jpeg_bytes(60, 80)[:400], "truncated", "truncated JPEG"),
    "jpeg cut inside its header": (lambda: good_jpeg_bytes(60, 80)[:100], "truncated", "ends inside its header"),
    "truncated png": (lambda: png_bomb(64, 64)[:-12], "truncated", "truncated PNG"),
    "decompression bomb": (lambda: png_bomb(5000, 5000), "too_many_pixels", "5000x5000"),
    "huge declared size": (lambda: png_bomb(64, 64)[:16] + struct.pack(">II", 100_000, 100_000) + png_bomb(64, 64)[24:], "too_many_pixels", "100000x100000"),
    "file too large": (lambda: good_jpeg_bytes() + b"\x00" * (1024 * 1024 + 10), "file_too_large", "max_image_bytes"),
    "format not allowed": (lambda: b"\x00\x00\x00\x18ftypheic" + bytes(100), "unsupported_format", "HEIF"),
    "invalid base64": (None, "invalid_base64", "base64"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES), ids=list(BAD_IMAGES))
def test_bad_images_are_reported_per_image(client, images, case):
    make, code, words = BAD_IMAGES[case]
    good = next(iter(images.values()))
    if make is None:
        payload = {"images": [{"name": "good", "data": base64.b64encode(good).decode()}, {"name": "bad", "data": "@@not base64@@"}]}
        response = client.post("/predict", json=payload)
    else:
        response = client.post("/predict", files=multipart(("good.png", good), ("bad", make())))
    assert response.status_code == 200, response.text
    good_result, bad_result = response.json()["results"]
    assert good_result["error"] is None and bad_result["probability"] is None
    assert bad_result["error"]["code"] == code and words in bad_result["error"]["message"]


def test_garbage_never_gives_5xx_and_server_stays_healthy(client, images):
    rng = np.random.default_rng(1)
    types = ["application/json", "multipart/form-data; boundary=abc", "image/png", "text/html", "application/octet-stream", ""]
    for i in range(30):
        body = rng.bytes(int(rng.integers(0, 3000)))
        if i % 3 == 0:
            body = b"--abc\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\n" + body
        headers = {"content-type": types[i % len(types)]} if types[i % len(types)] else {}
        response = client.post("/predict", content=body, headers=headers)
        assert 400 <= response.status_code < 500, (i, response.status_code, response.text)
        assert "error" in response.json()
    assert client.get("/health").status_code == 200
    ok = client.post("/predict", files=multipart(("good.png", next(iter(images.values())))))
    assert ok.status_code == 200
    assert not [s for s in client.get("/stats").json()["responses_by_status"] if s.startswith("5")]


def test_one_json_log_line_per_request_without_image_bytes(client, images, caplog):
    caplog.set_level(logging.INFO, logger="keeneye.serving.access")
    good = next(iter(images.values()))
    client.post("/predict", files=multipart(("good.png", good), ("bad.jpg", b"nope")), headers={"x-request-id": "req-42"})
    client.post("/predict", content=b"{", headers={"content-type": "application/json"})
    records = [r for r in caplog.records if r.name == "keeneye.serving.access"]
    assert len(records) == 2
    first, second = (r.fields for r in records)
    assert first["request_id"] == "req-42" and first["method"] == "POST" and first["path"] == "/predict"
    assert first["status"] == 200 and first["n_images"] == 2 and first["n_failed"] == 1 and first["errors"] == ["not_an_image"]
    assert first["duration_ms"] > 0
    assert second["status"] == 400 and second["errors"] == ["malformed_json"]
    from keeneye.serving.app import JsonFormatter

    line = JsonFormatter().format(records[0])
    assert json.loads(line)["status"] == 200 and len(line) < 1000  # no image bytes in the log


# --- batching ------------------------------------------------------------------------------


def _concurrent_posts(client, payloads: list[bytes]) -> list:
    barrier = threading.Barrier(len(payloads))

    def post(data: bytes):
        barrier.wait()
        return client.post("/predict", files=multipart(("x.png", data)))

    with ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(post, payloads))


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no-batching"])
def test_concurrent_requests_share_forward_passes_only_with_batching(predictor, images, batching):
    settings = ServeSettings(batching=batching, max_batch_size=8, max_batch_wait_ms=300)
    payloads = list(images.values())[:6] + list(images.values())[:2]
    with TestClient(create_app(predictor, settings)) as test_client:
        responses = _concurrent_posts(test_client, payloads)
        stats = test_client.get("/stats").json()["batcher"]
    assert [r.status_code for r in responses] == [200] * 8
    assert stats["requests"] == 8 and stats["images"] == 8
    if batching:
        assert stats["forward_passes"] < 8 and stats["max_requests_per_pass"] >= 2 and stats["merged_passes"] >= 1, stats
    else:
        assert stats["forward_passes"] == 8 and stats["max_requests_per_pass"] == 1, stats


def test_batched_probabilities_equal_single_ones(predictor, images):
    settings = ServeSettings(max_batch_size=8, max_batch_wait_ms=300)
    payloads = list(images.values())[:4]
    with TestClient(create_app(predictor, settings)) as test_client:
        responses = _concurrent_posts(test_client, payloads)
        single = [test_client.post("/predict", files=multipart(("x.png", p))).json()["results"][0]["probability"] for p in payloads]
    merged = [r.json()["results"][0]["probability"] for r in responses]
    assert merged == pytest.approx(single, abs=1e-5)


def test_batcher_drains_queued_work_on_close(predictor, images):
    from keeneye.data.decode import decode_image_bytes

    arrays = [decode_image_bytes(data, 96) for data in images.values()]

    async def scenario():
        with ThreadPoolExecutor(1) as model_thread:
            batcher = MicroBatcher(predictor.predict_images, model_thread, max_batch_size=2, max_wait_s=0.05)
            batcher.start()
            tasks = [asyncio.ensure_future(batcher.predict([a])) for a in arrays]
            await asyncio.sleep(0)  # all queued
            await batcher.close()
            results = await asyncio.gather(*tasks)
            with pytest.raises(Unavailable):
                await batcher.predict(arrays[:1])
            return results, batcher.stats

    results, stats = asyncio.run(scenario())
    assert [len(r) for r in results] == [1] * len(arrays)
    assert stats.images == len(arrays) and stats.max_batch_images == 2
    expected = predictor.predict_images(arrays)
    assert np.concatenate(results) == pytest.approx(expected, abs=1e-5)


def test_shutdown_marks_not_ready(predictor):
    app = create_app(predictor, ServeSettings())
    with TestClient(app) as test_client:
        assert test_client.get("/ready").status_code == 200
    service = app.state.service
    assert service.draining and not service.ready


# --- settings and CLI ----------------------------------------------------------------------


def test_settings_are_validated():
    assert make_settings(allowed_formats="jpg, PNG,tif").allowed_formats == ("JPEG", "PNG", "TIFF")
    with pytest.raises(ConfigError, match="max_batch_size"):
        make_settings(max_batch_size=0)
    with pytest.raises(ConfigError, match="unknown image format"):
        make_settings(allowed_formats="psd")


def test_cli_serve_reports_a_missing_bundle(tmp_path):
    from keeneye.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    help_text = CliRunner().invoke(app, ["serve", "--help"]).output
    assert "--no-batching" in help_text and "--max-pixels" in help_text
