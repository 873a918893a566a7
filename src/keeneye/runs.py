"""Past runs: a table of the bundles under an output folder, and what changed between two of them.

Everything is read from the bundles' own files (metadata.json, config.json, metrics.json), so it
works without MLflow, on any machine that has the run folders. The same numbers are what
:mod:`keeneye.tracking` logs to MLflow (`run_metrics`, `flatten`), so both views agree.

    from keeneye.runs import list_runs, compare_runs
    list_runs("runs", sort="f1")                   # DataFrame, one row per bundle
    compare_runs("runs/a", "runs/b")               # RunComparison: config and metric differences
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from rich.table import Table

from keeneye.bundle import CONFIG_FILE, METADATA_FILE
from keeneye.errors import BundleError

METRICS_FILE = "metrics.json"
#: Keys of the metrics blocks at the chosen threshold and at 0.5 (evaluation.metrics.binary_metrics).
POINT_KEYS = ("threshold", "f1", "precision", "recall", "accuracy", "specificity", "tp", "fp", "tn", "fn")
#: Where a cross-validated estimate may sit in metrics.json (written by cross-validation, when it ran).
CV_SECTIONS = ("cross_validation", "cross_validated", "cv", "out_of_fold")
#: Keys that hold the estimate inside that section, most specific first (flattened with dots).
CV_ESTIMATE_KEYS = ("estimate", "f1.mean", "f1_mean", "mean_f1", "at_threshold.f1", "f1", "mean")
#: `keeneye runs --sort` keys -> (column, descending by default): metrics best first, the rest in reading order.
SORT_KEYS = {
    "date": ("created", False), "name": ("name", False), "f1": ("test_f1", True), "ap": ("test_ap", True),
    "cv": ("cv_f1", True), "threshold": ("threshold", False), "time": ("time_s", False),
}
RUN_COLUMNS = ["name", "created", "data", "mode", "features", "threshold", "cv_f1", "cv_sd", "test_f1", "test_ap", "time_s", "path"]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other values are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _number(value: Any) -> float | None:
    """A finite int or float as float; None for anything else (booleans, None, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def numeric_leaves(tree: Mapping[str, Any] | None, prefix: str = "") -> dict[str, float]:
    flat = flatten(tree or {}, prefix)
    return {key: number for key, value in flat.items() if (number := _number(value)) is not None}


def read_json(path: Path) -> dict:
    """A JSON object from a bundle file, or {} when it is missing or unreadable (older or partial bundles)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cross_validation(metrics: Mapping[str, Any]) -> dict | None:
    """The cross-validated section of metrics.json, if the run has one."""
    for key in CV_SECTIONS:
        if isinstance(metrics.get(key), Mapping):
            return dict(metrics[key])
    return None


def cv_estimate(metrics: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(cross-validated F1 estimate, its spread across folds) from metrics.json; (None, None) without one.

    The section's exact shape belongs to the cross-validation code, so this reads it leniently: the
    first of CV_ESTIMATE_KEYS that holds a number, and a sibling "sd"/"std" for the spread.
    """
    section = numeric_leaves(cross_validation(metrics))
    for key in CV_ESTIMATE_KEYS:
        if key in section:
            stem = key.rsplit(".", 1)[0] + "." if "." in key else ""
            spread = next((section[f"{stem}{s}"] for s in ("sd", "std", "f1_sd", "f1_std") if f"{stem}{s}" in section), None)
            return section[key], spread
    return None, None


def run_metrics(run_dir: str | os.PathLike) -> dict[str, float]:
    """Every number worth tracking of one run, under stable flat names (what MLflow receives).

    test.* (ROC AUC, AP, counts, and each metric at the chosen threshold and at 0.5), validation.f1,
    cv.* (whatever numbers the cross-validated section holds), leakage.*, time.* (seconds per phase)
    and data.* (found / skipped / dropped / used, in total and per split).
    """
    folder = Path(run_dir)
    metrics, metadata = read_json(folder / METRICS_FILE), read_json(folder / METADATA_FILE)
    out: dict[str, Any] = {f"test.{k}": metrics.get(k) for k in ("n", "n_positive", "n_negative", "roc_auc", "average_precision")}
    for point in ("at_threshold", "at_0.5"):
        block = metrics.get(point) or {}
        out.update({f"test.{point}.{k}": block.get(k) for k in POINT_KEYS})
    choice = metrics.get("threshold_choice") or metadata.get("threshold_choice") or {}
    out["validation.f1"] = choice.get("validation_f1")
    out.update(numeric_leaves(cross_validation(metrics), "cv."))
    leakage = metrics.get("leakage") or {}
    out.update({f"leakage.{k}": leakage.get(k) for k in ("leaked_testing_images", "left_out_of_evaluation")})
    out.update({f"time.{k}": v for k, v in (metadata.get("timings") or {}).items()})
    out.update(_data_counts(metadata.get("data") or []))
    return {key: number for key, value in out.items() if (number := _number(value)) is not None}


def _data_counts(rows: list[dict]) -> dict[str, float]:
    """metadata.json's per split and class counts -> totals and per-split totals."""
    out: dict[str, float] = {}
    for row in rows:
        for column in ("found", "skipped", "dropped", "used"):
            value = _number(row.get(column))
            if value is None:
                continue
            out[f"data.{column}"] = out.get(f"data.{column}", 0.0) + value
            split = f"data.{row.get('split')}.{column}"
            out[split] = out.get(split, 0.0) + value
    return out


def is_bundle(folder: Path) -> bool:
    return folder.is_dir() and not folder.name.startswith(".") and (folder / METADATA_FILE).is_file()


def _features(config: dict, metadata: dict) -> str:
    backbone = metadata.get("backbone") or {}
    model = config.get("model") or {}
    size = (metadata.get("input") or {}).get("image_size", model.get("image_size"))
    text = f"{backbone.get('name', model.get('backbone', '?'))} α{backbone.get('alpha', model.get('alpha', '?'))} {size}px"
    extra = [str(model[k]) for k in ("features", "tiles") if model.get(k) not in (None, False, "gap")]
    return " ".join([text, *extra])


def _mode(config: dict, metadata: dict) -> str:
    training = metadata.get("training") or {}
    phase = "fine-tuned" if training.get("kept") == "fine_tune" else "frozen"
    if phase == "frozen" and "fine_tune" in (training.get("phases") or {}):
        phase = "frozen, ft not kept"
    mode = config.get("mode", "supervised")
    return phase if mode == "supervised" else f"{mode}, {phase}"


def _data(config: dict, metadata: dict) -> str:
    source = (config.get("data") or {}).get("manifest_path") or config.get("data_folder_path") or "?"
    used = sum(_number(row.get("used")) or 0 for row in metadata.get("data") or [])
    return f"{Path(str(source)).name} ({int(used)})"


def run_record(folder: str | os.PathLike) -> dict:
    """One row of the runs table, from a bundle folder's files."""
    folder = Path(folder)
    metadata, config, metrics = (read_json(folder / name) for name in (METADATA_FILE, CONFIG_FILE, METRICS_FILE))
    testing = (metadata.get("metrics") or {}).get("testing") or {}
    f1 = (metrics.get("at_threshold") or {}).get("f1", (testing.get("at_threshold") or {}).get("f1"))
    cv, spread = cv_estimate(metrics)
    return {
        "name": folder.name, "created": str(metadata.get("created", "")), "data": _data(config, metadata),
        "mode": _mode(config, metadata), "features": _features(config, metadata), "threshold": _number(metadata.get("threshold")),
        "cv_f1": cv, "cv_sd": spread, "test_f1": _number(f1),
        "test_ap": _number(metrics.get("average_precision", testing.get("average_precision"))),
        "time_s": _number((metadata.get("timings") or {}).get("total_s")), "path": str(folder.resolve()),
    }


def list_runs(output_dir: str | os.PathLike = "runs", sort: str = "date", descending: bool | None = None) -> pd.DataFrame:
    """One row per published bundle under `output_dir` (staging, partial and other folders are ignored).

    sort: one of SORT_KEYS; descending: None = best first for metrics, oldest first for dates and names.
    Runs without the sorted value (e.g. no cross-validated estimate) come last.
    """
    folder = Path(output_dir).expanduser()
    if not folder.is_dir():
        raise BundleError(f"{folder.resolve()} is not a folder of runs (give the output_dir of your config, e.g. runs).")
    if sort not in SORT_KEYS:
        raise BundleError(f"cannot sort runs by {sort!r}; choose one of {', '.join(SORT_KEYS)}.")
    frame = pd.DataFrame([run_record(path) for path in sorted(folder.iterdir()) if is_bundle(path)], columns=RUN_COLUMNS)
    column, default = SORT_KEYS[sort]
    ascending = not (default if descending is None else descending)
    return frame.sort_values(column, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


COUNT_NAMES = ("n", "n_positive", "n_negative", "tp", "fp", "tn", "fn")


def _fmt(value: Any, digits: int = 4, count: bool = False) -> str:
    """A number for a table: counts as integers, the rest with `digits` decimals; missing values blank."""
    number = _number(value)
    if number is None:
        return ""
    return f"{int(number)}" if count and number.is_integer() else f"{number:.{digits}f}"


def _is_count(metric: str) -> bool:
    return metric.startswith(("data.", "leakage.")) or metric.rsplit(".", 1)[-1] in COUNT_NAMES


def runs_table(frame: pd.DataFrame, title: str = "Runs") -> Table:
    """The runs DataFrame as a rich table (what `keeneye runs` prints)."""
    table = Table(title=title, show_edge=False)
    for name, justify, wrap in (("name", "left", False), ("date", "left", False), ("data", "left", True), ("mode", "left", True),
                                ("features", "left", True), ("threshold", "right", False), ("CV F1", "right", False),
                                ("test F1", "right", False), ("test AP", "right", False), ("total s", "right", False)):
        table.add_column(name, justify=justify, no_wrap=not wrap)
    for row in frame.itertuples(index=False):
        cv = "" if pd.isna(row.cv_f1) else _fmt(row.cv_f1) + ("" if pd.isna(row.cv_sd) else f" ± {_fmt(row.cv_sd, 3)}")
        table.add_row(row.name, row.created[:16].replace("T", " "), row.data, row.mode, row.features, _fmt(row.threshold),
                      cv, _fmt(row.test_f1), _fmt(row.test_ap), _fmt(row.time_s, 1))
    return table


@dataclass
class RunComparison:
    """Two runs side by side: the config keys that differ and the metrics that differ (b - a)."""

    a: Path
    b: Path
    config: pd.DataFrame  # key, a, b (only keys whose values differ; a key missing on one side shows as <absent>)
    metrics: pd.DataFrame  # metric, a, b, change

    def tables(self) -> tuple[Table, Table]:
        config = Table(title=f"Config: {len(self.config)} keys differ", show_edge=False)
        for column in ("key", self.a.name, self.b.name):
            config.add_column(column)
        for row in self.config.itertuples(index=False):
            config.add_row(row.key, row.a, row.b)
        metrics = Table(title="Metrics", show_edge=False)
        for column, justify in (("metric", "left"), (self.a.name, "right"), (self.b.name, "right"), ("change", "right")):
            metrics.add_column(column, justify=justify)
        for row in self.metrics.itertuples(index=False):
            change = "" if pd.isna(row.change) else f"{row.change:+.4f}"
            count = _is_count(row.metric)
            metrics.add_row(row.metric, _fmt(row.a, count=count), _fmt(row.b, count=count), change)
        return config, metrics


def resolve_run(run: str | os.PathLike, output_dir: str | os.PathLike = "runs") -> Path:
    """A run given as a folder, or as a name under output_dir; a clear error when it is not a bundle."""
    for candidate in (Path(run).expanduser(), Path(output_dir).expanduser() / str(run)):
        if is_bundle(candidate):
            return candidate.resolve()
    raise BundleError(f"{run} is not a run: expected a bundle folder (with {METADATA_FILE}) or the name of one under {output_dir}.")


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12))


def compare_runs(a: str | os.PathLike, b: str | os.PathLike, output_dir: str | os.PathLike = "runs") -> RunComparison:
    """What changed between two runs: config keys (flattened, e.g. head.dropout) and every tracked metric."""
    first, second = resolve_run(a, output_dir), resolve_run(b, output_dir)
    absent = object()
    configs = [flatten(read_json(folder / CONFIG_FILE)) for folder in (first, second)]
    keys = list(dict.fromkeys([*configs[0], *configs[1]]))
    config_rows = [
        {"key": key, "a": "<absent>" if va is absent else _show(va), "b": "<absent>" if vb is absent else _show(vb)}
        for key in keys if (va := configs[0].get(key, absent)) != (vb := configs[1].get(key, absent))
    ]
    values = [run_metrics(folder) for folder in (first, second)]
    names = list(dict.fromkeys([*values[0], *values[1]]))
    metric_rows = [
        {"metric": name, "a": values[0].get(name), "b": values[1].get(name),
         "change": values[1][name] - values[0][name] if name in values[0] and name in values[1] else None}
        for name in names if not _same(values[0].get(name), values[1].get(name))
    ]
    return RunComparison(first, second, pd.DataFrame(config_rows, columns=["key", "a", "b"]),
                         pd.DataFrame(metric_rows, columns=["metric", "a", "b", "change"]))
