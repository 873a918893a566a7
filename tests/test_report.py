"""report.html is written by train (and evaluate), self-contained, with its plots; Grad-CAM overlays."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from keeneye.evaluation.outputs import write_evaluation
from keeneye.evaluation.report import REPORT_FILE, mistake_gallery, write_report

ATTRIBUTE = re.compile(r"""\b(src|href|srcset|poster|data|action)\s*=\s*(['"])(.*?)\2""", re.IGNORECASE | re.DOTALL)
PNG_URI = re.compile(r"""src=(['"])data:image/png;base64,([A-Za-z0-9+/=]+)\1""")


def external_references(page: str) -> list[str]:
    """Everything in the page that a browser would fetch from outside the file itself."""
    found = []
    for name, _, value in ATTRIBUTE.findall(page):
        value = value.strip()
        if name.lower() == "href" and value.startswith("#"):
            continue
        if name.lower() == "src" and value.startswith("data:"):
            continue
        found.append(f"{name}={value[:60]}")
    found += [f"css url({m[:60]})" for m in re.findall(r"url\(\s*['\"]?([^'\")]*)", page, re.IGNORECASE) if not m.startswith("data:")]
    found += [tag for tag in ("<script", "<link", "<iframe", "@import") if tag in page.lower()]
    return found


def embedded_pngs(page: str) -> list[np.ndarray]:
    images = []
    for _, payload in PNG_URI.findall(page):
        image = cv2.imdecode(np.frombuffer(base64.b64decode(payload), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[0] > 50 and image.shape[1] > 50
        images.append(image)
    return images


def test_the_checker_catches_external_references() -> None:
    """The self-containment check below must be able to fail."""
    assert external_references("<img src='data:image/png;base64,AAAA'><a href='#audit'>x</a>") == []
    bad = (
        '<img src="http://example.com/a.png"><img src="confusion_matrix.png"><link href="style.css" rel=stylesheet>'
        "<div style=\"background:url('x.png')\"></div><a href='https://example.com'>x</a>"
    )
    assert len(external_references(bad)) == 6


def test_train_writes_a_self_contained_report(tiny_bundle) -> None:
    run = tiny_bundle.run_dir
    page = (run / REPORT_FILE).read_text(encoding="utf-8")
    assert external_references(page) == []
    assert len(embedded_pngs(page)) == 5  # confusion matrix, PR, ROC, threshold curves, training curves
    for name in ("confusion_matrix.png", "precision_recall.png", "roc.png", "threshold_curves.png", "training_curves.png"):
        assert (run / name).is_file()
        assert f"src='{name}'" not in page and f'src="{name}"' not in page
    metrics = json.loads((run / "metrics.json").read_text())
    at = metrics["at_threshold"]
    for text in ("Data audit", "Most confident mistakes", "Images per split and class", f"{at['f1']:.3f}",
                 f"at chosen threshold ({at['threshold']:.4f})", "at 0.5", "Training curves"):
        assert text in page, text
    assert metrics["leakage"]["leaked_testing_images"] == 0
    audit = json.loads((run / "audit.json").read_text())
    assert audit["n_images"] == 64 and audit["leakage"]["testing_images"] == 24
    assert (run / "audit.txt").read_text().startswith("Data audit\n64 images")
    manifest = pd.read_csv(run / "manifest.csv")
    assert manifest["evaluated"].sum() == metrics["n"] == 24
    if at["fp"] + at["fn"]:  # mistakes are shown with their Grad-CAM overlay next to the image
        assert page.count("alt='Grad-CAM'") == min(12, at["fp"] + at["fn"])


def test_evaluate_writes_a_report_too(tiny_bundle) -> None:
    from keeneye import api

    result = api.evaluate(tiny_bundle.run_dir, console=Console(quiet=True))
    page = (result.folder / REPORT_FILE).read_text(encoding="utf-8")
    assert external_references(page) == []
    assert len(embedded_pngs(page)) == 4  # no training curves for an evaluation
    assert result.metrics["n"] == tiny_bundle.metrics["n"]  # the run's own testing rows, from manifest.csv
    assert result.metrics["at_threshold"]["f1"] == pytest.approx(tiny_bundle.metrics["at_threshold"]["f1"], abs=0.05)


def _image(path: Path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((40, 60, 3), value, np.uint8))
    return str(path)


def test_gallery_shows_the_most_confident_mistakes_first(tmp_path: Path) -> None:
    rows = [  # (name, true label, probability of "defect"); threshold 0.5
        ("fp_sure", "good", 0.95), ("fp_unsure", "good", 0.6), ("fn_sure", "defect", 0.02), ("fn_unsure", "defect", 0.4),
        ("tp", "defect", 0.9), ("tn", "good", 0.1), ("fp_mid", "good", 0.8),
    ]
    paths = [_image(tmp_path / "img" / f"{name}.png", 40 * i) for i, (name, _, _) in enumerate(rows)]
    labels = [label for _, label, _ in rows]
    probabilities = np.array([p for _, _, p in rows])
    folder = tmp_path / "evaluation"
    metrics = write_evaluation(folder, paths, labels, probabilities, 0.5, ("good", "defect"))
    predictions = pd.read_csv(folder / "predictions.csv")
    gallery = mistake_gallery(predictions, ("good", "defect"), 0.5, n=4)
    assert [Path(g.path).stem for g in gallery] == ["fp_sure", "fn_sure", "fp_mid", "fn_unsure"]
    assert [g.kind for g in gallery] == ["false positive", "false negative"] * 2
    assert all(g.thumbnail is not None and g.thumbnail.shape == (40, 60, 3) for g in gallery)

    write_report(folder, title="t <script>", summary=[("data", "x & y")], metrics=metrics, class_names=("good", "defect"), gallery=gallery)
    page = (folder / REPORT_FILE).read_text(encoding="utf-8")
    assert external_references(page) == []  # the title is escaped, not a tag
    assert "t &lt;script&gt;" in page and "x &amp; y" in page
    assert page.count("src='data:image/jpeg;base64,") == 4
    assert len(embedded_pngs(page)) == 4
    assert page.index("fp_sure.png") < page.index("fn_sure.png") < page.index("fp_mid.png")

    def failing(paths):
        raise RuntimeError("no maps")

    with_maps = mistake_gallery(predictions, ("good", "defect"), 0.5, n=4, explainer=failing,  # a failure costs the pictures only
                                one_class=lambda paths: [np.full((40, 60, 3), 9, np.uint8) for _ in paths])
    assert all(g.overlay is None and g.one_class is not None for g in with_maps)
    write_report(folder, title="t", summary=[], metrics=metrics, class_names=("good", "defect"), gallery=with_maps)
    page = (folder / REPORT_FILE).read_text(encoding="utf-8")
    assert page.count("alt='one-class map'") == 4 and "Third: the one-class part" in page and "alt='Grad-CAM'" not in page


def test_explain_writes_grad_cam_overlays(tiny_bundle, demo_data: Path, tmp_path: Path) -> None:
    from keeneye.cli import app
    from keeneye.explain import explain_images

    images = sorted((demo_data / "testing" / "defect").glob("*.png"))[:3]
    out = tmp_path / "cams"
    result = CliRunner().invoke(app, ["explain", str(tiny_bundle.run_dir), *map(str, images), str(tmp_path / "nope.png"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "explanations.csv")
    assert len(table) == 4 and table["error"].notna().sum() == 1
    for row in table.dropna(subset=["overlay"]).itertuples():
        overlay = cv2.imread(row.overlay)
        assert overlay.shape == cv2.imread(row.path).shape  # drawn over the original image, same size
        assert 0.0 <= row.probability <= 1.0
    predicted = pd.read_csv(tiny_bundle.run_dir / "predictions.csv").set_index("path")["probability"]
    for row in table.dropna(subset=["overlay"]).itertuples():
        assert row.probability == pytest.approx(predicted[row.path], abs=1e-3)  # the same model, the same numbers

    from keeneye.bundle import load_bundle

    bundle = load_bundle(tiny_bundle.run_dir)
    explanations = explain_images(bundle.model, [str(p) for p in images], bundle.threshold, bundle.class_names)
    for item in explanations:
        assert item.heatmap.min() >= 0.0 and item.heatmap.max() == pytest.approx(1.0)
        assert item.overlay.dtype == np.uint8 and not np.array_equal(item.overlay, cv2.cvtColor(cv2.imread(item.path), cv2.COLOR_BGR2RGB))
