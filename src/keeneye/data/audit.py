"""Data audit: what is in the data, what is broken, and what leaks from training into testing.

A classifier that scores 99% on a test set full of copies of its training images is worse than
useless, so before anything is trained the manifest is checked for:

* counts per split and class (class balance);
* image formats, sizes and modes, read from the file headers (no full decode where avoidable);
* unreadable files, with the same reasons training gives (one decoder, :mod:`keeneye.data.decode`);
* byte-identical files (the manifest's ``sha1``) within a split and across splits, and identical
  files that carry different labels;
* near-duplicates across splits by a perceptual hash: a 256-bit dHash (16x16 brightness
  gradients of a grey thumbnail, OpenCV), compared by Hamming distance; it needs no network and
  no model, so ``keeneye audit`` runs it anywhere;
* near-duplicates across splits by backbone embeddings (cosine similarity of the pooled
  MobileNetV2 features, centred on the training mean), added by ``train`` once the embeddings
  exist (:meth:`Audit.add_embedding_near_duplicates`);
* groups (parts, videos) that appear in more than one split.

A testing image is *leaked* when it has an identical file, a near-duplicate, or a shared group in
training or validation. ``train`` warns about every leak, and with ``data.drop_leaked_test``
leaves those images out of the evaluation. Everything is written to ``audit.json`` (complete
lists) and ``audit.txt`` (the readable summary that is also printed).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np
import pandas as pd

from keeneye.data.decode import DecodeError, decode_image_bytes
from keeneye.data.decode import _header_size, _jpeg_header, _sniff_format  # cheap header readers, shared on purpose
from keeneye.data.scan import SPLITS
from keeneye.terminal import Reporter, plural

__all__ = [
    "AUDIT_FILE", "AUDIT_SUMMARY_FILE", "Audit", "audit_manifest", "dhash", "hamming_pairs", "inspect_image",
    "audit_config",
]

AUDIT_FILE = "audit.json"
AUDIT_SUMMARY_FILE = "audit.txt"
AUDIT_FORMAT_VERSION = 1
HASH_SIDE = 16  # dHash of a 17x16 grey thumbnail: 16 x 16 = 256 bits
HASH_WORDS = HASH_SIDE * HASH_SIDE // 64
THUMBNAIL = 64  # decode size for hashing (JPEGs are decoded at 1/2..1/8 scale by libjpeg)
GREY_TOLERANCE = 8  # a colour image whose channels never differ by more is "grey content"
BRUTE_FORCE_PAIRS = 50_000_000
MAX_SUMMARY_ITEMS = 10
# Pairs of splits compared for near-duplicates: (fitted on, compared with).
SPLIT_PAIRS = (("training", "testing"), ("validation", "testing"), ("training", "validation"))


# --------------------------------------------------------------------------------------------
# One image: header facts, decodability and its perceptual hash
# --------------------------------------------------------------------------------------------


def dhash(image: np.ndarray) -> np.ndarray:
    """256-bit difference hash of an RGB or grey uint8 image, as 4 uint64 words."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    small = cv2.resize(grey, (HASH_SIDE + 1, HASH_SIDE), interpolation=cv2.INTER_AREA)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return np.packbits(bits).view(np.uint64).copy()


_PNG_MODES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
_JPEG_COMPONENTS = {1: "grayscale", 3: "RGB", 4: "CMYK"}


def _jpeg_components(data: bytes, limit: int = 1 << 16) -> int | None:
    """Number of colour components from the JPEG frame header (SOFn), or None."""
    pos, n = 2, min(len(data), limit)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xDA)):
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA or length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[pos + 9] if pos + 9 < n else None
        pos += 2 + length
    return None


def _declared_mode(fmt: str | None, data: bytes) -> str | None:
    if fmt == "JPEG":
        return _JPEG_COMPONENTS.get(_jpeg_components(data) or -1)
    if fmt == "PNG" and len(data) > 25 and data[12:16] == b"IHDR":
        mode = _PNG_MODES.get(data[25])
        return None if mode is None else mode + (f" {data[24]}-bit" if data[24] == 16 else "")
    if fmt == "BMP" and len(data) > 30:
        bits = int.from_bytes(data[28:30], "little")
        return {8: "palette", 24: "RGB", 32: "RGBA"}.get(bits, f"{bits}-bit")
    return None


def inspect_image(path: str | os.PathLike) -> tuple[dict, np.ndarray | None]:
    """({format, width, height, mode, error}, dHash or None) for one file."""
    facts: dict = {"format": None, "width": None, "height": None, "mode": None, "error": None}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        facts["error"] = f"unreadable: {exc.strerror or exc}"
        return facts, None
    fmt = _sniff_format(data) if data else None
    facts["format"] = fmt
    declared = None
    if fmt is not None:
        declared = _header_size(fmt, data, _jpeg_header(data) if fmt == "JPEG" else None)
        facts["mode"] = _declared_mode(fmt, data)
    try:
        if declared is not None:
            facts["width"], facts["height"] = int(declared[0]), int(declared[1])
            image = decode_image_bytes(data, THUMBNAIL)
        else:  # no cheap header (TIFF, WEBP variants): decode fully once for the size
            full = decode_image_bytes(data)
            facts["height"], facts["width"] = int(full.shape[0]), int(full.shape[1])
            image = cv2.resize(full, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)
    except DecodeError as exc:
        facts["error"] = exc.reason
        return facts, None
    if facts["mode"] in (None, "RGB", "CMYK", "palette", "RGBA"):
        spread = int(np.max(image.max(axis=2).astype(np.int16) - image.min(axis=2)))
        if spread <= GREY_TOLERANCE:
            facts["mode"] = f"{facts['mode'] or 'colour'} (grey content)"
    facts["mode"] = facts["mode"] or "unknown"
    return facts, dhash(image)


def inspect_images(
    paths: list[str], workers: int = 2, progress: Callable[[int], None] | None = None
) -> tuple[pd.DataFrame, np.ndarray]:
    """Facts per path (same order) and an (n, 4) uint64 hash array (zeros where `error` is set)."""
    hashes = np.zeros((len(paths), HASH_WORDS), dtype=np.uint64)
    rows: list[dict] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="keeneye-audit") as pool:
        for i, (facts, value) in enumerate(pool.map(inspect_image, paths, chunksize=16)):
            rows.append(facts)
            if value is not None:
                hashes[i] = value
            if progress and (i + 1) % 64 == 0:
                progress(64)
    if progress and len(paths) % 64:
        progress(len(paths) % 64)
    return pd.DataFrame(rows, columns=["format", "width", "height", "mode", "error"]), hashes


# --------------------------------------------------------------------------------------------
# Pairs within a distance
# --------------------------------------------------------------------------------------------


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a ^ b).sum(axis=-1, dtype=np.int32)


def _brute_force_pairs(a: np.ndarray, b: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    found_i, found_j, found_d = [], [], []
    chunk = max(1, 4_000_000 // max(1, len(b)))
    for start in range(0, len(a), chunk):
        distances = _hamming(a[start : start + chunk, None, :], b[None, :, :])
        i, j = np.nonzero(distances <= max_distance)
        found_i.append(i + start)
        found_j.append(j)
        found_d.append(distances[i, j])
    if not found_i:
        return (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.int32),)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def _block_keys(hashes: np.ndarray, bits: np.ndarray) -> pd.DataFrame:
    """The selected bit positions of every hash as uint64 key columns (for an exact join)."""
    unpacked = np.unpackbits(np.ascontiguousarray(hashes).view(np.uint8), axis=1)[:, bits]
    pad = (-unpacked.shape[1]) % 64
    if pad:
        unpacked = np.pad(unpacked, ((0, 0), (0, pad)))
    words = np.ascontiguousarray(np.packbits(unpacked, axis=1)).view(np.uint64)
    return pd.DataFrame({f"k{w}": words[:, w] for w in range(words.shape[1])})


def _pigeonhole_pairs(a: np.ndarray, b: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two hashes within distance d agree exactly on at least one of d + 1 bit blocks: join on each block."""
    n_bits = a.shape[1] * 64
    candidates = []
    for bits in np.array_split(np.arange(n_bits), max_distance + 1):
        left = _block_keys(a, bits).assign(i=np.arange(len(a)))
        right = _block_keys(b, bits).assign(j=np.arange(len(b)))
        merged = left.merge(right, on=[c for c in left.columns if c.startswith("k")])
        candidates.append(merged[["i", "j"]].to_numpy())
    pairs = np.unique(np.concatenate(candidates), axis=0) if candidates else np.zeros((0, 2), np.int64)
    if not len(pairs):
        return (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.int32),)
    distances = _hamming(a[pairs[:, 0]], b[pairs[:, 1]])
    keep = distances <= max_distance
    return pairs[keep, 0], pairs[keep, 1], distances[keep]


def hamming_pairs(a: np.ndarray, b: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (i, j, distance) with Hamming(a[i], b[j]) <= max_distance, for (n, w) uint64 hash arrays.

    Small inputs are compared exhaustively; large ones through an exact join on bit blocks
    (pigeonhole principle), which only compares pairs that can be within the distance.
    """
    a = np.ascontiguousarray(a, dtype=np.uint64)
    b = np.ascontiguousarray(b, dtype=np.uint64)
    if not len(a) or not len(b) or max_distance < 0:
        return (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.int32),)
    if len(a) * len(b) <= BRUTE_FORCE_PAIRS or max_distance >= a.shape[1] * 16:
        return _brute_force_pairs(a, b, max_distance)
    return _pigeonhole_pairs(a, b, max_distance)


def similar_pairs(a: np.ndarray, b: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (i, j, cosine) with cosine(a[i], b[j]) >= threshold, for row-normalised float arrays."""
    found_i, found_j, found_s = [], [], []
    chunk = max(1, 8_000_000 // max(1, len(b)))
    for start in range(0, len(a), chunk):
        sims = a[start : start + chunk] @ b.T
        i, j = np.nonzero(sims >= threshold)
        found_i.append(i + start)
        found_j.append(j)
        found_s.append(sims[i, j])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)


EMBEDDING_NEIGHBOURS = 2  # mutual top-k: see mutual_neighbour_pairs


def mutual_neighbour_pairs(features: np.ndarray, ok: np.ndarray, threshold: float,
                           k: int = EMBEDDING_NEIGHBOURS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) with i < j (row positions): each among the other's k nearest neighbours, cosine >= threshold.

    Embeddings are centred on the mean of the `ok` rows (pooled ReLU features are all positive, so
    raw cosines of unrelated images are high) and normalised. Why mutual top-2 and not a plain
    cosine cut, measured on the real sets (benchmarks/results/near_duplicate_rules.json): a plain
    cut at 0.9 chains 120 different cast parts into one group on casting, and at 0.95 it still
    paired different solar cells of opposite labels on a homogeneous set; mutual top-2 at 0.9 keeps
    the largest group at 6 on magnetic-tile (a tile was shot about 6 times) with 95% of its pairs
    inside one heuristic tile group, and at 8 on casting with 99.2% same-label pairs. Top-1 would
    pair at most two images, splitting a tile's six shots; top-3 chains 26 casting images.
    """
    rows = np.flatnonzero(np.asarray(ok, dtype=bool))
    if len(rows) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    x = np.asarray(features[rows], dtype=np.float32)
    x = x - x.mean(axis=0)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    k = min(k, len(rows) - 1)
    top = np.empty((len(rows), k), np.int64)
    top_sim = np.empty((len(rows), k), np.float32)
    chunk = max(1, 4_000_000 // len(rows))
    for start in range(0, len(rows), chunk):
        sims = x[start : start + chunk] @ x.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top[start : start + chunk] = part
        top_sim[start : start + chunk] = np.take_along_axis(sims, part, axis=1)
    a = np.repeat(np.arange(len(rows)), k)
    b = top.ravel()
    sim = top_sim.ravel()
    neighbours = set(zip(a.tolist(), b.tolist()))
    keep = (a < b) & (sim >= threshold) & np.fromiter(((j, i) in neighbours for i, j in zip(a, b)), bool, len(a))
    return rows[a[keep]], rows[b[keep]], sim[keep]


def near_duplicate_edges(
    manifest: pd.DataFrame, hashes: np.ndarray | None, readable: np.ndarray | None, hash_distance: int,
    features: np.ndarray | None = None, ok: np.ndarray | None = None, similarity: float = 0.9,
    neighbours: tuple | None = None,
) -> pd.DataFrame:
    """Pairs of rows (positions i < j) that are near-duplicates: `kind` "hash" or "embedding", and its `value`.

    The evidence for automatic groups (:func:`keeneye.data.split.split_units`); identical files
    are joined there by their sha1 already. `neighbours`: mutual_neighbour_pairs(features, ok,
    similarity) when the caller has them (the train's audit needs the same pairs).
    """
    frames = []
    if hashes is not None and hash_distance >= 0:
        rows = np.flatnonzero(readable)
        i, j, d = hamming_pairs(hashes[rows], hashes[rows], hash_distance)
        keep = i < j
        frames.append(pd.DataFrame({"i": rows[i[keep]], "j": rows[j[keep]], "kind": "hash", "value": d[keep].astype(float)}))
    if features is not None:
        i, j, sim = neighbours if neighbours is not None else mutual_neighbour_pairs(features, ok, similarity)
        frames.append(pd.DataFrame({"i": i, "j": j, "kind": "embedding", "value": sim.astype(float)}))
    if not frames:
        return pd.DataFrame({"i": pd.Series(dtype=np.int64), "j": pd.Series(dtype=np.int64), "kind": pd.Series(dtype=object),
                             "value": pd.Series(dtype=float)})
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


def _none_if_nan(value):
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


@dataclass
class Audit:
    """The audit of one manifest: `report` (JSON-ready) and the leaked testing rows."""

    report: dict
    manifest: pd.DataFrame
    drop_leaked_test: bool = False  # data.drop_leaked_test: only changes what the warnings say
    leaks: dict = field(default_factory=dict)  # manifest index -> list of reasons (testing rows)
    validation_leaks: dict = field(default_factory=dict)  # same, for validation rows vs training

    def add_unreadable(self, rows: pd.DataFrame | None) -> None:
        """Files found unusable before the audit looked at images (damaged videos: path, split, label, reason)."""
        if rows is None or not len(rows):
            return
        self.report["images"]["unreadable"] += rows[["path", "split", "label", "reason"]].to_dict(orient="records")
        self._update_warnings()

    # ---- leakage bookkeeping

    def _leak(self, index, split: str, reason: str) -> None:
        target = self.leaks if split == "testing" else self.validation_leaks
        reasons = target.setdefault(index, [])
        if reason not in reasons:
            reasons.append(reason)

    def leaked_test_index(self) -> pd.Index:
        """Manifest index of the testing rows that leaked from training or validation."""
        return pd.Index(sorted(self.leaks), dtype=self.manifest.index.dtype)

    def _update_leakage(self) -> None:
        split = self.manifest["split"]
        n_testing = int((split == "testing").sum())
        kinds = Counter(kind for reasons in self.leaks.values() for kind in {r.split(":", 1)[0] for r in reasons})
        leaked = [
            {"path": self.manifest.at[i, "path"], "label": self.manifest.at[i, "label"], "reasons": self.leaks[i]}
            for i in sorted(self.leaks)
        ]
        previous = self.report.get("leakage", {})
        self.report["leakage"] = {
            "testing_images": n_testing,
            "leaked_testing_images": len(self.leaks),
            "leaked_fraction": round(len(self.leaks) / n_testing, 4) if n_testing else 0.0,
            "by_kind": dict(sorted(kinds.items())),
            "validation_images_leaked_from_training": len(self.validation_leaks),
            "dropped_from_evaluation": previous.get("dropped_from_evaluation"),
            "leaked": leaked,
        }
        self._update_warnings()

    def _update_warnings(self) -> None:
        warnings = []
        r = self.report
        leak = r["leakage"]
        if leak["leaked_testing_images"]:
            kinds = ", ".join(f"{n} {k}" for k, n in leak["by_kind"].items())
            warnings.append(
                f"LEAKAGE: {leak['leaked_testing_images']} of {leak['testing_images']} testing images "
                f"({leak['leaked_fraction']:.1%}) have a copy, a near-duplicate or a shared group in training/validation "
                f"({kinds}); test scores on them are not honest"
                + (f"; {leak['dropped_from_evaluation']} were left out of the evaluation" if leak.get("dropped_from_evaluation")
                   else "; data.drop_leaked_test is set, so they will be left out of the evaluation" if self.drop_leaked_test
                   else "; set data.drop_leaked_test=true to leave them out")
                + "."
            )
        if leak["validation_images_leaked_from_training"]:
            warnings.append(
                f"{leak['validation_images_leaked_from_training']} validation images have a copy, near-duplicate or shared "
                "group in training: early stopping and the threshold are chosen on partly seen data."
            )
        conflicts = r["exact_duplicates"]["conflicting_labels"]
        if conflicts:
            warnings.append(f"{len(conflicts)} sets of identical files carry different labels (label noise).")
        if r["images"]["unreadable"]:
            warnings.append(f"{len(r['images']['unreadable'])} files cannot be decoded (listed in audit.json).")
        groups = r["groups"]
        if groups["crossing_splits"]:
            warnings.append(f"{len(groups['crossing_splits'])} groups appear in more than one split.")
        for split, shares in r["class_balance"].items():
            if shares and min(shares.values()) < 0.1:
                warnings.append(f"{split}: the rarer class is only {min(shares.values()):.1%} of the images.")
        r["warnings"] = warnings

    # ---- embedding near-duplicates (train, after embedding)

    def add_embedding_near_duplicates(self, features: np.ndarray, ok: np.ndarray, threshold: float,
                                      neighbours: tuple | None = None) -> None:
        """Cross-split pairs of mutual nearest neighbours (top-2) whose centred embeddings have cosine >= threshold.

        `features` is aligned with the manifest's rows. The same rule as the automatic groups
        (:func:`mutual_neighbour_pairs`, where the measurements behind it are): a plain cosine cut
        flags merely similar parts of a homogeneous set as leaks. `neighbours`: those pairs when the
        caller computed them already (the automatic groups of a train use the same; a 7,000-image
        similarity matrix is seconds on a small CPU).
        """
        split = self.manifest["split"].to_numpy()
        sha1 = self.manifest["sha1"].to_numpy()
        order = {name: n for n, name in enumerate(SPLITS)}
        pairs = []
        i, j, s = neighbours if neighbours is not None else mutual_neighbour_pairs(features, np.asarray(ok, dtype=bool), threshold)
        for x, y, sim in zip(i, j, s):
            if split[x] == split[y] or (sha1[x] is not None and sha1[x] == sha1[y]):
                continue  # identical files are reported as such
            x, y = (x, y) if order.get(split[x], 0) < order.get(split[y], 0) else (y, x)
            pairs.append(self._pair(x, y, "similarity", round(float(sim), 4)))
            self._leak(self.manifest.index[y], split[y], f"near-duplicate (embedding): cosine {sim:.3f} to {self.manifest['path'].iat[x]}")
        self.report["near_duplicates"]["embedding"] = {
            "method": "mutual nearest neighbours (top-2) of MobileNetV2 pooled features, centred, with cosine similarity >= threshold",
            "threshold": threshold,
            "pairs": pairs,
            "n_pairs": len(pairs),
        }
        self._update_leakage()

    def _pair(self, x: int, y: int, key: str, value) -> dict:
        m = self.manifest
        return {
            "a_path": m["path"].iat[x], "a_split": m["split"].iat[x], "a_label": m["label"].iat[x],
            "b_path": m["path"].iat[y], "b_split": m["split"].iat[y], "b_label": m["label"].iat[y], key: value,
        }

    def mark_dropped(self, n: int) -> None:
        self.report["leakage"]["dropped_from_evaluation"] = int(n)
        self._update_warnings()

    # ---- output

    def summary_lines(self) -> list[str]:
        r = self.report
        lines = []
        counts = pd.DataFrame(r["counts"])
        per_split = counts.groupby("split")["n"].sum() if len(counts) else pd.Series(dtype=int)
        parts = ", ".join(f"{s} {int(per_split[s])}" for s in SPLITS if s in per_split)
        lines.append(f"{r['n_images']} images ({parts}); {r['n_skipped']} other files skipped by name")
        for split, shares in r["class_balance"].items():
            sub = counts[counts["split"] == split]
            text = ", ".join(f"{row.label} {row.n} ({shares[row.label]:.1%})" for row in sub.itertuples())
            lines.append(f"  {split}: {text}")
        images = r["images"]
        sizes = images["sizes"]
        common = ", ".join(f"{s['width']}x{s['height']} ({s['n']})" for s in sizes["most_common"][:3])
        if sizes["distinct"]:
            lines.append(
                f"sizes: {sizes['distinct']} distinct, most common {common}; width {sizes['width']['min']}-{sizes['width']['max']}, "
                f"height {sizes['height']['min']}-{sizes['height']['max']} px"
            )
        lines.append("formats: " + ", ".join(f"{k} {v}" for k, v in images["formats"].items()) +
                     "; modes: " + ", ".join(f"{k} {v}" for k, v in images["modes"].items()))
        lines.append(f"unreadable files: {len(images['unreadable'])}")
        for item in images["unreadable"][:MAX_SUMMARY_ITEMS]:
            lines.append(f"  {item['path']}: {item['reason']}")
        exact = r["exact_duplicates"]
        lines.append(
            f"identical files: {len(exact['within_split'])} sets within a split, {len(exact['across_splits'])} sets across splits "
            f"({exact['testing_images_identical_to_training']} testing images identical to a training/validation image), "
            f"{len(exact['conflicting_labels'])} with conflicting labels"
        )
        near = r["near_duplicates"]
        hashed = near.get("hash")
        if hashed is not None and hashed.get("max_distance", -1) >= 0:
            lines.append(
                f"near-duplicates by perceptual hash (dHash, distance <= {hashed['max_distance']} of 256 bits): "
                f"{plural(hashed['n_pairs'], 'cross-split pair')} beyond identical files"
                + (f" ({_pairs_by_splits(hashed['pairs'])})" if hashed["pairs"] else "")
            )
        embedded = near.get("embedding")
        if embedded is not None:
            lines.append(
                f"near-duplicates by embedding (cosine >= {embedded['threshold']}): {plural(embedded['n_pairs'], 'cross-split pair')} "
                "beyond identical files" + (f" ({_pairs_by_splits(embedded['pairs'])})" if embedded["pairs"] else "")
            )
        groups = r["groups"]
        if groups["n_groups"]:
            lines.append(
                f"groups: {groups['n_groups']} ({groups['images_with_group']} images with a group), "
                f"{len(groups['crossing_splits'])} in more than one split"
            )
        else:
            lines.append("groups: none given")
        auto = groups.get("automatic")
        if auto:
            lines.append(
                f"automatic groups (near-duplicate evidence): {auto['n_groups']} formed, joining {auto['n_images']} images; "
                f"largest {auto['largest']} images; {auto['edges_ignored']} links between different given groups ignored"
            )
        leak = r["leakage"]
        lines.append(
            f"leaked testing images: {leak['leaked_testing_images']} of {leak['testing_images']}"
            + (f" ({', '.join(f'{n} {k}' for k, n in leak['by_kind'].items())})" if leak["by_kind"] else "")
            + (f"; {leak['dropped_from_evaluation']} left out of the evaluation" if leak.get("dropped_from_evaluation") else "")
        )
        for warning in r["warnings"]:
            lines.append(f"warning: {warning}")
        return lines

    def to_json(self) -> str:
        return json.dumps(self.report, indent=2, allow_nan=False, default=_json_default)

    def write(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / AUDIT_FILE).write_text(self.to_json())
        (folder / AUDIT_SUMMARY_FILE).write_text("Data audit\n" + "\n".join(self.summary_lines()) + "\n")
        return folder / AUDIT_FILE


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _pairs_by_splits(pairs: list[dict]) -> str:
    counts = Counter(f"{p['a_split']}-{p['b_split']}" for p in pairs)
    return ", ".join(f"{k} {n}" for k, n in counts.items())


def audit_manifest(
    manifest: pd.DataFrame,
    class_names: tuple[str, str],
    skipped: pd.DataFrame | None = None,
    hash_distance: int = 10,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
    drop_leaked_test: bool = False,
    inspection: tuple[pd.DataFrame, np.ndarray] | None = None,
    auto_groups: dict | None = None,
) -> Audit:
    """Audit a split manifest (`path, label, split, group, sha1`); see the module docstring.

    inspection: :func:`inspect_images` of the manifest's paths when already done (train hashes the
    images before splitting, for the automatic groups); auto_groups: what those groups joined.
    """
    started = time.perf_counter()
    manifest = manifest.copy()
    if inspection is None:
        inspection = inspect_images(manifest["path"].tolist(), workers=workers, progress=progress)
    facts, hashes = inspection[0].copy(), inspection[1]
    facts.index = manifest.index
    counts, balance = _counts_and_balance(manifest)
    report = {
        "format": AUDIT_FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "class_names": list(class_names),
        "n_images": int(len(manifest)),
        "n_skipped": int(0 if skipped is None else len(skipped)),
        "skipped_reasons": {} if skipped is None or not len(skipped) else dict(Counter(skipped["reason"]).most_common()),
        "counts": [{"split": s, "label": lab, "n": int(n)} for s, lab, n in counts.itertuples(index=False)],
        "class_balance": balance,
        "images": _image_facts(manifest, facts),
    }
    audit = Audit(report, manifest, drop_leaked_test=drop_leaked_test)
    report["exact_duplicates"] = _identical_files(audit, manifest)
    readable = facts["error"].isna().to_numpy()
    report["near_duplicates"] = {"hash": _hash_near_duplicates(audit, manifest, readable, hashes, hash_distance)}
    report["groups"] = _group_leaks(audit, manifest) | {"automatic": auto_groups}
    report["seconds"] = round(time.perf_counter() - started, 2)
    audit._update_leakage()
    return audit


def _counts_and_balance(manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Images per split and class (splits in SPLITS order), and each class's share within its split."""
    counts = manifest.groupby(["split", "label"]).size().rename("n").reset_index()
    order = {s: i for i, s in enumerate(SPLITS)}
    counts = counts.sort_values(["split", "label"], key=lambda s: s.map(order) if s.name == "split" else s)
    balance = {
        s: {lab: round(int(n) / int(sub["n"].sum()), 4) for lab, n in zip(sub["label"], sub["n"])}
        for s, sub in counts.groupby("split", sort=False)
    }
    return counts, balance


def _image_facts(manifest: pd.DataFrame, facts: pd.DataFrame) -> dict:
    """Formats, modes and sizes (from the headers) and the unreadable files with their reasons."""
    readable = facts["error"].isna().to_numpy()
    sized = facts[readable & facts["width"].notna().to_numpy()]
    size_counts = Counter(zip(sized["width"].astype(int), sized["height"].astype(int)))
    return {
        "formats": dict(Counter("not an image" if pd.isna(f) else str(f) for f in facts["format"]).most_common()),
        "modes": dict(Counter("unknown" if pd.isna(m) else str(m) for m in facts.loc[readable, "mode"]).most_common()),
        "sizes": {
            "distinct": len(size_counts),
            "most_common": [{"width": w, "height": h, "n": n} for (w, h), n in size_counts.most_common(10)],
            "width": _stats(sized["width"]),
            "height": _stats(sized["height"]),
        },
        "unreadable": [
            {"path": manifest.at[i, "path"], "split": manifest.at[i, "split"], "label": manifest.at[i, "label"], "reason": facts.at[i, "error"]}
            for i in manifest.index[~readable]
        ],
    }


def _identical_files(audit: Audit, manifest: pd.DataFrame) -> dict:
    """Sets of byte-identical files (sha1) within and across splits; a later split's copy of an earlier one leaks."""
    within, across, conflicting = [], [], []
    n_test_identical = 0
    sha = manifest["sha1"].astype(object)
    repeated = sha[sha.notna() & sha.duplicated(keep=False)]
    for digest, index in repeated.groupby(repeated, sort=True).groups.items():
        rows = manifest.loc[index]
        entry = {"sha1": digest, "files": [{"path": p, "split": s, "label": lab} for p, s, lab in zip(rows["path"], rows["split"], rows["label"])]}
        if rows["label"].nunique() > 1:
            conflicting.append(entry)
        if rows["split"].nunique() == 1:
            within.append(entry | {"split": rows["split"].iat[0]})
            continue
        across.append(entry)
        for right in ("validation", "testing"):
            earlier = [s for s in SPLITS[: SPLITS.index(right)]]
            sources = rows[rows["split"].isin(earlier)]
            if sources.empty:
                continue
            for i in rows.index[rows["split"] == right]:
                audit._leak(i, right, f"identical: same file content as {sources['path'].iat[0]}")
                n_test_identical += right == "testing"
    return {
        "within_split": within,
        "across_splits": across,
        "conflicting_labels": conflicting,
        "testing_images_identical_to_training": int(n_test_identical),
    }


def _hash_near_duplicates(audit: Audit, manifest: pd.DataFrame, readable: np.ndarray, hashes: np.ndarray, hash_distance: int) -> dict:
    """Cross-split pairs within `hash_distance` dHash bits (identical files aside); the later split's image leaks."""
    pairs = []
    split = manifest["split"].to_numpy()
    sha_values = manifest["sha1"].astype(object).to_numpy()
    if hash_distance >= 0:
        for left, right in SPLIT_PAIRS:
            a = np.flatnonzero(readable & (split == left))
            b = np.flatnonzero(readable & (split == right))
            i, j, d = hamming_pairs(hashes[a], hashes[b], hash_distance)
            for x, y, dist in zip(a[i], b[j], d):
                if sha_values[x] is not None and sha_values[x] == sha_values[y]:
                    continue
                pairs.append(audit._pair(x, y, "distance", int(dist)))
                audit._leak(manifest.index[y], right, f"near-duplicate (hash): dHash distance {int(dist)} to {manifest['path'].iat[x]}")
    return {
        "method": f"dHash of a {HASH_SIDE + 1}x{HASH_SIDE} grey thumbnail ({HASH_SIDE * HASH_SIDE} bits), Hamming distance",
        "max_distance": hash_distance,
        "pairs": pairs,
        "n_pairs": len(pairs),
    }


def _group_leaks(audit: Audit, manifest: pd.DataFrame) -> dict:
    """Groups (parts, videos) in more than one split; a later split's image whose group is in an earlier split leaks."""
    groups = manifest["group"].astype(object)
    has_group = groups.notna() & (groups.astype(str) != "")
    crossing = []
    if has_group.any():
        grouped = manifest[has_group].assign(group=groups[has_group].astype(str))
        per_group = grouped.groupby("group")["split"].agg(lambda s: dict(Counter(s)))
        for group, by_split in per_group.items():
            if len(by_split) > 1:
                crossing.append({"group": group, "splits": by_split})
        fit_groups = {s: set(grouped.loc[grouped["split"] == s, "group"]) for s in SPLITS}
        for i, row in grouped.iterrows():
            if row["split"] == "testing":
                seen = [s for s in ("training", "validation") if row["group"] in fit_groups[s]]
            elif row["split"] == "validation":
                seen = ["training"] if row["group"] in fit_groups["training"] else []
            else:
                seen = []
            if seen:
                audit._leak(i, row["split"], f"group: group {row['group']!r} is also in {' and '.join(seen)}")
    return {
        "n_groups": int(groups[has_group].astype(str).nunique()),
        "images_with_group": int(has_group.sum()),
        "crossing_splits": crossing,
    }


def _stats(values: Iterable) -> dict:
    values = pd.Series(values, dtype=float).dropna()
    if values.empty:
        return {"min": None, "median": None, "max": None}
    return {"min": int(values.min()), "median": float(values.median()), "max": int(values.max())}


# --------------------------------------------------------------------------------------------
# `keeneye audit --config config.json`
# --------------------------------------------------------------------------------------------


@dataclass
class AuditRun:
    folder: Path
    audit: Audit
    split_notes: list[str]


def audit_config(config, overrides=(), output: str | os.PathLike | None = None, console=None) -> AuditRun:
    """Load the data exactly as `train` would (same split, same seed), audit it and write the files.

    console: a rich Console or a terminal.Reporter (where the summary is printed).
    """
    from rich.markup import escape

    from keeneye.config import Config, load_config
    from keeneye.data.manifest import load_data
    from keeneye.data.split import split_with_auto_groups

    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    reporter = Reporter.of(console)
    scan = load_data(cfg)
    inspection = inspect_images(scan.manifest["path"].tolist())
    split = split_with_auto_groups(cfg, scan.manifest, inspection)  # no embeddings here: identical files and hashes
    audit = audit_manifest(split.manifest, scan.class_names, scan.skipped, hash_distance=cfg.data.near_duplicate_hash_distance,
                           drop_leaked_test=cfg.data.drop_leaked_test, inspection=inspection, auto_groups=split.auto_groups)
    audit.report["data_source"] = str(cfg.data.manifest_path or cfg.data_folder_path)
    audit.report["split_notes"] = split.notes
    audit.add_unreadable(scan.dropped)  # videos that could not be (fully) decoded
    folder = Path(output) if output is not None else Path(cfg.output_dir) / "audits" / time.strftime("audit-%Y%m%d-%H%M%S")
    audit.write(folder)
    print_summary(audit, reporter, split.notes)
    reporter.print(f"audit written to [bold]{escape(str(folder / AUDIT_FILE))}[/] and {AUDIT_SUMMARY_FILE}")
    return AuditRun(folder, audit, split.notes)


def print_summary(audit: Audit, console, notes: Iterable[str] = ()) -> None:
    """The readable summary on the console; leakage warnings in bold red."""
    from rich.markup import escape

    console.print("[bold]Data audit[/]")
    for note in notes:
        console.print(f"  split: {escape(note)}", highlight=False)
    for line in audit.summary_lines():
        if line.startswith("warning: LEAKAGE"):
            console.print(f"[bold red]{escape(line)}[/]", highlight=False)
        elif line.startswith("warning:"):
            console.print(f"[yellow]{escape(line)}[/]", highlight=False)
        else:
            console.print(f"  {escape(line)}", highlight=False)


def settle_leakage(audit: Audit, testing: np.ndarray, drop: bool, console) -> np.ndarray:
    """Warn about leaked testing images among `testing` (a row mask); with `drop`, remove them from it.

    Returns the testing mask to evaluate on. Raises DataError when nothing would be left.
    """
    from rich.markup import escape

    from keeneye.errors import DataError

    embedded = audit.report["near_duplicates"].get("embedding")
    if embedded is not None:
        console.print(
            f"near-duplicates by embedding (cosine >= {embedded['threshold']}): {plural(embedded['n_pairs'], 'cross-split pair')} "
            "beyond identical files", highlight=False,
        )
    leaked = audit.manifest.index.isin(audit.leaked_test_index())
    n_leaked = int((testing & leaked).sum())
    if n_leaked and drop:
        testing = testing & ~leaked
        audit.mark_dropped(n_leaked)
        console.print(
            f"[bold]data.drop_leaked_test: {n_leaked} leaked testing images left out of the evaluation[/]; "
            f"evaluating on the other {int(testing.sum())} (listed in audit.json).", highlight=False,
        )
        if not testing.any():
            raise DataError(
                "every testing image leaked from training or validation, so nothing is left to evaluate on; "
                "fix the split (see audit.json) or set data.drop_leaked_test=false."
            )
    elif n_leaked:
        for warning in audit.report["warnings"]:
            if warning.startswith("LEAKAGE"):
                console.print(f"[bold red]{escape(warning)}[/]", highlight=False)
    return testing


def leakage_summary(audit: Audit) -> dict:
    """The few leakage numbers that belong in metrics.json."""
    leak = audit.report["leakage"]
    return {
        "leaked_testing_images": leak["leaked_testing_images"],
        "left_out_of_evaluation": leak.get("dropped_from_evaluation") or 0,
        "by_kind": leak["by_kind"],
    }
