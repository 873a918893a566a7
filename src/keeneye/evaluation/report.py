"""`report.html`: one self-contained page per run (or evaluation) that a person can read and share.

Everything is inside the file: plots and thumbnails are base64 ``data:`` URIs, styles are inline,
there are no scripts, fonts, links or images fetched from anywhere, so it opens offline, from an
e-mail attachment or a CI artefact. Sections: summary, metrics at the chosen threshold and at 0.5,
plots (confusion matrix, precision-recall, ROC, F1/precision/recall vs threshold, training curves),
the data audit (with the near-duplicate pairs side by side), the most confident mistakes (with
Grad-CAM overlays when a model is at hand) and the resolved config.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd

from keeneye.data.decode import DecodeError, load_image
from keeneye.data.preprocess import InputSpec
from keeneye.evaluation.metrics import predict_labels

__all__ = ["REPORT_FILE", "PLOTS", "GalleryItem", "mistake_gallery", "write_report", "data_uri"]

REPORT_FILE = "report.html"
PLOTS = (
    ("confusion_matrix.png", "Confusion matrix at the chosen threshold"),
    ("precision_recall.png", "Precision-recall curve"),
    ("roc.png", "ROC curve"),
    ("threshold_curves.png", "F1, precision and recall against the threshold (chosen threshold marked)"),
    ("training_curves.png", "Training curves"),
    ("sequences.png", "Probability over time per video: frames (grey), smoothed (blue), labelled events (green), found events (red bar)"),
)
THUMBNAIL_SIDE = 220
MAX_TABLE_ROWS = 50
MAX_PAIR_THUMBNAILS = 8


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _image_uri(image: np.ndarray, quality: int = 85) -> str:
    """RGB uint8 -> JPEG data URI."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return data_uri(encoded.tobytes(), "image/jpeg") if ok else ""


def _thumbnail(path: str, side: int = THUMBNAIL_SIDE) -> np.ndarray | None:
    try:
        image = load_image(path)
    except DecodeError:
        return None
    height, width = image.shape[:2]
    scale = min(1.0, side / max(height, width))
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    return image


@dataclass
class GalleryItem:
    path: str
    label: str
    probability: float
    predicted: str
    kind: str  # "false positive" | "false negative"
    thumbnail: np.ndarray | None
    overlay: np.ndarray | None = None
    one_class: np.ndarray | None = None  # head.anomaly_feature runs: the one-class part's map


def mistake_gallery(
    predictions: pd.DataFrame, class_names: tuple[str, str], threshold: float, n: int = 12,
    explainer: Callable[[list[str]], Sequence[np.ndarray | None]] | None = None,
    one_class: Callable[[list[str]], Sequence[np.ndarray | None]] | None = None,
) -> list[GalleryItem]:
    """The `n` most confident mistakes (false positives with the highest probability, false
    negatives with the lowest), alternating between the two kinds while both last; `explainer` and
    `one_class` (paths -> overlays) draw beside each its Grad-CAM and its one-class part's map."""
    negative, positive = class_names
    if predictions is None or not len(predictions):
        return []
    frame = predictions.dropna(subset=["probability"]).copy()
    predicted = np.where(predict_labels(frame["probability"].to_numpy(), threshold) == 1, positive, negative)
    frame["predicted"] = predicted
    fp = frame[(frame["label"] == negative) & (frame["predicted"] == positive)].sort_values("probability", ascending=False)
    fn = frame[(frame["label"] == positive) & (frame["predicted"] == negative)].sort_values("probability", ascending=True)
    chosen: list[tuple[str, pd.Series]] = []
    fp_rows, fn_rows = list(fp.iterrows()), list(fn.iterrows())
    while len(chosen) < n and (fp_rows or fn_rows):
        if fp_rows:
            chosen.append(("false positive", fp_rows.pop(0)[1]))
        if fn_rows and len(chosen) < n:
            chosen.append(("false negative", fn_rows.pop(0)[1]))
    paths = [str(row["path"]) for _, row in chosen]
    overlays, parts = _drawn(explainer, paths), _drawn(one_class, paths)
    return [
        GalleryItem(str(row["path"]), str(row["label"]), float(row["probability"]), str(row["predicted"]), kind,
                    _thumbnail(str(row["path"])), overlay, part)
        for (kind, row), overlay, part in zip(chosen, overlays, parts)
    ]


def _drawn(draw: Callable[[list[str]], Sequence[np.ndarray | None]] | None, paths: list[str]) -> Sequence[np.ndarray | None]:
    """`draw(paths)`, or no pictures when there is nothing to draw with or it fails (the gallery must never cost the
    run; thumbnails alone still help)."""
    if draw is None or not paths:
        return [None] * len(paths)
    try:
        return draw(paths)
    except Exception:  # noqa: BLE001
        return [None] * len(paths)


# --------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:26px;margin:0 0 4px} h2{font-size:20px;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid #d0d7de}
h3{font-size:16px;margin:20px 0 8px}
.sub{color:#57606a;margin:0 0 16px}
nav a{margin-right:14px;color:#0969da;text-decoration:none;font-size:14px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:14px}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:10px 0}
.card{border:1px solid #d0d7de;border-radius:8px;padding:10px 16px;min-width:130px}
.card .v{font-size:24px;font-weight:600} .card .k{color:#57606a;font-size:13px}
.warn{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 12px;margin:8px 0}
.leak{background:#ffebe9;border:1px solid #cf222e;border-radius:6px;padding:8px 12px;margin:8px 0;font-weight:600}
.ok{background:#dafbe1;border:1px solid #2da44e;border-radius:6px;padding:8px 12px;margin:8px 0}
figure{margin:12px 0 22px} figure.wide{grid-column:1/-1} figure img{max-width:100%;border:1px solid #d0d7de} figcaption{color:#57606a;font-size:14px}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:8px 22px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:14px}
.tile{border:1px solid #d0d7de;border-radius:8px;padding:8px;font-size:13px;word-break:break-all}
.tile img{width:100%;height:auto;display:block;margin-bottom:4px}
.pair{display:flex;gap:6px;align-items:flex-start} .pair img{flex:1 1 0;min-width:0;width:auto}
.fp{color:#bc4c00;font-weight:600} .fn{color:#8250df;font-weight:600}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:10px;overflow:auto;font-size:12.5px}
.muted{color:#57606a}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(header)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class='num'>{_e(c)}</td>" if numeric[i] else f"<td>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(rows: Sequence[tuple[str, object]]) -> str:
    return "<table><tbody>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</tbody></table>"


def _cards(items: Sequence[tuple[str, str]]) -> str:
    return "<div class='cards'>" + "".join(f"<div class='card'><div class='v'>{_e(v)}</div><div class='k'>{_e(k)}</div></div>" for k, v in items) + "</div>"


def _metrics_section(metrics: dict) -> str:
    at_t, at_half = metrics["at_threshold"], metrics["at_0.5"]
    rows = [(name, _fmt(at_t[key]), _fmt(at_half[key])) for name, key in
            (("F1", "f1"), ("precision", "precision"), ("recall", "recall"), ("accuracy", "accuracy"), ("specificity", "specificity"))]
    rows.append(("TP / FP / TN / FN", *(f"{b['tp']} / {b['fp']} / {b['tn']} / {b['fn']}" for b in (at_t, at_half))))
    table = _table(["metric", f"at chosen threshold ({at_t['threshold']:.4f})", "at 0.5"], rows, [False, True, True])
    extra = _table(["", "value"], [
        ("test images", metrics.get("n")),
        (f"positive ({metrics.get('positive_class')})", metrics.get("n_positive")),
        (f"negative ({metrics.get('negative_class')})", metrics.get("n_negative")),
        ("ROC AUC", _fmt(metrics.get("roc_auc"))),
        ("average precision", _fmt(metrics.get("average_precision"))),
    ], [False, True])
    report_text = at_t.get("classification_report_text")
    text = f"<h3>Classification report at the chosen threshold</h3><pre>{_e(report_text)}</pre>" if report_text else ""
    return f"<div style='display:flex;gap:28px;flex-wrap:wrap'>{table}{extra}</div>{text}{_sequences_section(metrics.get('sequences'))}"


def _sequences_section(sequences: dict | None) -> str:
    """Frame F1, event precision/recall and per-video accuracy of videos and frame folders (see evaluation/sequence.py)."""
    if not sequences:
        return ""
    event, frame = sequences["event"], sequences["frame"]
    rows = [("videos / frame sequences", sequences["n_sequences"]), ("frames", sequences["n_frames"]),
            ("frame F1", _fmt(frame["f1"])), ("event precision", f"{_fmt(event['precision'])} ({event['correct']} of {event['predicted']} found events)"),
            ("event recall", f"{_fmt(event['recall'])} ({event['found']} of {event['labelled']} labelled events)"),
            ("per-video accuracy (contains an event or not)", _fmt(sequences["video_accuracy"]))]
    return "<h3>Sequences (an event counts when it overlaps a labelled one)</h3>" + _table(["", "value"], rows, [False, True])


def _plots_section(folder: Path) -> str:
    figures = []
    for name, caption in PLOTS:
        path = folder / name
        if path.is_file():
            uri = data_uri(path.read_bytes(), "image/png")
            wide = " class='wide'" if name in ("training_curves.png", "sequences.png") else ""
            figures.append(f"<figure{wide}><img alt='{_e(caption)}' src='{uri}'><figcaption>{_e(caption)}</figcaption></figure>")
    return "<div class='plots'>" + "".join(figures) + "</div>" if figures else "<p class='muted'>No plots.</p>"


def _pair_tiles(pairs: list[dict], measure: str) -> str:
    tiles = []
    for pair in pairs[:MAX_PAIR_THUMBNAILS]:
        a, b = _thumbnail(pair["a_path"], 160), _thumbnail(pair["b_path"], 160)
        images = "".join(f"<img alt='' src='{_image_uri(t)}'>" for t in (a, b) if t is not None)
        tiles.append(
            f"<div class='tile'><div class='pair'>{images}</div>"
            f"{_e(pair['a_split'])}: {_e(Path(pair['a_path']).name)} ({_e(pair['a_label'])})<br>"
            f"{_e(pair['b_split'])}: {_e(Path(pair['b_path']).name)} ({_e(pair['b_label'])})<br>"
            f"<b>{_e(measure)} {_e(pair.get('distance', pair.get('similarity')))}</b></div>"
        )
    return "<div class='gallery'>" + "".join(tiles) + "</div>" if tiles else ""


def _audit_section(audit: dict | None) -> str:
    if not audit:
        return "<p class='muted'>No audit for this report.</p>"
    parts = []
    leak = audit.get("leakage", {})
    for warning in audit.get("warnings", []):
        cls = "leak" if warning.startswith("LEAKAGE") else "warn"
        parts.append(f"<div class='{cls}'>{_e(warning)}</div>")
    if not audit.get("warnings"):
        parts.append("<div class='ok'>No leakage, duplicates or unreadable files found.</div>")
    dropped = leak.get("dropped_from_evaluation")
    parts.append(_cards([
        ("images", str(audit.get("n_images"))),
        ("unreadable", str(len(audit["images"]["unreadable"]))),
        ("identical sets across splits", str(len(audit["exact_duplicates"]["across_splits"]))),
        ("leaked testing images", f"{leak.get('leaked_testing_images', 0)} / {leak.get('testing_images', 0)}"),
        ("left out of evaluation", str(dropped) if dropped is not None else "none"),
    ]))
    counts = pd.DataFrame(audit.get("counts", []))
    if len(counts):
        rows = [(r.split, r.label, r.n, f"{audit['class_balance'][r.split][r.label]:.1%}") for r in counts.itertuples()]
        parts.append("<h3>Images per split and class</h3>" + _table(["split", "label", "images", "share of split"], rows, [False, False, True, True]))
    images = audit["images"]
    sizes = images["sizes"]
    size_rows = [(f"{s['width']} x {s['height']}", s["n"]) for s in sizes["most_common"]]
    parts.append(
        "<h3>Image formats, modes and sizes</h3>"
        f"<p>formats: {_e(', '.join(f'{k} {v}' for k, v in images['formats'].items()))}; "
        f"modes: {_e(', '.join(f'{k} {v}' for k, v in images['modes'].items()))}; "
        f"{sizes['distinct']} distinct sizes (width {sizes['width']['min']}-{sizes['width']['max']}, "
        f"height {sizes['height']['min']}-{sizes['height']['max']} px)</p>"
        + _table(["size (w x h)", "images"], size_rows, [False, True])
    )
    if images["unreadable"]:
        rows = [(u["path"], u["split"], u["label"], u["reason"]) for u in images["unreadable"][:MAX_TABLE_ROWS]]
        parts.append("<h3>Unreadable files</h3>" + _table(["path", "split", "label", "reason"], rows))
    exact = audit["exact_duplicates"]
    parts.append(
        f"<h3>Identical files</h3><p>{len(exact['within_split'])} sets within one split, {len(exact['across_splits'])} sets across splits "
        f"({exact['testing_images_identical_to_training']} testing images identical to a training/validation image), "
        f"{len(exact['conflicting_labels'])} sets with conflicting labels.</p>"
    )
    if exact["across_splits"]:
        rows = [(e["sha1"][:12], "; ".join(f"{f['split']}: {f['path']} ({f['label']})" for f in e["files"])) for e in exact["across_splits"][:MAX_TABLE_ROWS]]
        more = len(exact["across_splits"]) - MAX_TABLE_ROWS
        parts.append(_table(["sha1", "files"], rows) + (f"<p class='muted'>... and {more} more in audit.json</p>" if more > 0 else ""))
    near = audit.get("near_duplicates", {})
    for key, title, measure in (("hash", "Near-duplicates by perceptual hash (dHash)", "distance"),
                                ("embedding", "Near-duplicates by embedding similarity", "cosine")):
        block = near.get(key)
        if not block:
            continue
        limit = block.get("max_distance", block.get("threshold"))
        if key == "hash" and limit is not None and limit < 0:
            continue
        rule = f"distance <= {limit} of 256 bits" if key == "hash" else f"cosine >= {limit}"
        parts.append(f"<h3>{_e(title)}</h3><p>{block['n_pairs']} cross-split pair{'' if block['n_pairs'] == 1 else 's'} ({_e(rule)}), beyond identical files. "
                     f"<span class='muted'>{_e(block.get('method', ''))}</span></p>")
        if block["pairs"]:
            ordered = sorted(block["pairs"], key=lambda p: p.get("distance", -p.get("similarity", 0)))
            parts.append(_pair_tiles(ordered, measure))
    groups = audit.get("groups", {})
    if groups.get("n_groups"):
        parts.append(f"<h3>Groups</h3><p>{groups['n_groups']} groups ({groups['images_with_group']} images), "
                     f"{len(groups['crossing_splits'])} in more than one split.</p>")
        if groups["crossing_splits"]:
            rows = [(g["group"], ", ".join(f"{k} {v}" for k, v in g["splits"].items())) for g in groups["crossing_splits"][:MAX_TABLE_ROWS]]
            parts.append(_table(["group", "images per split"], rows))
    if leak.get("leaked"):
        rows = [(item["path"], item["label"], "; ".join(item["reasons"][:3]) + (" ..." if len(item["reasons"]) > 3 else "")) for item in leak["leaked"][:MAX_TABLE_ROWS]]
        more = len(leak["leaked"]) - MAX_TABLE_ROWS
        parts.append("<h3>Leaked testing images</h3>" + _table(["path", "label", "why"], rows)
                     + (f"<p class='muted'>... and {more} more in audit.json</p>" if more > 0 else ""))
    notes = audit.get("split_notes")
    if notes:
        parts.append("<h3>How the splits were made</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return "".join(parts)


def _gallery_section(gallery: list[GalleryItem] | None, has_predictions: bool) -> str:
    if gallery is None or not has_predictions:
        return "<p class='muted'>No predictions for this report.</p>"
    if not gallery:
        return "<div class='ok'>No mistakes on the test images at the chosen threshold.</div>"
    tiles = []
    for item in gallery:
        images = ""
        if item.thumbnail is not None:
            images += f"<img alt='image' src='{_image_uri(item.thumbnail)}'>"
        if item.overlay is not None:
            images += f"<img alt='Grad-CAM' src='{_image_uri(item.overlay)}'>"
        if item.one_class is not None:
            images += f"<img alt='one-class map' src='{_image_uri(item.one_class)}'>"
        cls = "fp" if item.kind == "false positive" else "fn"
        tiles.append(
            f"<div class='tile'><div class='pair'>{images}</div><span class='{cls}'>{_e(item.kind)}</span>: "
            f"true <b>{_e(item.label)}</b>, predicted <b>{_e(item.predicted)}</b>, p = {item.probability:.3f}"
            f"<br><span class='muted'>{_e(item.path)}</span></div>"
        )
    note = ("Left: the image; right: Grad-CAM (red = the regions that drove the prediction; with model.tiles a white "
            "frame marks the tile that decided).") if any(g.overlay is not None for g in gallery) else ""
    if any(g.one_class is not None for g in gallery):
        note += (" Third: the one-class part of the probability (the patches' distances to the good ones; from green "
                 "on, far enough to flag the part on its own).")
    return f"<p class='muted'>{note} Probability p is that of the positive class.</p><div class='gallery'>" + "".join(tiles) + "</div>"


def write_report(
    folder: str | Path,
    *,
    title: str,
    summary: Sequence[tuple[str, object]],
    metrics: dict | None,
    class_names: tuple[str, str],
    audit: dict | None = None,
    config: dict | None = None,
    gallery: list[GalleryItem] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write `folder/report.html` from the files already in `folder` (plots) and the given pieces."""
    folder = Path(folder)
    created = time.strftime("%Y-%m-%d %H:%M:%S")
    sections = [("summary", "Summary"), ("metrics", "Metrics"), ("plots", "Plots"), ("audit", "Data audit"),
                ("mistakes", "Most confident mistakes"), ("config", "Config")]
    nav = "<nav>" + "".join(f"<a href='#{key}'>{_e(name)}</a>" for key, name in sections) + "</nav>"
    cards = []
    if metrics:
        at_t = metrics["at_threshold"]
        cards = [("test F1", _fmt(at_t["f1"])), ("precision", _fmt(at_t["precision"])), ("recall", _fmt(at_t["recall"])),
                 ("ROC AUC", _fmt(metrics.get("roc_auc"))), ("threshold", f"{at_t['threshold']:.4f}"), ("test images", str(metrics.get("n")))]
    summary_html = _cards(cards) + _kv_table(summary) + "".join(f"<div class='warn'>{_e(n)}</div>" for n in notes)
    leak = (audit or {}).get("leakage", {})
    if leak.get("leaked_testing_images") and not leak.get("dropped_from_evaluation"):
        summary_html = (f"<div class='leak'>{leak['leaked_testing_images']} of {leak['testing_images']} test images leaked from "
                        "training/validation and are included in these metrics (see Data audit).</div>") + summary_html
    elif leak.get("dropped_from_evaluation"):
        summary_html = (f"<div class='ok'>{leak['dropped_from_evaluation']} leaked test images were left out of the evaluation "
                        "(data.drop_leaked_test).</div>") + summary_html
    body = [
        f"<h1>{_e(title)}</h1><p class='sub'>{_e(class_names[1])} (positive) vs {_e(class_names[0])} (negative) &middot; report written {_e(created)}</p>",
        nav,
        f"<h2 id='summary'>Summary</h2>{summary_html}",
        f"<h2 id='metrics'>Metrics on the test images</h2>{_metrics_section(metrics) if metrics else '<p class=muted>No metrics.</p>'}",
        f"<h2 id='plots'>Plots</h2>{_plots_section(folder)}",
        f"<h2 id='audit'>Data audit</h2>{_audit_section(audit)}",
        f"<h2 id='mistakes'>Most confident mistakes</h2>{_gallery_section(gallery, metrics is not None)}",
        f"<h2 id='config'>Config</h2><pre>{_e(json.dumps(config, indent=2)) if config else 'n/a'}</pre>",
    ]
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        + "".join(body)
        + "</main></body></html>\n"
    )
    path = folder / REPORT_FILE
    temporary = folder / f".{REPORT_FILE}.tmp"
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(path)
    return path


def write_run_report(
    folder: str | Path,
    *,
    title: str,
    summary: Sequence[tuple[str, object]],
    metrics: dict | None,
    class_names: tuple[str, str],
    threshold: float,
    audit: dict | None = None,
    config: dict | None = None,
    model=None,
    spec: InputSpec | None = None,
    console=None,
    explainer: Callable[[list[str]], Sequence[np.ndarray | None]] | None = None,
    one_class: Callable[[list[str]], Sequence[np.ndarray | None]] | None = None,
) -> Path | None:
    """report.html for a run or evaluation folder, with the mistake gallery from its predictions.csv.

    Grad-CAM overlays are added when `model` (the keeneye classifier, whose inputs `spec` makes) is given, or the overlays of
    `explainer` (paths -> RGB images, e.g. anomaly maps) when that is given; `one_class` (the same
    kind of callable) adds a head.anomaly_feature run's one-class maps. A failure here
    is reported on the console and never costs the run its bundle.
    """
    folder = Path(folder)
    try:
        predictions_path = folder / "predictions.csv"
        predictions = pd.read_csv(predictions_path) if predictions_path.is_file() else None
        if explainer is None and model is not None:
            from keeneye.model.gradcam import GradCam, explain_files

            def explainer(paths: list[str]):
                return [e.overlay for e in explain_files(GradCam(model), paths, threshold, class_names, spec, max_side=THUMBNAIL_SIDE)]

        gallery = (mistake_gallery(predictions, class_names, threshold, explainer=explainer, one_class=one_class)
                   if predictions is not None else None)
        return write_report(folder, title=title, summary=summary, metrics=metrics, class_names=class_names,
                            audit=audit, config=config, gallery=gallery)
    except Exception as exc:  # noqa: BLE001 - the report is a by-product; the bundle matters more
        if console is not None:
            from rich.markup import escape

            console.print(f"[yellow]warning:[/] report.html could not be written: {escape(type(exc).__name__)}: {escape(str(exc))}")
        return None
