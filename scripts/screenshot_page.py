"""Screenshots of the inspection page (`keeneye serve`, at /) with results and a heat map, to look at.

Serves a bundle on 127.0.0.1 (in this process), opens the page in headless Chromium (Debian's
`chromium` package, through Playwright; no other address is reachable), uploads the images, opens
the heat map of the first one the model flags, and saves full-page screenshots at a desktop size
and at 360 px wide (a phone), plus /docs rendered offline.

    python scripts/screenshot_page.py RUN_DIR IMAGE... [--out page_screenshots]

Without IMAGE, a few generated demo images (good and defect) and a text file named .jpg are used.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
VIEWS = {"desktop": {"width": 1280, "height": 900}, "phone-360": {"width": 360, "height": 740}}


def start_server(bundle: Path):
    import uvicorn

    from keeneye.serving import create_app

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(bundle), host=HOST, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    return server, f"http://{HOST}:{port}"


def sample_images(folder: Path) -> list[Path]:
    from keeneye.demo import make_demo_dataset

    data = make_demo_dataset(folder / "demo", seed=7, train_per_class=1, test_per_class=2, size=224)
    images = sorted((data / "testing" / "good").glob("*.png"))[:2] + sorted((data / "testing" / "defect").glob("*.png"))[:2]
    fake = folder / "shift-notes.jpg"
    fake.write_text("not a picture")
    return images + [fake]


def shoot(browser, url: str, images: list[Path], out: Path, name: str, viewport: dict) -> Path:
    context = browser.new_context(viewport=viewport, device_scale_factor=1)
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#model dd').length > 3")
    page.set_input_files("#files", [str(p) for p in images])
    page.wait_for_function("!document.querySelector('#results .card[data-state=pending]')", timeout=120_000)
    flagged = page.locator("#results .card[data-state=flagged] button.heat")
    if flagged.count():
        flagged.first.click()
        page.locator("#results img.heatmap").first.wait_for(timeout=120_000)
    target = out / f"{name}.png"
    page.screenshot(path=str(target), full_page=True)
    context.close()
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="Model bundle folder (runs/<name>).")
    parser.add_argument("images", type=Path, nargs="*", help="Images to upload (default: generated ones).")
    parser.add_argument("--out", type=Path, default=Path("page_screenshots"), help="Folder for the PNGs [page_screenshots].")
    args = parser.parse_args()
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        print("no chromium found; install it with: apt-get install -y chromium", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from keeneye.terminal import filter_tensorflow_import_logs

    filter_tensorflow_import_logs()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        images = args.images or sample_images(Path(scratch))
        server, url = start_server(args.bundle.resolve())
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=browser_path,
                    args=["--no-sandbox", "--disable-dev-shm-usage", f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {HOST}"],
                )
                for name, viewport in VIEWS.items():
                    print("screenshot:", shoot(browser, url, images, args.out, name, viewport))
                context = browser.new_context(viewport=VIEWS["desktop"])
                page = context.new_page()
                page.goto(url + "/docs")
                page.locator(".swagger-ui .info .title").wait_for(timeout=30_000)
                page.screenshot(path=str(args.out / "docs.png"))
                print("screenshot:", args.out / "docs.png")
                browser.close()
        finally:
            server.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
