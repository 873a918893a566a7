"""Folder layout -> manifest: one row per file with its label, split and content hash.

Nothing downstream reads folders again: everything works from the manifest DataFrame
(columns `path, label, split, group, sha1`). Files that are not images by name, and entries that
are not regular files at all (broken symbolic links, links to folders, pipes), are returned
separately with the reason they were skipped, so every entry on disk is accounted for.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from keeneye.data.decode import IMAGE_EXTENSIONS
from keeneye.data.files import file_digest
from keeneye.data.video import VIDEO_EXTENSIONS
from keeneye.data.split import split_validation  # noqa: F401  (moved to keeneye.data.split; kept importable here)
from keeneye.errors import DataError

MANIFEST_COLUMNS = ["path", "label", "split", "group", "sha1"]
SKIPPED_COLUMNS = ["path", "split", "label", "reason"]
SPLIT_FOLDERS = {"training": "training", "train": "training", "testing": "testing", "test": "testing"}
SPLITS = ("training", "validation", "testing")

# Class names that mark the normal (negative) class; the other class is the positive one.
NORMAL_CLASS_NAMES = frozenset(
    {
        "notflip", "not_flip", "noflip", "ok", "ok_front", "good", "normal", "no_defect", "nodefect",
        "non_defect", "nondefective", "non_defective", "not_defective", "defect_free", "pass", "passed",
        "clean", "negative", "neg", "mt_free", "free", "nominal", "intact", "still", "background",
    }
)
MASK_NAME = re.compile(r"(_|-)(mask|label|labels|gt|seg)$", re.IGNORECASE)


@dataclass
class ScanResult:
    """What a scan found: usable candidate images, skipped files and the class mapping."""

    manifest: pd.DataFrame
    skipped: pd.DataFrame
    class_names: tuple[str, str]  # (negative, positive)
    dropped: pd.DataFrame | None = None  # candidates known unusable before decoding (videos: path, split, label, reason)

    @property
    def positive_class(self) -> str:
        return self.class_names[1]


def skip_reason(path: Path) -> str | None:
    """Why a file is not a candidate image, judged by its name alone (None = candidate)."""
    if path.name.startswith("."):
        return "hidden file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS and path.suffix.lower() not in VIDEO_EXTENSIONS:
        return f"not an image by extension ({path.suffix or 'no extension'})"
    if MASK_NAME.search(path.stem):
        return "mask or label image (name ends in _mask/_label/_gt/_seg)"
    return None


def entry_problem(path: Path) -> str | None:
    """Why a folder entry that is not a regular file (nor a folder) cannot be used; None otherwise.

    Broken symbolic links, links to folders (never followed, so a link cannot pull in a tree or loop),
    FIFOs, sockets and devices: each is reported with a reason instead of vanishing from the counts.
    """
    is_link = path.is_symlink()
    try:
        mode = path.stat().st_mode  # follows links
    except OSError as exc:
        if is_link:
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"broken symbolic link (target {target} does not exist)"
        return f"unreadable entry ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "symbolic link to a folder (not followed)" if is_link else None
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISFIFO: "named pipe", stat.S_ISSOCK: "socket", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device"}
    kind = next((name for test, name in kinds.items() if test(mode)), "special file")
    return f"not a regular file ({kind})"


def walk_files(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every entry under `folder`, recursively and sorted: (regular files, (entry, reason) for the unusable ones)."""
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for path in sorted(folder.rglob("*")):
        problem = entry_problem(path)
        if problem is not None:
            problems.append((path, problem))
        elif not path.is_dir():
            files.append(path)
    return files, problems


def file_sha1(path: Path) -> str | None:
    """Content hash (None when the file cannot be read; the decoder then reports why)."""
    try:
        return file_digest(path, "sha1")
    except OSError:
        return None


def resolve_class_names(labels: list[str], positive_class: str | None) -> tuple[str, str]:
    """Decide which class is positive: the configured one, else the one not named as normal."""
    labels = sorted(set(labels))
    if len(labels) != 2:
        raise DataError(f"expected exactly two classes, found {len(labels)}: {', '.join(labels) or 'none'}.")
    if positive_class is not None:
        if positive_class not in labels:
            raise DataError(f"positive_class '{positive_class}' is not one of the classes found: {labels[0]}, {labels[1]}.")
        negative = labels[0] if labels[1] == positive_class else labels[1]
        return negative, positive_class
    normal = [label for label in labels if label.lower() in NORMAL_CLASS_NAMES]
    if len(normal) == 1:
        negative = normal[0]
        return negative, labels[0] if labels[1] == negative else labels[1]
    raise DataError(
        f"cannot tell which class is the positive one (classes: {labels[0]}, {labels[1]}); "
        f"set positive_class in config.json, e.g. --set positive_class={labels[0]}"
    )


def _split_folders(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder.")
    found: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        split = SPLIT_FOLDERS.get(child.name.lower())
        if split is None or not child.is_dir():
            continue
        if split in found:
            raise DataError(f"{root} has both {found[split].name}/ and {child.name}/; keep one.")
        found[split] = child
    if "training" not in found or "testing" not in found:
        present = ", ".join(sorted(p.name + "/" for p in root.iterdir() if p.is_dir())) or "no folders"
        raise DataError(
            f"{root} must hold training/<class>/ and testing/<class>/ folders (or train/, test/); found: {present}."
        )
    return found


def _scan_split(split_dir: Path, split: str, rows: list[dict], skipped: list[dict]) -> list[str]:
    """Add every entry of `split_dir/<class>/**` to rows or skipped; return the class names found."""
    class_dirs = []
    for entry in sorted(split_dir.iterdir()):
        problem = entry_problem(entry)
        if problem is None and entry.is_dir() and not entry.name.startswith("."):
            class_dirs.append(entry)
            continue
        reason = problem or ("hidden folder (not scanned)" if entry.is_dir() else "file outside a class folder")
        skipped.append({"path": str(entry), "split": split, "label": None, "reason": reason})
    for class_dir in class_dirs:
        files, problems = walk_files(class_dir)
        for path, reason in problems:
            skipped.append({"path": str(path), "split": split, "label": class_dir.name, "reason": reason})
        for path in files:
            reason = skip_reason(path)
            if reason is not None:
                skipped.append({"path": str(path), "split": split, "label": class_dir.name, "reason": reason})
            else:
                rows.append({"path": str(path), "label": class_dir.name, "split": split, "group": None, "sha1": file_sha1(path)})
    return [p.name for p in class_dirs]


def _check_not_empty(split_dir: Path, class_names: list[str], rows: list[dict], skipped: list[dict]) -> None:
    """A class folder without a single candidate image, named now (before any image is decoded)."""
    for name in class_names:
        if any(row["label"] == name and Path(row["path"]).is_relative_to(split_dir) for row in rows):
            continue
        folder = split_dir / name
        here = [item["reason"] for item in skipped if item["label"] == name and Path(item["path"]).is_relative_to(folder)]
        found = f"{len(here)} files, none usable (e.g. {here[0]})" if here else "it is empty"
        raise DataError(f"class folder {folder} holds no images: {found}. Every class needs training images.")


def _frames(rows: list[dict], skipped: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).astype({"group": object})
    return manifest, pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)


def scan_folder(root: str | os.PathLike, positive_class: str | None = None) -> ScanResult:
    """Scan `<root>/training/<class>/**` and `<root>/testing/<class>/**` into a manifest."""
    root = Path(root).expanduser().resolve()
    rows: list[dict] = []
    skipped: list[dict] = []
    folders = _split_folders(root)
    classes_by_split = {split: _scan_split(folder, split, rows, skipped) for split, folder in folders.items()}
    training_classes = classes_by_split["training"]
    if len(training_classes) != 2:
        raise DataError(
            f"{root}: training/ must hold exactly two class folders, found {len(training_classes)}: "
            f"{', '.join(training_classes) or 'none'}."
        )
    _check_not_empty(folders["training"], training_classes, rows, skipped)
    extra = sorted(set(classes_by_split["testing"]) - set(training_classes))
    if extra:
        raise DataError(
            f"{root}: testing/ has class folders not in training/: {', '.join(extra)} "
            f"(training has {', '.join(training_classes)})."
        )
    class_names = resolve_class_names(training_classes, positive_class)
    return ScanResult(*_frames(rows, skipped), class_names)


def scan_evaluation_folder(root: str | os.PathLike, class_names: tuple[str, str]) -> ScanResult:
    """Images to evaluate a trained model on: `root/testing/<class>/**` (or test/), else `root/<class>/**`."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder.")
    split_dir = next((root / name for name in ("testing", "test") if (root / name).is_dir()), root)
    rows: list[dict] = []
    skipped: list[dict] = []
    found = _scan_split(split_dir, "testing", rows, skipped)
    unknown = sorted(set(found) - set(class_names))
    if unknown or not found:
        raise DataError(
            f"{split_dir}: expected class folders named {class_names[0]} and/or {class_names[1]} "
            f"(the model's classes), found: {', '.join(found) or 'none'}."
        )
    return ScanResult(*_frames(rows, skipped), class_names)
