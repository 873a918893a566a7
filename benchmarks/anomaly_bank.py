"""How large must the memory bank be, and how fast is the search? (issue #13: max_bank_size, search backend)

For the default patch features and score (block_6_expand_relu + block_12_add, 3 x 3 averaged, seeded random
projection to 128; mean of the 10 largest patch distances), never on a test split: a one-class casting bundle
trained on the full ``ok_front`` training set with an uncapped 10% coreset
(``benchmarks/anomaly.py casting --set anomaly.max_bank_size=50000``), scored on its own validation split
(held-out training images: good ones and defects).

The bank is a 10% greedy coreset; a smaller cap c is its first c patches (greedy selection is a sequence:
its first c picks are the greedy c-subset of the union it ran on; the product's chunked selection for a
cap c differs only in how many candidates each chunk passes on). For each cap: image AUROC and the exact
search time per image (PatchBank, "blas"). For the whole bank also faiss's approximate indexes
(IVF-flat with 4 sqrt(M) lists, HNSW with 32 links), their AUROC change and time.

    python benchmarks/anomaly_bank.py casting --bundle RUN_DIR [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TOP_K = 10


def timed(call, repeats: int = 3):
    """(result of the last call, median seconds)."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = call()
        seconds.append(time.perf_counter() - started)
    return out, statistics.median(seconds)


def image_score(distances: np.ndarray) -> np.ndarray:
    """The default image score: the mean of the 10 largest patch distances (per image, any map shape)."""
    from keeneye.model.patchcore import image_scores

    return image_scores(distances, TOP_K)


def sweep(ordered: np.ndarray, query: np.ndarray, y: np.ndarray, caps: list[int], approximate: bool) -> dict:
    """AUROC and exact search ms/image for the first c rows of a greedy-ordered bank, for each cap c and the whole
    bank; with `approximate`, faiss's approximate indexes on the whole bank too."""
    from sklearn.metrics import roc_auc_score

    from keeneye.model.patchcore import PatchBank

    out = {"bank": int(len(ordered)), "caps": []}
    for cap in sorted({min(c, len(ordered)) for c in caps} | {len(ordered)}):
        bank = PatchBank(ordered[:cap])
        distances, seconds = timed(lambda: bank.distances(query), 1)
        scores = image_score(distances)
        out["caps"].append({"cap": int(cap), "auroc": float(roc_auc_score(y, scores)), "search_ms_per_image": seconds / len(query) * 1000})
        print(f"    cap {cap}: AUROC {out['caps'][-1]['auroc']:.4f}, exact search {out['caps'][-1]['search_ms_per_image']:.1f} ms/image",
              flush=True)
    if approximate:
        flat = np.ascontiguousarray(query.reshape(-1, query.shape[-1]))
        out["approximate"] = approximate_indexes(ordered, flat, len(query), y, out["caps"][-1]["auroc"])
    return out


def approximate_indexes(bank: np.ndarray, flat: np.ndarray, n_images: int, y: np.ndarray, exact_auroc: float) -> list[dict]:
    """faiss IVF-flat and HNSW on the whole bank: AUROC change against exact search, and ms per image."""
    import faiss
    from sklearn.metrics import roc_auc_score

    rows = []
    lists = int(4 * np.sqrt(len(bank)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(bank.shape[1]), bank.shape[1], lists)
    ivf.train(bank)
    ivf.add(bank)
    candidates = [(f"ivf{lists} nprobe {p}", ivf, lambda i, p=p: setattr(i, "nprobe", p)) for p in (1, 4, 16)]
    hnsw = faiss.IndexHNSWFlat(bank.shape[1], 32)
    hnsw.add(bank)
    candidates += [(f"hnsw32 ef {e}", hnsw, lambda i, e=e: setattr(i.hnsw, "efSearch", e)) for e in (16, 64)]
    for name, index, tune in candidates:  # one run each: faiss is slow here (benchmarks/anomaly.py times its IndexFlatL2)
        tune(index)
        (found, _), seconds = timed(lambda: index.search(flat, 1), 1)
        scores = image_score(np.sqrt(np.maximum(found[:, 0], 0)).reshape(n_images, -1))
        auroc = float(roc_auc_score(y, scores))
        rows.append({"index": name, "auroc": auroc, "auroc_change": auroc - exact_auroc, "search_ms_per_image": seconds / n_images * 1000,
                     "faiss_threads": faiss.omp_get_max_threads()})
        print(f"    {name}: AUROC {auroc:.4f} ({auroc - exact_auroc:+.4f}), {rows[-1]['search_ms_per_image']:.1f} ms/image", flush=True)
    return rows


def casting(run_dir: Path) -> dict:
    """Prefixes of a casting bundle's own bank (trained uncapped at 10%), scored on the bundle's validation split."""
    from keeneye.inference.predictor import Predictor
    from keeneye.runtime.batches import iter_batches

    manifest = pd.read_csv(run_dir / "manifest.csv")
    rows = manifest[(manifest["split"] == "validation") & manifest["used"]]
    predictor = Predictor.from_bundle(run_dir)
    engine = predictor.engine
    query = np.zeros((len(rows), *engine.features(np.zeros((1, *predictor.input_spec.shape), np.uint8)).shape[1:]), np.float32)
    for keys, batch, failures in iter_batches(enumerate(rows["path"]), predictor.bundle.image_size, 16):
        assert not failures, failures
        query[keys] = engine.features(batch)
    y = (rows["label"] == predictor.bundle.positive_class).to_numpy().astype(int)
    print(f"casting validation split of {run_dir.name}: {len(rows)} images ({y.sum()} defects), bank {len(engine.bank)}", flush=True)
    ordered = np.load(run_dir / "memory_bank.npy")
    return {"bundle": str(run_dir), "n_validation": int(len(rows)), "n_defects": int(y.sum())} | sweep(
        ordered, query, y, [2500, 5000, 10000, 20000], approximate=True)


def main() -> int:
    from anomaly_tune import write_results  # the sibling script: one place for the results file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="casting", choices=["casting"])
    parser.add_argument("--bundle", type=Path, help="casting: a one-class casting bundle trained with an uncapped 10%% bank "
                        "(benchmarks/anomaly.py casting --set anomaly.max_bank_size=50000)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    results["casting_validation"] = casting(args.bundle)
    out = args.out or RESULTS / f"anomaly_bank_{args.which}.json"
    write_results(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
