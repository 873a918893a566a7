"""The inspection page at `/` and the offline docs, driven in a real headless Chromium.

Chromium comes from Debian's `chromium` package (.ci/run installs it), driven by Playwright with
`executable_path` (Playwright's own browser download is not used). Without Chromium the tests
skip locally and fail under CI=true. The server is the real app (uvicorn on 127.0.0.1) serving
the tiny trained bundle; the browser may reach nothing but that address.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium")
SERVER = "127.0.0.1"
#: Chromium flags: no sandbox (CI runs as root), and no name resolution except the test server's
#: address, so a page that tried to load anything from the network would fail visibly.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {SERVER}"]


def _need(condition: bool, message: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    path = next((found for name in CHROMIUM_CANDIDATES if (found := shutil.which(name))), None)
    _need(path is not None, "Chromium is not installed (apt-get install chromium; .ci/run does it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install -e .[dev])")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tiny_bundle):
    """The real app over HTTP in a thread; yields its base URL."""
    import uvicorn

    from keeneye.serving import ServeSettings, create_app

    with socket.socket() as sock:
        sock.bind((SERVER, 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(tiny_bundle.run_dir, ServeSettings()), host=SERVER, port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)
    yield f"http://{SERVER}:{port}"
    uv.should_exit = True
    thread.join(60)


@pytest.fixture(scope="module")
def uploads(demo_data, tmp_path_factory) -> dict[str, Path]:
    """A good and a defective generated image, and a text file named like a JPEG."""
    folder = tmp_path_factory.mktemp("uploads")
    fake = folder / "notes.jpg"
    fake.write_text("shift report: nothing to declare\n")
    return {
        "good": sorted((demo_data / "testing" / "good").glob("*.png"))[0],
        "defect": sorted((demo_data / "testing" / "defect").glob("*.png"))[0],
        "fake": fake,
    }


@pytest.fixture(scope="module")
def cli_probabilities(tiny_bundle, uploads, tmp_path_factory) -> dict[str, float]:
    """What `keeneye predict` says about the same files."""
    from keeneye.cli import app

    out = tmp_path_factory.mktemp("cli") / "predictions.json"
    files = [str(uploads["good"]), str(uploads["defect"])]
    result = CliRunner().invoke(app, ["predict", str(tiny_bundle.run_dir), *files, "--output", str(out)])
    assert result.exit_code == 0, result.output
    return {Path(row["path"]).name: row["probability"] for row in json.loads(out.read_text())}


def _upload_and_wait(page, url: str, files: list[Path]) -> dict[str, dict]:
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#model dd').length > 3")
    page.set_input_files("#files", [str(f) for f in files])
    page.wait_for_function(
        f"document.querySelectorAll('#results .card').length === {len(files)} && "
        "!document.querySelector('#results .card[data-state=pending]')", timeout=60_000,
    )
    return {
        card.get_attribute("data-name"): {
            "state": card.get_attribute("data-state"), "label": card.get_attribute("data-label"),
            "probability": card.get_attribute("data-probability"), "verdict": card.locator(".verdict").inner_text(),
            "error": card.locator(".error").inner_text() if card.locator(".error").is_visible() else None,
        }
        for card in page.locator("#results .card").all()
    }


def _png_from_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    image = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_page_checks_images_like_the_cli(browser, server, uploads, cli_probabilities, tiny_bundle):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    outside = []
    page.on("request", lambda request: outside.append(request.url) if not request.url.startswith((server, "data:", "blob:")) else None)
    cards = _upload_and_wait(page, server, [uploads["good"], uploads["defect"], uploads["fake"]])

    negative, positive = tiny_bundle.class_names
    good, defect, fake = (cards[uploads[k].name] for k in ("good", "defect", "fake"))
    assert (good["state"], good["label"], good["verdict"].lower()) == ("ok", negative, negative)
    assert (defect["state"], defect["label"], defect["verdict"].lower()) == ("flagged", positive, positive)
    for key, card in (("good", good), ("defect", defect)):
        assert abs(float(card["probability"]) - cli_probabilities[uploads[key].name]) <= 1e-4
    assert fake["state"] == "error" and fake["probability"] is None
    assert "not a picture" in fake["error"] and "not an image" in fake["error"]  # plain words, then the server's reason
    fake_card = page.locator(f"#results .card[data-name='{uploads['fake'].name}']")
    assert not fake_card.locator("button.heat").is_visible() and not fake_card.locator("img.picture").is_visible()

    model_panel = page.locator("#model").inner_text()
    assert f"{tiny_bundle.threshold:.4f}" in model_panel and positive in model_panel and "Test F1" in model_panel

    # The heat map, asked for from the keyboard: focus the card's button, press Enter.
    card = page.locator(f"#results .card[data-name='{uploads['defect'].name}']")
    card.locator("button.heat").focus()
    page.keyboard.press("Enter")
    card.locator("img.picture.heatmap").wait_for(timeout=60_000)
    overlay = _png_from_data_url(card.locator("img.picture").get_attribute("src"))
    original = cv2.imread(str(uploads["defect"]))
    assert overlay.shape == original.shape  # drawn over the image as sent (96 px: not scaled down)
    assert np.abs(overlay.astype(int) - original.astype(int)).mean() > 5  # the colour map is really there
    assert card.locator("button.heat").get_attribute("aria-pressed") == "true"
    note = card.locator(".heat-note").inner_text()
    assert note.startswith("Red:") and "white frame" not in note  # the frame note is for tiled bundles only
    assert outside == []
    context.close()


def test_page_is_readable_at_360_px(browser, server, uploads):
    context = browser.new_context(viewport={"width": 360, "height": 740}, device_scale_factor=2, is_mobile=True, has_touch=True)
    page = context.new_page()
    cards = _upload_and_wait(page, server, [uploads["defect"], uploads["fake"]])
    assert cards[uploads["defect"].name]["state"] == "flagged" and cards[uploads["fake"].name]["state"] == "error"
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # nothing wider than the screen
    for selector in (".verdict", ".numbers", ".error", "#files + *, label[for=files]"):
        box = page.locator(selector).first.bounding_box()
        if box:
            assert box["x"] >= 0 and box["x"] + box["width"] <= 360, selector
    sizes = page.evaluate("[...document.querySelectorAll('.numbers, .error, dd')].map(e => parseFloat(getComputedStyle(e).fontSize))")
    assert sizes and min(sizes) >= 14
    # the photo button on a phone: an image input that asks for the camera
    assert page.get_attribute("#camera", "capture") == "environment" and page.get_attribute("#camera", "accept") == "image/*"
    context.close()


@pytest.mark.parametrize("path, ready", [("/docs", ".swagger-ui .info .title"), ("/redoc", "[role=navigation], .api-content")])
def test_docs_render_without_a_network(browser, server, path, ready):
    context = browser.new_context()
    attempted = []

    def only_the_server(route):
        if route.request.url.startswith(server):
            route.continue_()
        else:
            attempted.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_server)
    page = context.new_page()
    page.goto(server + path)
    page.locator(ready).first.wait_for(timeout=30_000)
    assert "keeneye" in page.content()
    if path == "/docs":
        assert page.locator(".opblock-summary-path", has_text="/predict").count() >= 1
    # ReDoc's sidebar footer asks its CDN for the Redocly logo and hides it when that fails: cosmetic, nothing else may leave.
    assert [url for url in attempted if not url.endswith("/redoc/logo-mini.svg")] == []
    context.close()


def test_explain_endpoint_answers_like_predict_with_a_heatmap(tiny_bundle, uploads):
    """Without a browser: POST /explain next to /predict on the same files (no Chromium needed)."""
    from fastapi.testclient import TestClient

    from keeneye.serving import ServeSettings, create_app

    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in uploads.values()]
    with TestClient(create_app(tiny_bundle.run_dir, ServeSettings())) as client:
        predicted = client.post("/predict", files=files).json()["results"]
        response = client.post("/explain", files=files)
        assert client.get("/").headers["content-type"].startswith("text/html")
        assert "/explain" in client.get("/openapi.json").json()["paths"]
    assert response.status_code == 200
    explained = response.json()["results"]
    assert [r["name"] for r in explained] == [p.name for p in uploads.values()]
    for mine, theirs, path in zip(explained, predicted, uploads.values()):
        if path.suffix == ".png":
            assert mine["label"] == theirs["label"] and abs(mine["probability"] - theirs["probability"]) <= 1e-4
            assert _png_from_data_url(mine["heatmap"]).shape == cv2.imread(str(path)).shape
        else:
            assert mine["heatmap"] is None and mine["error"]["code"] == "not_an_image" == theirs["error"]["code"]
