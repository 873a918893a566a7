"""Honest validation: automatic groups, group folds, out-of-fold thresholds and objectives, the fine-tune rule."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from keeneye.config import EvaluationConfig, HeadConfig, TrainingConfig
from keeneye.data.audit import audit_manifest, inspect_images, mutual_neighbour_pairs, near_duplicate_edges
from keeneye.data.split import assign_splits, split_units
from keeneye.evaluation.threshold import choose_threshold
from keeneye.training.crossval import HeadCandidate, group_folds, paired_differences, run_cross_validation, select_candidate
from keeneye.training.finetune import judge_fine_tuning


def texture(seed: int, size: int = 128) -> np.ndarray:
    """A distinct structured grey image: smoothed noise and a few lines."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 5)
    grey = np.clip(128 + 60 * noise / noise.std(), 0, 255).astype(np.uint8)
    for _ in range(3):
        p, q = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(grey, tuple(int(v) for v in p), tuple(int(v) for v in q), int(rng.integers(0, 255)), 3)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)


def shifted(image: np.ndarray, dx: int = 3) -> np.ndarray:
    return np.roll(image, dx, axis=1)


def relit(image: np.ndarray) -> np.ndarray:
    return np.clip(image.astype(np.float32) * 1.15 + 12, 0, 255).astype(np.uint8)


@pytest.fixture()
def near_copies(tmp_path: Path) -> pd.DataFrame:
    """Six distinct parts; parts 0 and 1 also have a shifted and a re-lit copy (as JPEG)."""
    rows = []
    for part in range(6):
        image = texture(100 + part)
        versions = {"orig.png": image}
        if part < 2:
            versions |= {"shifted.jpg": shifted(image), "relit.jpg": relit(image)}
        for name, picture in versions.items():
            path = tmp_path / f"p{part}_{name}"
            assert cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
            rows.append({"path": str(path), "label": "defect" if part % 2 else "good", "split": "training",
                         "group": None, "sha1": f"sha-{part}-{name}", "part": part})
    return pd.DataFrame(rows).astype({"group": object})


def test_automatic_groups_join_shifted_and_relit_copies_only(near_copies: pd.DataFrame, imagenet_weights: Path) -> None:
    """The perceptual hash catches the re-lit copy but not the shifted one (dHash is shift-sensitive: 3 px moves
    ~50 of 256 bits); the mutual embedding neighbours (real MobileNetV2 features) catch both. Distinct parts stay apart."""
    from keeneye.inference.engines import KerasEngine
    from keeneye.model.backbone import ResolvedWeights, build_feature_extractor
    from keeneye.training.features import embed_manifest

    facts, hashes = inspect_images(near_copies["path"].tolist())
    readable = facts["error"].isna().to_numpy()
    part = near_copies["part"].to_numpy()
    name = near_copies["path"].map(lambda p: Path(p).name.split("_", 1)[1]).to_numpy()
    by_hash = split_units(near_copies, near_duplicate_edges(near_copies, hashes, readable, 10))
    assert by_hash[(part == 0) & (name == "relit.jpg")] == by_hash[(part == 0) & (name == "orig.png")]
    assert by_hash[(part == 0) & (name == "shifted.jpg")] != by_hash[(part == 0) & (name == "orig.png")]

    extractor = build_feature_extractor(1.0, 96, ResolvedWeights("file", imagenet_weights, None))
    embeddings = embed_manifest(near_copies, KerasEngine(extractor), extractor.output_shape[-1], 96, None)
    # Similarity 0.4, not the default 0.9: centred on the mean of only ten images, the copies' cosines are
    # 0.46-0.86 and the distinct parts' at most 0.21 (on real sets of hundreds the default separates them).
    edges = near_duplicate_edges(near_copies, hashes, readable, 10, embeddings.features, embeddings.ok, 0.4)
    units = split_units(near_copies, edges)
    for p in range(6):
        assert len(set(units[part == p])) == 1, f"the copies of part {p} are apart"
    assert len(set(units)) == 6, "distinct parts were joined"
    # given groups rule: a link between two different given groups is ignored
    given = near_copies.assign(group=[f"g{i}" for i in range(len(near_copies))])
    assert len(set(split_units(given, edges))) == len(near_copies)


def test_audit_reports_the_automatic_groups(near_copies: pd.DataFrame) -> None:
    inspection = inspect_images(near_copies["path"].tolist())
    edges = near_duplicate_edges(near_copies, inspection[1], inspection[0]["error"].isna().to_numpy(), 10)
    result = assign_splits(near_copies.drop(columns="part"), 0.3, 0.3, seed=0, edges=edges)
    # the hash joins each re-lit copy to its original: two groups of two
    assert result.auto_groups["n_groups"] == 2 and result.auto_groups["largest"] == 2 and result.auto_groups["n_images"] == 4
    joined = pd.Series(result.units).groupby(result.units).transform("size").to_numpy() == 2
    assert result.manifest[joined].groupby(result.units[joined])["split"].nunique().max() == 1, "a group was split apart"
    audit = audit_manifest(result.manifest, ("good", "defect"), inspection=inspection, auto_groups=result.auto_groups)
    assert any(line.startswith("automatic groups (near-duplicate evidence): 2 formed") and "largest 2" in line
               for line in audit.summary_lines())


def test_mutual_neighbours_do_not_chain_a_homogeneous_set() -> None:
    """Many similar vectors (cosines above 0.9 everywhere) stay apart; a planted near-copy pair joins."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=64)
    x = base + 0.25 * rng.normal(size=(40, 64))
    x[39] = x[3] + 0.01 * rng.normal(size=64)
    i, j, sim = mutual_neighbour_pairs(x, np.ones(40, bool), 0.9)
    pairs = set(zip(i.tolist(), j.tolist()))
    assert (3, 39) in pairs
    assert len(pairs) <= 12, pairs  # top-2 mutual: at most a sparse set of pairs, never one big component


@pytest.mark.parametrize("seed", [0, 5])
def test_folds_never_share_a_group(seed: int) -> None:
    rng = np.random.default_rng(seed)
    units = np.repeat(np.arange(60), rng.integers(1, 7, 60))
    labels = (rng.random(60) < 0.3).astype(int)[units]
    folds = group_folds(labels, units, 5, seed)
    assert set(folds) == set(range(5))
    assert pd.Series(folds).groupby(units).nunique().max() == 1
    for k in range(5):  # stratified: every fold holds both classes
        assert set(labels[folds == k]) == {0, 1}
    assert group_folds(labels, np.where(labels == 1, 0, units), 5, seed) is None  # one positive group: no folds


Y = np.array([0, 0, 1, 1, 0, 1])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.7])


def test_out_of_fold_threshold_matches_the_hand_computed_one() -> None:
    """Cuts (positive iff p >= c): F1 is .5, .8, .667, .857, .75, .667 for c = .8 .7 .4 .35 .2 .1; the best cut
    .35 is placed midway to the next lower probability .2: 0.275."""
    choice = choose_threshold(Y, P, min_per_class=3, source="out_of_fold")
    assert choice.threshold == pytest.approx(0.275)
    assert choice.method == "max_f1_out_of_fold"
    assert choice.validation_f1 == pytest.approx(6 / 7)


def test_cross_validation_chooses_its_threshold_on_its_own_out_of_fold_probabilities() -> None:
    rng = np.random.default_rng(1)
    y = np.tile([0, 1], 30)
    x = rng.normal(size=(60, 8)).astype(np.float32) + 0.8 * y[:, None]
    units = np.arange(60) // 2
    training = TrainingConfig(epochs=6, batch_size=32, early_stopping_patience=3, cv_folds=2, seed=0)
    cv = run_cross_validation(x, y, units, HeadConfig(dense_units=[4]), training, EvaluationConfig(min_validation_per_class=3))
    assert not np.isnan(cv.best.oof).any() and len(set(cv.folds)) == 2
    assert cv.choice.threshold == choose_threshold(y, cv.best.oof, min_per_class=3, source="out_of_fold").threshold
    assert cv.to_dict()["estimate"]["f1_mean"] == pytest.approx(np.mean(cv.estimate["f1"]), abs=1e-4)


@pytest.mark.parametrize("objective, target, expected", [
    ("precision_at_recall", 1.0, 0.275),  # recall 1 needs c <= .35; the most precise of those is .35
    ("precision_at_recall", 0.6, 0.55),  # recall >= .6 allows c = .7 (precision 1), placed midway to .4
    ("recall_at_precision", 1.0, 0.55),  # precision 1 at c = .8 (recall 1/3) and .7 (2/3): .7
    ("recall_at_precision", 0.75, 0.275),  # precision .75 at c = .35 with recall 1
])
def test_each_threshold_objective(objective: str, target: float, expected: float) -> None:
    choice = choose_threshold(Y, P, min_per_class=3, objective=objective, target=target)
    assert choice.threshold == pytest.approx(expected)
    assert choice.warning is None


def test_unreachable_precision_falls_back_to_the_most_precise_threshold_with_a_warning() -> None:
    choice = choose_threshold([1, 0, 1, 0], [0.3, 0.9, 0.2, 0.1], min_per_class=1, objective="recall_at_precision", target=0.9)
    assert "no threshold reaches precision 0.9" in choice.warning
    assert choice.threshold == pytest.approx(0.15)  # cut .2: precision 2/3, the best there is
    with pytest.raises(ValueError, match="needs a target"):
        choose_threshold(Y, P, objective="precision_at_recall")


def test_model_selection_prefers_the_simpler_candidate_within_one_paired_standard_error() -> None:
    """Worked example: folds of very different difficulty (AP 0.60-0.95 for the rich head).

    Unpaired, the band would be sd(rich) / sqrt(5) = 0.065 and both simpler heads would fall inside it.
    Paired: `steady` trails by 0.03 on every fold (mean -0.030, SE 0.0016): a real deficit, the rich head wins;
    `noisy` trails by 0.01 on average but the per-fold differences swing (SE 0.0253): within, simpler, chosen.
    """
    class Result:
        def __init__(self, name, fold_ap):
            self.candidate, self.fold_ap, self.ap = HeadCandidate(name, (), 0.0, 0.0, "none"), fold_ap, float(np.mean(fold_ap))

    rich = np.array([0.60, 0.90, 0.75, 0.95, 0.70])
    steady = Result("steady", rich + [-0.03, -0.025, -0.035, -0.03, -0.03])
    noisy = Result("noisy", rich + [0.05, -0.08, 0.02, -0.06, 0.02])
    unpaired_band = np.std(rich, ddof=1) / np.sqrt(5)
    assert rich.mean() - steady.ap < unpaired_band and rich.mean() - noisy.ap < unpaired_band  # the old rule: both within

    chosen, reason = select_candidate([steady, Result("rich", rich)])
    assert chosen == 1 and reason.startswith("highest out-of-fold AP")
    steady_vs_rich = paired_differences([steady, Result("rich", rich)])[0]
    assert steady_vs_rich.mean == pytest.approx(-0.03) and steady_vs_rich.standard_error == pytest.approx(0.00158, abs=1e-5)
    assert not steady_vs_rich.within_one_se

    chosen, reason = select_candidate([noisy, Result("rich", rich)])
    assert chosen == 0 and "within one paired standard error (0.0253)" in reason
    # the rich head is the best whatever its place; the simplest within the paired band wins
    assert select_candidate([steady, noisy, Result("rich", rich)])[0] == 1


def test_fine_tuning_is_kept_only_when_it_beats_the_frozen_model_by_more_than_the_fold_spread() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    frozen = np.array([0.1, 0.2, 0.6, 0.5, 0.7, 0.9])  # AP 0.806
    fine = np.array([0.1, 0.2, 0.3, 0.5, 0.7, 0.9])  # AP 1.0
    kept, reason = judge_fine_tuning(y, frozen, fine, margin=0.05)
    assert kept == "fine_tune" and "more than the fold spread 0.0500" in reason
    kept, reason = judge_fine_tuning(y, frozen, fine, margin=0.25)
    assert kept == "head" and "simpler frozen model is kept" in reason
    assert judge_fine_tuning(y, fine, frozen, margin=0.0)[0] == "head"
    assert judge_fine_tuning(np.zeros(6), frozen, fine, margin=0.0)[0] == "head"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_copies_of_testing_images_never_go_to_validation(seed: int) -> None:
    """Like casting's 64 test images that are byte-identical to training images: the training copy stays in training."""
    rows = [{"path": f"/x/{i}.png", "label": "defect" if i % 3 == 0 else "good", "split": "training", "group": None,
             "sha1": f"s{i}"} for i in range(60)]
    rows += [{"path": f"/x/test{i}.png", "label": rows[i]["label"], "split": "testing", "group": None, "sha1": f"s{i}"}
             for i in range(0, 60, 2)]  # every other training image also sits in testing
    result = assign_splits(pd.DataFrame(rows).astype({"group": object}), 0.3, 0.2, seed=seed)
    m = result.manifest
    validation = m[m["split"] == "validation"]
    assert len(validation) > 0 and not validation["sha1"].isin(m.loc[m["split"] == "testing", "sha1"]).any()
    assert any("stay in training, never in validation" in note for note in result.notes)
