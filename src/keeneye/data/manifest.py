"""CSV manifest -> the same manifest DataFrame as a folder scan (`path, label, split, group, sha1`).

The second way in, for labels that live in a spreadsheet::

    path,label,split,group
    images/0001.png,defect,,part-17
    images/0002.png,ok,testing,part-18

* ``path`` and ``label`` are required; ``split`` (training, validation or testing; empty means
  training) and ``group`` (images of one physical part, video or session) are optional. Other
  columns are ignored, so a spreadsheet can be exported as it is. Column names are matched
  without regard to case or surrounding spaces; ``,``, ``;`` and tab separators are recognised.
* Relative paths are relative to the CSV file's folder; absolute paths are kept.
* Every bad row is reported with its line number (the header is line 1) in one
  :class:`~keeneye.errors.DataError`: a missing file, an empty path or label, an unknown split,
  a file listed twice, a label beyond the two classes.

:func:`load_data` is the single entry point used by ``train`` and ``audit``: a folder scan or a
CSV manifest, then groups from ``data.group_pattern`` where the manifest has none.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from keeneye.bundle import MANIFEST_FILE
from keeneye.data.scan import MANIFEST_COLUMNS, SKIPPED_COLUMNS, ScanResult, file_sha1, resolve_class_names, scan_folder
from keeneye.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from keeneye.config import Config

__all__ = ["SPLIT_VALUES", "read_manifest", "load_data"]

#: Accepted values of the ``split`` column (lower-cased, stripped); empty means training.
SPLIT_VALUES = {
    "": "training", "training": "training", "train": "training",
    "validation": "validation", "val": "validation", "valid": "validation",
    "testing": "testing", "test": "testing",
}
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("split", "group")
MAX_LISTED = 20


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (line {line}, byte {exc.start}); save the manifest as UTF-8 CSV.") from None


def _delimiter(header_line: str) -> str:
    """',' unless the header clearly uses ';' or tab (spreadsheet exports in some locales)."""
    if "," in header_line:
        return ","
    for candidate in (";", "\t"):
        if candidate in header_line:
            return candidate
    return ","


def _records(text: str, delimiter: str):
    """(first line number, cells) per CSV record; quoted fields may span lines."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    previous_end = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        start = previous_end + 1
        previous_end = reader.line_num
        yield start, cells


def _problem_message(path: Path, problems: list[tuple[int, str]]) -> str:
    problems = sorted(problems)
    lines = [f"  line {line}: {text}" for line, text in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    rows = len({line for line, _ in problems})
    noun = "bad row" if rows == 1 else "bad rows"
    return f"{path}: {rows} {noun} (line numbers of the file; the header is line 1):\n" + "\n".join(lines)


def read_manifest(csv_path: str | os.PathLike, positive_class: str | None = None) -> ScanResult:
    """Read a CSV manifest into a :class:`ScanResult` (the same shape as :func:`scan_folder`).

    Every bad row is reported at once (line number and reason), not the first one only.
    """
    path = Path(csv_path).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist or is not a file.")
    text = _read_text(path)
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    if not first_line:
        raise DataError(f"{path}: the manifest is empty; expected a header line such as path,label,split,group.")
    delimiter = _delimiter(first_line)
    records = _records(text, delimiter)
    header, position = _header(path, records)
    problems: list[tuple[int, str]] = []
    rows, labelled = _rows(records, header, position, delimiter, path.parent, problems)
    label_counts = Counter(label for _, label in labelled)
    problems += _third_labels(labelled, label_counts)
    if problems:
        raise DataError(_problem_message(path, problems))
    if not rows:
        raise DataError(f"{path}: no images listed (only a header).")
    try:
        class_names = resolve_class_names(list(label_counts), positive_class)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    for row in rows:
        row["sha1"] = file_sha1(Path(row["path"]))
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest["group"] = pd.Series([row["group"] for row in rows], dtype=object, index=manifest.index)  # None, not NaN
    return ScanResult(manifest, pd.DataFrame([], columns=SKIPPED_COLUMNS), class_names)


def _header(path: Path, records) -> tuple[list[str], dict[str, int]]:
    """The header's cells and the position of each known column; a DataError for a repeated or missing column."""
    header_line, header = next((r for r in records if any(c.strip() for c in r[1])), (0, []))
    names = [c.strip().lower() for c in header]
    repeated = sorted(n for n, k in Counter(n for n in names if n).items() if k > 1)
    if repeated:
        raise DataError(f"{path}: line {header_line}: the header names {', '.join(repeated)} more than once.")
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DataError(
            f"{path}: line {header_line}: the header has no {' and no '.join(missing)} column "
            f"(found: {', '.join(repr(c) for c in header) or 'nothing'}); expected columns path,label and optionally split,group."
        )
    return header, {name: names.index(name) for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if name in names}


def _rows(records, header: list[str], position: dict[str, int], delimiter: str, folder: Path,
          problems: list[tuple[int, str]]) -> tuple[list[dict], list[tuple[int, str]]]:
    """(good rows, (line, label) of every row with a label, good or bad); each bad row's reasons go to `problems`."""
    rows: list[dict] = []
    labelled: list[tuple[int, str]] = []
    first_seen: dict[str, int] = {}
    for line, cells in records:
        if not any(c.strip() for c in cells):
            continue  # blank line
        if len(cells) > len(header):
            problems.append((line, f"{len(cells)} fields but the header has {len(header)} (an unquoted '{delimiter}' in a value?)"))
            continue
        cells = [c.strip() for c in cells] + [""] * (len(header) - len(cells))
        value = {name: cells[i] for name, i in position.items()}
        found = len(problems)
        resolved = _resolve_path(line, value["path"], folder, first_seen, problems)
        if not value["label"]:
            problems.append((line, "empty label"))
        else:
            labelled.append((line, value["label"]))
        split_text = value.get("split", "")
        split = SPLIT_VALUES.get(split_text.lower())
        if split is None:
            problems.append((line, f"unknown split {split_text!r}; expected training, validation, testing or empty (= training)"))
        if len(problems) == found:
            rows.append({"path": str(resolved), "label": value["label"], "split": split, "group": value.get("group") or None})
    return rows, labelled


def _resolve_path(line: int, raw_path: str, folder: Path, first_seen: dict[str, int], problems: list[tuple[int, str]]) -> Path | None:
    """The row's file, relative to the manifest's folder; None (and the reason in `problems`) when unusable."""
    if not raw_path:
        problems.append((line, "empty path"))
        return None
    candidate = Path(os.path.expanduser(raw_path))
    resolved = Path(os.path.abspath(candidate if candidate.is_absolute() else folder / candidate))
    if not resolved.exists():
        problems.append((line, f"file not found: {raw_path} (resolved to {resolved})"))
    elif not resolved.is_file():
        problems.append((line, f"{raw_path} is a folder, not a file (resolved to {resolved})"))
    elif str(resolved) in first_seen:
        problems.append((line, f"{raw_path} is listed again (first on line {first_seen[str(resolved)]})"))
    else:
        first_seen[str(resolved)] = line
        return resolved
    return None


def _third_labels(labelled: list[tuple[int, str]], label_counts: Counter) -> list[tuple[int, str]]:
    """A manifest has exactly two labels: every row of a third (fourth, ...) one is a problem."""
    if len(label_counts) <= 2:
        return []
    kept = {label for label, _ in label_counts.most_common(2)}
    summary = ", ".join(f"{label!r} ({n} rows)" for label, n in label_counts.most_common())
    return [(line, f"label {label!r} is a third label; a manifest has exactly two ({summary})")
            for line, label in labelled if label not in kept]


def load_data(cfg: "Config") -> ScanResult:
    """The manifest a run starts from: a CSV manifest (or segment manifest) or a folder scan, videos sampled
    into frames, groups from `data.group_pattern`, frame numbers from frame-sequence file names."""
    from keeneye.data.cache import default_cache_dir
    from keeneye.data.video import is_segment_manifest, segment_scan, with_sequences

    cache_root = cfg.cache_dir or default_cache_dir()
    segments = None
    if cfg.data.manifest_path is not None and is_segment_manifest(cfg.data.manifest_path):
        scan, segments = segment_scan(cfg.data.manifest_path, cfg.positive_class, cfg.video.fps, cache_root)
    elif cfg.data.manifest_path is not None:
        scan = read_manifest(cfg.data.manifest_path, cfg.positive_class)
    else:
        scan = scan_folder(cfg.data_folder_path, cfg.positive_class)
    # videos -> sampled frames (group = video), then data.group_pattern, then frame numbers from file names
    return with_sequences(scan, cfg.video.fps, cache_root, cfg.data.frame_pattern, cfg.data.group_pattern, segments)


def run_testing_manifest(run_dir: str | os.PathLike, class_names: tuple[str, str]) -> ScanResult | None:
    """The testing images a run was evaluated on, from its `manifest.csv` (None when it has none).

    Runs record which rows they evaluated (column `evaluated`: testing, readable, and not left out
    as leaked); older runs fall back to every testing row.
    """
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    frame = pd.read_csv(path, dtype={"path": str, "label": str, "split": str, "group": object, "sha1": object})
    if "evaluated" in frame.columns:
        rows = frame[frame["evaluated"].astype(bool)]
    else:
        rows = frame[frame["split"] == "testing"]
    rows = rows[rows["label"].isin(class_names)]
    sequence = [c for c in ("video", "frame", "time") if c in rows.columns and rows[c].notna().any()]  # frames of videos
    manifest = rows[MANIFEST_COLUMNS + sequence].reset_index(drop=True).astype({"group": object})
    return ScanResult(manifest, pd.DataFrame([], columns=SKIPPED_COLUMNS), class_names)
