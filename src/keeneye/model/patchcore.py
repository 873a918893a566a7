"""PatchCore (Roth et al., 2022) on the MobileNetV2 backbone: patch features, coreset, memory bank, scores.

One-class inspection: a memory bank of mid-level patch features of good images; an image's
anomaly score is the distance of its most distant patch to its nearest neighbour in the bank,
and the per-patch distances, upsampled and smoothed, are its anomaly map.

* **Patch features** (:func:`build_patch_extractor`): the outputs of a few mid-level MobileNetV2
  blocks (default ``block_6_expand_relu`` at stride 8 and ``block_12_add``, the residual stream, at stride 16),
  each locally averaged over 3 x 3 neighbours (PatchCore's local neighbourhood aggregation),
  resized to the finest layer's grid and concatenated, then reduced by a fixed, seeded random
  projection (Johnson-Lindenstrauss: distances are kept within a small factor) so the bank and
  the nearest-neighbour search stay small. All of it is one Keras model (uint8 in, patch grid
  out) that converts to ONNX like the classifier does.
* **Coreset** (:func:`greedy_coreset`): greedy k-center selection (each new point is the one
  farthest from those chosen), on randomly projected copies of the features for speed, as
  PatchCore does; it keeps the share of patches asked for, bounded by a maximum bank size.
* **Search** (:class:`PatchBank`): exact L2 nearest neighbour, by a blocked GEMM (numpy's BLAS; measured
  4-5x faster than faiss-cpu's IndexFlatL2 here) or by faiss (``backend="faiss"``); or, opt-in
  (``method="ivf"``), approximate: faiss IndexIVFFlat, for banks too large to search exactly in time.
* **Normalised score**: ``s / (s + t)`` for a raw score ``s`` and threshold ``t``: monotone, in
  [0, 1), 0.5 exactly at the threshold, so keeneye's "positive iff probability >= threshold"
  rule and every metric work unchanged with threshold 0.5.

Nothing here imports keeneye's upper layers; keras and faiss are imported where used.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

__all__ = [
    "AnomalyEngine",
    "BANK_FILE",
    "DEFAULT_LAYERS",
    "PATCH_OUTPUT_NAME",
    "PatchBank",
    "anomaly_maps",
    "build_patch_extractor",
    "coreset_size",
    "fit_patch_transform",
    "greedy_coreset",
    "image_scores",
    "ivf_lists",
    "normalise_scores",
    "raw_threshold_from_normalised",
    "raw_patch_model",
    "reweighted_scores",
    "set_patch_transform",
]

DEFAULT_LAYERS = ("block_6_expand_relu", "block_12_add")
#: The memory bank inside an anomaly bundle, beside model.keras (the patch feature graph).
BANK_FILE = "memory_bank.npy"
PATCH_OUTPUT_NAME = "patches"
#: Normalised scores are s / (s + t): 0.5 at the threshold. Recorded in the bundle's metadata.
NORMALISATION = "s / (s + t), s = raw score (mean of the top_k largest patch distances), t = raw threshold"


# --- patch features --------------------------------------------------------------------------


def projection_matrix(in_dim: int, out_dim: int, seed: int) -> np.ndarray:
    """A seeded Gaussian random projection (in_dim, out_dim), scaled so squared norms are kept on average."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((in_dim, out_dim)) / math.sqrt(out_dim)).astype(np.float32)


def build_patch_extractor(
    alpha: float, image_size: int, weights_path: str | os.PathLike | None, layers: Sequence[str] = DEFAULT_LAYERS,
    local_size: int = 3, projection_dim: int | None = 256, seed: int = 0, grid: str = "coarsest", fitted: bool = False,
):
    """Raw RGB uint8 images (N, S, S, 3) -> patch features (N, H, W, D), frozen.

    H x W is the grid of the coarsest (deepest) layer, or of the finest with ``grid="finest"``
    (4x the patches for one stride step: finer maps, 4x the bank and search cost); the other
    layers are resized to it bilinearly (a 2x bilinear reduction is a 2 x 2 average).
    With ``projection_dim`` smaller than the concatenated depth, a fixed 1x1 convolution holding
    :func:`projection_matrix` reduces it (saved in the model; no custom objects needed). With
    ``fitted``, that last 1x1 convolution has a bias and is meant to receive an affine map fitted on
    good patches (:func:`fit_patch_transform`, :func:`set_patch_transform`); until then it holds the
    random projection (or the identity).
    """
    import keras

    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="mobilenet_v2_preprocess")(inputs)
    base = keras.applications.MobileNetV2(input_shape=(image_size, image_size, 3), alpha=alpha, include_top=False, weights=None)
    if weights_path is not None:
        base.load_weights(str(weights_path))
    trunk = keras.Model(base.input, [base.get_layer(name).output for name in layers], name="mobilenet_v2_blocks")
    trunk.trainable = False
    outputs = trunk(scaled, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    sizes = sorted({(int(o.shape[1]), int(o.shape[2])) for o in outputs})
    height, width = sizes[-1] if grid == "finest" else sizes[0]
    parts = []
    for name, output in zip(layers, outputs):
        part = keras.layers.AveragePooling2D(local_size, strides=1, padding="same", name=f"local_{name}")(output)
        if int(part.shape[1]) != height or int(part.shape[2]) != width:
            part = keras.layers.Resizing(height, width, interpolation="bilinear", name=f"grid_{name}")(part)
        parts.append(part)
    merged = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="concatenated")(parts)
    depth = int(merged.shape[-1])
    if fitted:
        out_dim = depth if projection_dim is None else min(projection_dim, depth)
        conv = keras.layers.Conv2D(out_dim, 1, use_bias=True, trainable=False, name=PATCH_OUTPUT_NAME)
        merged = conv(merged)
        start = projection_matrix(depth, out_dim, seed) if out_dim < depth else np.eye(depth, dtype=np.float32)
        conv.set_weights([start[None, None], np.zeros(out_dim, np.float32)])
    elif projection_dim is not None and projection_dim < depth:
        conv = keras.layers.Conv2D(projection_dim, 1, use_bias=False, trainable=False, name=PATCH_OUTPUT_NAME)
        merged = conv(merged)
        conv.set_weights([projection_matrix(depth, projection_dim, seed)[None, None]])
    else:
        merged = keras.layers.Identity(name=PATCH_OUTPUT_NAME)(merged)
    return keras.Model(inputs, merged, name="patch_extractor")


def fit_patch_transform(raw: np.ndarray, out_dim: int | None, projection: str = "random", standardise: bool = False,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The affine map ``((x - mean) / scale) @ P`` fitted on good patches ``raw`` (P, C), as (kernel (C, D), bias (D,)).

    * ``standardise``: every channel divided by its spread among the good patches (PaDiM's insight, a
      diagonal Mahalanobis distance): a channel that varies a lot on good parts no longer dominates the
      distance, and a quiet channel that a defect moves counts. A small floor (1% of the mean spread)
      keeps dead channels from being blown up.
    * ``projection``: ``"random"`` keeps the seeded random projection (distances kept on average);
      ``"pca"`` the ``out_dim`` principal axes of the (standardised) good patches: the directions good
      parts vary along, i.e. what the nearest-neighbour search has to tell apart.
    Centring changes no distance; it only keeps the bias small.
    """
    x = np.asarray(raw, dtype=np.float64)
    depth = x.shape[1]
    out = depth if out_dim is None else min(int(out_dim), depth)
    mean = x.mean(axis=0)
    spread = x.std(axis=0)
    scale = np.maximum(spread, 0.01 * spread.mean() + 1e-12) if standardise else np.ones(depth)
    if out >= depth:
        matrix = np.eye(depth)
    elif projection == "pca":
        _, _, vt = np.linalg.svd((x - mean) / scale, full_matrices=False)
        matrix = vt[:out].T
    else:
        matrix = projection_matrix(depth, out, seed).astype(np.float64)
    kernel = matrix / scale[:, None]
    return kernel.astype(np.float32), (-(mean / scale) @ matrix).astype(np.float32)


def set_patch_transform(extractor, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Put a fitted affine map into the last 1x1 convolution of an extractor built with ``fitted=True``."""
    extractor.get_layer(PATCH_OUTPUT_NAME).set_weights([np.asarray(kernel, np.float32)[None, None], np.asarray(bias, np.float32)])


def raw_patch_model(extractor):
    """The extractor without its last 1x1 convolution: uint8 images -> concatenated, unreduced patch features."""
    import keras

    return keras.Model(extractor.input, extractor.get_layer(PATCH_OUTPUT_NAME).input, name="raw_patches")


# --- coreset ---------------------------------------------------------------------------------


def coreset_size(n_patches: int, share: float, max_size: int) -> int:
    """How many patches the bank keeps: ``share`` of them, at least 1, at most ``max_size``."""
    return int(max(1, min(n_patches, max_size, math.ceil(share * n_patches))))


def _greedy(x: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exact greedy k-center on rows of x (already projected): O(len(x) * count) distance updates."""
    n = len(x)
    squared = np.einsum("ij,ij->i", x, x)
    chosen = np.empty(count, dtype=np.int64)
    chosen[0] = int(rng.integers(n))
    nearest = np.full(n, np.inf, dtype=np.float32)
    for step in range(count):
        if step:
            chosen[step] = int(np.argmax(nearest))
        c = chosen[step]
        distance = squared - 2.0 * (x @ x[c]) + squared[c]
        np.minimum(nearest, distance, out=nearest)
        nearest[c] = -1.0  # never chosen twice, even where float noise leaves a tiny positive distance
    return chosen


def greedy_coreset(
    features: np.ndarray, count: int, projection_dim: int | None = 128, seed: int = 0, chunk_size: int = 8192,
) -> np.ndarray:
    """Indices of ``count`` rows chosen by greedy k-center (farthest-point) selection.

    Starting from a seeded random row, each step adds the row farthest from everything chosen,
    so the largest distance from any row to its nearest chosen row (the covering radius) is at
    most twice the optimum. Distances are computed on a seeded random projection to
    ``projection_dim`` dimensions when the features are wider (PatchCore's speed-up).

    Exact greedy costs ``len(features) * count`` distance updates, hours for the half million
    patches of a few thousand images; above ``chunk_size`` rows the selection is composed:
    greedy within each chunk keeps twice the chunk's share, then greedy over the union keeps
    ``count`` (a composable coreset: the covering radius stays within twice that of the two
    stages together). The first stage costs ``2 * count * chunk_size`` updates whatever the number
    of rows, so chunks are kept small enough (8192 x 128 floats, 4 MB) to stay in the CPU caches.
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    n = len(x)
    count = int(min(max(count, 1), n))
    rng = np.random.default_rng(seed)
    if projection_dim is not None and x.shape[1] > projection_dim:
        x = np.ascontiguousarray(x @ projection_matrix(x.shape[1], projection_dim, seed + 1))
    # Each greedy step is one small matrix-vector product: BLAS threads only add synchronisation
    # (measured on the 2-core machine here, loaded: 5.5 ms per step on one thread, 19 ms on two).
    with _one_blas_thread():
        if n <= chunk_size or count * 2 >= n:
            return _greedy(x, count, rng)
        kept = []
        for start in range(0, n, chunk_size):
            part = x[start : start + chunk_size]
            share = min(len(part), math.ceil(2 * count * len(part) / n))
            kept.append(start + _greedy(part, share, rng))
        union = np.concatenate(kept)
        return union[_greedy(np.ascontiguousarray(x[union]), count, rng)]


# --- the memory bank -------------------------------------------------------------------------


#: Nearest-neighbour search backends: "blas" (blocked float32 GEMM through numpy's BLAS, exact) and
#: "faiss" (faiss IndexFlatL2, exact). Measured on the 2-core CPU here (benchmarks/anomaly.py profile,
#: 20k x 256 bank, 64 casting images of 196 patches, machine loaded): faiss-cpu IndexFlatL2 341 ms/image,
#: 200 ms with 128 dimensions; numpy/OpenBLAS GEMM 109 ms. Hence "blas" by default.
SEARCH_BACKENDS = ("blas", "faiss")
_QUERY_BLOCK = 256
_BANK_BLOCK = 2048
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_BLAS = None
_BLAS_LIMIT = None
_BLAS_USERS = 0
_BLAS_LOCK = threading.Lock()


def _search_pool() -> ThreadPoolExecutor:
    """One thread per physical core, each running whole query blocks on a single-threaded BLAS.

    Measured here (2 cores, machine loaded by other processes; 10k x 128 bank, 32 images of 196
    patches): 53 ms per image with one GEMM on two BLAS threads, 40 ms on one thread: BLAS's threads
    synchronise inside every GEMM and lose most when the CPU is shared. Independent blocks on
    independent threads do not synchronise (the same reason the ONNX engine runs chunks in parallel).
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            import psutil

            _POOL = ThreadPoolExecutor(max(1, psutil.cpu_count(logical=False) or 1), thread_name_prefix="keeneye-search")
        return _POOL


@contextmanager
def _one_blas_thread():
    """Context: BLAS on one thread (threadpoolctl; numpy's OpenBLAS or MKL), restored when the last user leaves.

    Counted, so that overlapping searches from several threads (a server, tests) never restore a
    limit another one set: the process's BLAS threads come back exactly once, at the end.
    """
    global _BLAS, _BLAS_LIMIT, _BLAS_USERS
    with _BLAS_LOCK:
        if _BLAS is None:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        if _BLAS_USERS == 0:
            _BLAS_LIMIT = _BLAS.limit(limits=1, user_api="blas")
        _BLAS_USERS += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_USERS -= 1
            if _BLAS_USERS == 0 and _BLAS_LIMIT is not None:
                _BLAS_LIMIT.restore_original_limits()
                _BLAS_LIMIT = None


#: How the bank is searched: "exact" (every bank row, see SEARCH_BACKENDS) or "ivf" (approximate, faiss IndexIVFFlat).
SEARCH_METHODS = ("exact", "ivf")


def ivf_lists(bank_size: int) -> int:
    """Inverted lists of an IVF index over a bank: about 4 sqrt(bank) (faiss's rule of thumb), at most one per row."""
    return int(max(1, min(bank_size, round(4 * math.sqrt(bank_size)))))


def _ivf_index(features: np.ndarray, nprobe: int, seed: int = 0):
    """A faiss IndexIVFFlat over the bank, built in about a second and the same every time (no k-means).

    The coarse centroids are ``ivf_lists`` bank rows drawn with a fixed seed: a sample follows the
    bank's density, and every list holds at least its own centroid row. Measured on the 48079-patch
    casting bank, casting's validation split (loaded 2-core machine): built in 0.9 s; 16 probes lose
    0.0002 AUROC against exact search at 15.6 vs 55.5 ms per image. faiss's k-means (10 iterations)
    gives more even lists (largest 125 vs 246 rows) and the same AUROC with 8 probes at 8 ms, but takes
    12 s to build, at every bundle load, since the bundle holds only the bank.
    """
    import faiss

    count, dim = features.shape
    lists = ivf_lists(count)
    quantiser = faiss.IndexFlatL2(dim)
    quantiser.add(features[np.sort(np.random.default_rng(seed).choice(count, lists, replace=False))])
    index = faiss.IndexIVFFlat(quantiser, dim, lists)
    index.is_trained = True  # the centroids are given, nothing to train
    index.add(features)
    index.nprobe = int(min(max(nprobe, 1), lists))
    return index


class BankMismatch(ValueError):
    """A memory bank file that is not the one its bundle or export recorded (by sha256)."""


@dataclass
class PatchBank:
    """The memory bank of good patch features (M, D) with L2 nearest-neighbour search, exact or (``method="ivf"``) approximate.

    IVF looks only into the ``nprobe`` lists nearest to each query: the distance it finds is never
    smaller than the exact one (up to rounding), so scores can only rise a little; ``nprobe`` equal to
    the number of lists is exact again.

    The "blas" search is one GEMM per block of queries on an augmented bank ``[m, |m|^2]`` against
    ``[-2q, 1]``: the product is ``|m|^2 - 2 q.m`` directly, so only an argmin pass follows it
    (no separate scale and add passes over the (queries x bank) matrix, which are memory-bound).
    """

    features: np.ndarray
    backend: str = "blas"
    method: str = "exact"
    nprobe: int = 16

    def __post_init__(self) -> None:
        if self.backend not in SEARCH_BACKENDS:
            raise ValueError(f"unknown search backend {self.backend!r}; choose one of {', '.join(SEARCH_BACKENDS)}")
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"unknown search method {self.method!r}; choose one of {', '.join(SEARCH_METHODS)}")
        self.features = np.ascontiguousarray(self.features, dtype=np.float32)
        squared = np.einsum("ij,ij->i", self.features, self.features)
        self._augmented_t = np.ascontiguousarray(np.c_[self.features, squared].T)  # (D + 1, M)
        self.index = None
        if self.backend == "faiss":
            import faiss

            self.index = faiss.IndexFlatL2(int(self.features.shape[1]))
            self.index.add(self.features)
        if self.method == "ivf":
            self.index = _ivf_index(self.features, self.nprobe)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries -> (squared distance to the nearest bank row (Q,), its index (Q,))."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.index is not None:
            found, index = self.index.search(queries, 1)
            found, index = found[:, 0], index[:, 0].astype(np.int64)
            missing = index < 0  # IVF: every probed list was empty (not possible with row centroids; kept safe)
            if missing.any():
                found[missing], index[missing] = self._exact(queries[missing])
            return np.maximum(found, 0.0), index
        return self._exact(queries)

    def _exact(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search by the blocked GEMM, the query blocks spread over the search pool."""
        squared = np.empty(len(queries), np.float32)
        index = np.empty(len(queries), np.int64)
        starts = range(0, len(queries), _QUERY_BLOCK)
        with _one_blas_thread():  # the blocks run concurrently, one core each (see _search_pool)
            list(_search_pool().map(lambda start: self._search_block(queries, start, squared, index), starts))
        return np.maximum(squared, 0.0), index

    def _search_block(self, queries: np.ndarray, start: int, squared: np.ndarray, index: np.ndarray) -> None:
        """One query block against the bank, tile by tile: a running minimum over bank tiles of _BANK_BLOCK rows.

        Each tile's (queries x bank rows) products (256 x 2048 floats, 2 MB) stay in the core's cache
        between the GEMM that writes them and the argmin that reads them; one product matrix over a
        48k bank (48 MB per block) went through main memory twice (measured 27 vs 33 ms per image).
        """
        block = queries[start : start + _QUERY_BLOCK]
        rows = np.arange(len(block))
        augmented = np.empty((len(block), self.dim + 1), np.float32)
        np.multiply(block, -2.0, out=augmented[:, :-1])
        augmented[:, -1] = 1.0
        best = np.full(len(block), np.inf, np.float32)
        best_index = np.zeros(len(block), np.int64)
        products = np.empty((len(block), min(_BANK_BLOCK, len(self))), np.float32)
        for first in range(0, len(self), _BANK_BLOCK):
            tile = self._augmented_t[:, first : first + _BANK_BLOCK]
            found = products[:, : tile.shape[1]]
            np.matmul(augmented, tile, out=found)  # |m|^2 - 2 q.m: the GEMM is all the work
            nearest = found.argmin(axis=1)
            value = found[rows, nearest]
            better = value < best  # strict: ties keep the earlier (lower) index, as one argmin over the bank would
            best[better] = value[better]
            best_index[better] = nearest[better] + first
        index[start : start + len(block)] = best_index
        squared[start : start + len(block)] = best + np.einsum("ij,ij->i", block, block)

    def nearest(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, D) patch features -> (distance (N, H, W) to the nearest bank patch, its index (N, H, W))."""
        patches = np.asarray(patches, dtype=np.float32)
        shape = patches.shape[:-1]
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, np.float32), np.zeros(shape, np.int64)
        squared, index = self.search(patches.reshape(-1, patches.shape[-1]))
        return np.sqrt(squared).reshape(shape).astype(np.float32), index.reshape(shape)

    def distances(self, patches: np.ndarray) -> np.ndarray:
        """(N, H, W, D) patch features -> (N, H, W) Euclidean distance of each patch to its nearest bank patch."""
        return self.nearest(patches)[0]

    def save(self, path: str | os.PathLike) -> None:
        np.save(Path(path), self.features, allow_pickle=False)

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "blas", method: str = "exact", nprobe: int = 16,
             sha256: str | None = None) -> "PatchBank":
        """The bank saved by :meth:`save`; an IVF index (``method="ivf"``) is rebuilt from it, the same every time.

        sha256: the hash its bundle or export recorded; the file is then read once, hashed and refused (BankMismatch)
        unless it matches, so a swapped bank never scores (and is not read twice to be checked).
        """
        path = Path(path)
        if sha256 is None:
            return cls(np.load(path, allow_pickle=False), backend=backend, method=method, nprobe=nprobe)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BankMismatch(f"{path} is not the memory bank recorded with sha256 {sha256[:12]}...")
        return cls(np.load(io.BytesIO(data), allow_pickle=False), backend=backend, method=method, nprobe=nprobe)


# --- scores and maps -------------------------------------------------------------------------


def image_scores(distance_maps: np.ndarray, top_k: int = 1) -> np.ndarray:
    """Image scores from patch distance maps (N, H, W) -> (N,): the mean of each map's ``top_k`` largest distances.

    ``top_k`` 1 is PatchCore's largest patch distance. A few more (measured on the training parts of
    casting and magnetic tile, benchmarks/anomaly_layers.py) are steadier: one harmless outlier patch of a
    good part no longer decides alone, while a defect covers several neighbouring patches.
    """
    maps = np.asarray(distance_maps, dtype=np.float64)
    if not len(maps):
        return np.empty(0, np.float64)
    flat = maps.reshape(len(maps), -1)
    k = int(min(max(top_k, 1), flat.shape[1]))
    if k == 1:
        return flat.max(axis=1)
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(axis=1)


def reweighted_scores(bank: PatchBank, patches: np.ndarray, distances: np.ndarray, index: np.ndarray,
                      neighbours: int, top_k: int = 1) -> np.ndarray:
    """PatchCore's re-weighted image score (Roth et al. 2022, eq. 7; anomalib's ``num_neighbors``).

    For each image's most distant patch q (distance s* to its nearest bank patch m*), the score is
    ``s* * (1 - softmax(-|q - m|)[m*])`` over m* and its ``neighbours - 1`` nearest bank patches:
    close to s* when m* sits in a sparse part of the bank (q is really unusual), smaller when m*
    has many close neighbours that are far from q. ``neighbours`` 1 gives the plain largest distance.
    With ``top_k`` > 1 the weight multiplies the mean of the ``top_k`` largest distances instead of s*.
    """
    scores = image_scores(distances, top_k)
    if neighbours <= 1 or len(bank) < 2 or not len(scores):
        return scores
    n = len(scores)
    flat = distances.reshape(n, -1).argmax(axis=1)
    worst = np.asarray(patches, np.float32).reshape(n, -1, patches.shape[-1])[np.arange(n), flat]  # (N, D)
    centre = bank.features[index.reshape(n, -1)[np.arange(n), flat]]  # m* (N, D)
    k = min(int(neighbours), len(bank))
    around = np.c_[-2.0 * centre, np.ones(n, np.float32)] @ bank._augmented_t  # |m|^2 - 2 m*.m: ranks bank rows by distance to m*
    support = np.argpartition(around, k - 1, axis=1)[:, :k]  # m* and its k - 1 nearest bank patches (any order)
    gap = np.linalg.norm(worst[:, None, :] - bank.features[support], axis=2).astype(np.float64)  # (N, k)
    nearest = gap.min(axis=1)  # |q - m*| = s*: m* is q's nearest bank patch, so it is the smallest of the support
    shifted = np.exp(gap - gap.max(axis=1, keepdims=True))  # softmax is shift-invariant; no overflow
    weights = 1.0 - np.exp(nearest - gap.max(axis=1)) / shifted.sum(axis=1)  # anomalib: 1 - softmax(distances)[..., 0]
    return weights * scores


def normalise_scores(raw: np.ndarray, threshold: float) -> np.ndarray:
    """Raw scores -> s / (s + t) in [0, 1): monotone, exactly 0.5 at the raw threshold t."""
    raw = np.maximum(np.asarray(raw, dtype=np.float64), 0.0)
    return raw / (raw + float(threshold))


def raw_threshold_from_normalised(threshold: float, scale: float = 1.0) -> float:
    """Inverse of ``s / (s + scale)`` at ``threshold``: the raw score that normalises to it."""
    threshold = min(max(float(threshold), 1e-12), 1.0 - 1e-12)
    return scale * threshold / (1.0 - threshold)


def anomaly_maps(distance_maps: np.ndarray, size: int | tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Patch distances (N, H, W) -> maps (N, height, width): bilinear upsampling, then Gaussian smoothing.

    ``sigma`` is in output pixels (PatchCore smooths with sigma 4 at 224 px). Values stay distances
    (same unit as the raw score), so one colour scale can be shared across images.
    """
    height, width = (size, size) if isinstance(size, int) else size
    out = np.empty((len(distance_maps), height, width), np.float32)
    for i, patch_map in enumerate(np.asarray(distance_maps, dtype=np.float32)):
        up = cv2.resize(patch_map, (width, height), interpolation=cv2.INTER_LINEAR)
        out[i] = cv2.GaussianBlur(up, (0, 0), sigmaX=sigma, sigmaY=sigma) if sigma > 0 else up
    return out


# --- the engine: feature graph + bank ----------------------------------------------------------


class AnomalyEngine:
    """Feature engine + memory bank + normalisation: uint8 batch -> normalised anomaly scores (N, 1).

    The raw image score is the mean of the ``top_k`` largest patch distances (1: PatchCore's largest);
    ``neighbours`` > 1 re-weights it as PatchCore does (:func:`reweighted_scores`). Maps are the patch
    distances either way.
    """

    def __init__(self, features: Callable[[np.ndarray], np.ndarray], bank: PatchBank, raw_threshold: float,
                 map_sigma: float = 4.0, neighbours: int = 1, top_k: int = 1) -> None:
        self.features = features
        self.bank = bank
        self.raw_threshold = float(raw_threshold)
        self.map_sigma = float(map_sigma)
        self.neighbours = int(neighbours)
        self.top_k = int(top_k)
        self.name = getattr(features, "name", "keras")
        self.source = f"{getattr(features, 'source', 'model.keras')} + memory bank of {len(bank)} patches"

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """The feature engine's input (H, W, C), so the engine can stand where a classifier engine stands."""
        return getattr(self.features, "input_shape", None)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The Engine contract (runtime.engines): normalised scores (N, 1)."""
        return self(batch)

    def distances_and_scores(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """((N, H, W) distance of each patch to its nearest good patch, raw image scores (N,))."""
        patches = self.features(np.ascontiguousarray(batch, dtype=np.uint8))
        distances, index = self.bank.nearest(patches)
        return distances, reweighted_scores(self.bank, patches, distances, index, self.neighbours, self.top_k)

    def distance_maps(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W) distance of each patch to its nearest good patch."""
        return self.distances_and_scores(batch)[0]

    def raw_scores(self, batch: np.ndarray) -> np.ndarray:
        return self.distances_and_scores(batch)[1]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return normalise_scores(self.raw_scores(batch), self.raw_threshold).astype(np.float32).reshape(-1, 1)

    def maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(anomaly maps (N, S, S) in raw distance units, normalised scores (N,)) for a batch at image_size."""
        distances, raw = self.distances_and_scores(batch)
        size = int(np.asarray(batch).shape[1])
        return anomaly_maps(distances, size, self.map_sigma), normalise_scores(raw, self.raw_threshold)


def overlay_anomaly_map(image: np.ndarray, anomaly_map: np.ndarray, raw_threshold: float, alpha: float = 0.45) -> np.ndarray:
    """Blend an anomaly map over an RGB uint8 image (JET colours; the threshold distance is the middle colour).

    One fixed scale (0 to twice the threshold) for every image, so a good part stays blue instead
    of having its largest harmless patch painted red.
    """
    height, width = image.shape[:2]
    scaled = np.clip(np.asarray(anomaly_map, np.float32) / (2.0 * float(raw_threshold)), 0.0, 1.0)
    stretched = cv2.resize(scaled, (width, height), interpolation=cv2.INTER_LINEAR)
    colours = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * stretched), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(np.ascontiguousarray(image, dtype=np.uint8), 1.0 - alpha, colours, alpha, 0.0)
