"""Benchmark: the data audit on the casting set finds the 64 known byte-identical train/test copies.

Reference: `../shared/data/casting/DUPLICATES_train_test.tsv` (test path, train path; 64 rows).
The audit runs on the folder as shipped (training/ and testing/ only, no validation carved, so every
pair is training-testing), exactly as `keeneye audit` reads it, and is checked for:
  - every listed pair found as an identical-file set spanning training and testing (recall),
  - no identical-file pair that is not in the list, and every reported set truly byte-identical
    (compared byte for byte here, independently of the sha1 the audit used) (precision),
  - the near-duplicates it reports beyond those (perceptual hash, no network needed), with counts.
With --embeddings, the embedding near-duplicate check (cosine of centred MobileNetV2 features,
as train runs it) is added too; it needs the weights (../shared/weights) and takes a few minutes
on 2 cores the first time (the embedding cache makes later runs fast).

    python benchmarks/audit_casting.py [--data ../shared/data/casting] [--embeddings] [--out benchmarks/results/audit_casting.json]

Exit status 1 when the exact-duplicate check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "casting")
    parser.add_argument("--hash-distance", type=int, default=None, help="dHash distance (default: the config default)")
    parser.add_argument("--embeddings", action="store_true", help="also run the embedding near-duplicate check")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default: keeneye's default)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "audit_casting.json")
    args = parser.parse_args()

    from keeneye.config import DataConfig
    from keeneye.data.audit import audit_manifest
    from keeneye.data.scan import scan_folder

    root = args.data / "casting_data"
    hash_distance = DataConfig().near_duplicate_hash_distance if args.hash_distance is None else args.hash_distance
    expected = set()
    for line in (args.data / "DUPLICATES_train_test.tsv").read_text().splitlines():
        if line.strip():
            test_path, train_path = line.split("\t")
            expected.add((str((args.data / test_path).resolve()), str((args.data / train_path).resolve())))

    started = time.perf_counter()
    scan = scan_folder(root)
    scan_seconds = time.perf_counter() - started
    started = time.perf_counter()
    audit = audit_manifest(scan.manifest, scan.class_names, scan.skipped, hash_distance=hash_distance)
    audit_seconds = time.perf_counter() - started
    report = audit.report

    found = set()
    not_identical = []
    for entry in report["exact_duplicates"]["across_splits"]:
        files = entry["files"]
        contents = {Path(f["path"]).read_bytes() for f in files}
        if len(contents) != 1:
            not_identical.append(entry["sha1"])
        tests = [f["path"] for f in files if f["split"] == "testing"]
        trains = [f["path"] for f in files if f["split"] == "training"]
        found |= {(t, r) for t in tests for r in trains}
    within = report["exact_duplicates"]["within_split"]
    missed = sorted(expected - found)
    extra = sorted(found - expected)
    exact_ok = not missed and not extra and not not_identical and not within

    hashed = report["near_duplicates"]["hash"]
    near_test = {p["b_path"] for p in hashed["pairs"] if p["b_split"] == "testing"}
    result = {
        "data": str(root),
        "images": report["n_images"],
        "scan_seconds": round(scan_seconds, 2),
        "audit_seconds": round(audit_seconds, 2),
        "exact_duplicates": {
            "expected_pairs": len(expected),
            "found_train_test_pairs": len(found),
            "missed": missed,
            "extra": extra,
            "sets_not_byte_identical": not_identical,
            "within_split_sets": len(within),
            "conflicting_labels": len(report["exact_duplicates"]["conflicting_labels"]),
            "pass": exact_ok,
        },
        "near_duplicates_hash": {
            "max_distance": hashed["max_distance"],
            "pairs_beyond_identical": hashed["n_pairs"],
            "by_splits": dict(Counter(f"{p['a_split']}-{p['b_split']}" for p in hashed["pairs"])),
            "testing_images_with_a_near_duplicate": len(near_test),
            "distance_histogram": dict(sorted(Counter(p["distance"] for p in hashed["pairs"]).items())),
            "label_disagreements": sum(p["a_label"] != p["b_label"] for p in hashed["pairs"]),
        },
        "leakage": {k: v for k, v in report["leakage"].items() if k != "leaked"},
        "images_summary": {k: report["images"][k] for k in ("formats", "modes")} | {"sizes": report["images"]["sizes"]["most_common"][:3]},
    }

    if args.embeddings:
        result["near_duplicates_embedding"] = embedding_check(scan, audit, args)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("\n".join(audit.summary_lines()))
    print()
    e = result["exact_duplicates"]
    print(f"identical train/test pairs: expected {e['expected_pairs']}, found {e['found_train_test_pairs']}, "
          f"missed {len(missed)}, extra {len(extra)}, not byte-identical {len(not_identical)} -> {'PASS' if exact_ok else 'FAIL'}")
    n = result["near_duplicates_hash"]
    print(f"near-duplicates by dHash (<= {n['max_distance']} of 256 bits) beyond those: {n['pairs_beyond_identical']} pairs, "
          f"{n['testing_images_with_a_near_duplicate']} testing images; label disagreements {n['label_disagreements']}")
    if "near_duplicates_embedding" in result:
        m = result["near_duplicates_embedding"]
        print(f"near-duplicates by embedding (cosine >= {m['threshold']}): {m['pairs_beyond_identical']} pairs, "
              f"{m['testing_images_with_a_near_duplicate']} testing images; both methods: {m['testing_images_also_found_by_hash']}")
    print(f"audit of {report['n_images']} images in {audit_seconds:.1f} s; written to {args.out}")
    return 0 if exact_ok else 1


def embedding_check(scan, audit, args) -> dict:
    from keeneye.config import DataConfig
    from keeneye.inference.engines import KerasEngine
    from keeneye.model.backbone import ResolvedWeights, build_feature_extractor, sha256_of_file
    from keeneye.data.cache import EmbeddingCache, backbone_cache_key, default_cache_dir
    from keeneye.training.features import embed_manifest

    weights = ResolvedWeights(str(args.weights), args.weights, sha256_of_file(args.weights))
    extractor = build_feature_extractor(1.0, 224, weights)
    cache = EmbeddingCache(args.cache_dir or default_cache_dir(), backbone_cache_key("mobilenet_v2", 1.0, 224, weights.sha256))
    started = time.perf_counter()
    embeddings = embed_manifest(scan.manifest, KerasEngine(extractor), extractor.output_shape[-1], 224, cache)
    threshold = DataConfig().near_duplicate_similarity
    audit.add_embedding_near_duplicates(embeddings.features, embeddings.ok, threshold)
    pairs = audit.report["near_duplicates"]["embedding"]["pairs"]
    near_test = {p["b_path"] for p in pairs if p["b_split"] == "testing"}
    by_hash = {p["b_path"] for p in audit.report["near_duplicates"]["hash"]["pairs"] if p["b_split"] == "testing"}
    return {
        "threshold": threshold,
        "seconds": round(time.perf_counter() - started, 1),
        "pairs_beyond_identical": len(pairs),
        "testing_images_with_a_near_duplicate": len(near_test),
        "testing_images_also_found_by_hash": len(near_test & by_hash),
        "label_disagreements": sum(p["a_label"] != p["b_label"] for p in pairs),
        "leaked_testing_images_all_checks": audit.report["leakage"]["leaked_testing_images"],
    }


if __name__ == "__main__":
    sys.exit(main())
