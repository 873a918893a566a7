"""Benchmark: anomaly.search "ivf" on a trained one-class bundle, scored on its VALIDATION split (never testing).

Patch features of the bundle's validation images are computed once with its own feature graph (cached beside
the output as val_patches.npy); then exact search vs IVF (centroids: a seeded sample of bank rows, as keeneye
builds it, or faiss k-means with 10 iterations) with 4 / 8 / 16 probes: validation AUROC (mean of the 10 largest
patch distances, as the bundle scores) and search ms per image, interleaved repeats, medians. This chose
anomaly.nprobe's default on casting's bundle with the whole 10% coreset (48079 patches).

    python benchmarks/anomaly_ivf.py RUN OUT_FOLDER
"""
import json, math, statistics, sys, time
from pathlib import Path
import numpy as np, pandas as pd, faiss
from sklearn.metrics import roc_auc_score
from keeneye.data.decode import load_image
from keeneye.inference.predictor import Predictor
from keeneye.model.patchcore import PatchBank, image_scores

B, OUT = Path(sys.argv[1]), Path(sys.argv[2])
OUT.mkdir(parents=True, exist_ok=True)
man = pd.read_csv(B / "manifest.csv")
val = man[man.split == "validation"].reset_index(drop=True)
y = (val.label == json.loads((B / "metadata.json").read_text())["positive_class"]).to_numpy().astype(int)
cache = OUT / "val_patches.npy"
if cache.exists():
    patches = np.load(cache)
else:
    p = Predictor.from_bundle(B)
    out = []
    for i in range(0, len(val), 32):
        batch = np.stack([p.input_spec.prepare(load_image(x)) for x in val.path[i:i + 32]])
        out.append(p.engine.features(batch))
    patches = np.concatenate(out); np.save(cache, patches)
n, h, w, d = patches.shape
q = np.ascontiguousarray(patches.reshape(-1, d))
bank = np.load(B / "memory_bank.npy")
nlist = round(4 * math.sqrt(len(bank)))
exact = PatchBank(bank)

def build(kind):
    t = time.perf_counter()
    quant = faiss.IndexFlatL2(d)
    ivf = faiss.IndexIVFFlat(quant, d, nlist)
    if kind.startswith("kmeans"):
        ivf.cp.seed = 0; ivf.cp.niter = int(kind[6:]); ivf.train(bank)
    else:  # seeded random sample of bank rows as centroids, no k-means iterations
        rows = np.sort(np.random.default_rng(0).choice(len(bank), nlist, replace=False))
        quant.add(bank[rows]); ivf.is_trained = True
    ivf.add(bank)
    return ivf, time.perf_counter() - t

def auroc(sq):
    return float(roc_auc_score(y, image_scores(np.sqrt(np.maximum(sq, 0)).reshape(n, h, w), 10)))

res = {"nlist": nlist, "bank": len(bank), "n_val": int(n), "n_val_defects": int(y.sum())}
ref = exact.search(q)
res["exact_auroc"] = auroc(ref[0])
variants = {}
for kind in ("sample", "kmeans10"):
    ivf, secs = build(kind)
    sizes = np.array([ivf.invlists.list_size(i) for i in range(nlist)])
    res[f"{kind}_build_s"] = secs; res[f"{kind}_list_size_max_mean"] = [int(sizes.max()), float(sizes.mean())]
    for p in (4, 8, 16):
        variants[f"{kind}_nprobe{p}"] = (ivf, p)
times = {k: [] for k in ["exact", *variants]}
found = {}
for rep in range(3):
    t = time.perf_counter(); exact.search(q); times["exact"].append((time.perf_counter() - t) / n * 1000)
    for k, (ivf, p) in variants.items():
        ivf.nprobe = p
        t = time.perf_counter(); D_, I_ = ivf.search(q, 1); times[k].append((time.perf_counter() - t) / n * 1000)
        found[k] = D_[:, 0]
for k in variants:
    res[k] = {"auroc": auroc(found[k]), "auroc_minus_exact": auroc(found[k]) - res["exact_auroc"],
              "same_distance_share": float(np.mean(np.isclose(found[k], ref[0], rtol=1e-4, atol=1e-4))),
              "ms_per_image": statistics.median(times[k])}
res["exact_ms_per_image"] = statistics.median(times["exact"])
print(json.dumps(res, indent=1))
(OUT / "anomaly_ivf_validation.json").write_text(json.dumps(res, indent=1))
