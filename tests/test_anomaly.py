"""One-class mode (mode "anomaly", PatchCore): coreset, scores and maps, bundle round trip, clear errors.

One small anomaly bundle (demo textures at 96 px, real ImageNet weights) is trained once for the module;
the coreset tests are pure numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from conftest import tiny_config
from keeneye.errors import ConfigError, DataError
from keeneye.model.patchcore import BANK_FILE, coreset_size, greedy_coreset


def _covering_radius(points: np.ndarray, chosen: np.ndarray) -> float:
    distances = np.linalg.norm(points[:, None, :] - points[chosen][None, :, :], axis=2)
    return float(distances.min(axis=1).max())


def test_coreset_keeps_the_share_and_covers_the_bank() -> None:
    rng = np.random.default_rng(0)
    clusters = rng.normal(0, 1, (5, 2)) * 20
    points = np.concatenate([c + rng.normal(0, 1, (100, 2)) for c in clusters] + [rng.uniform(-40, 40, (100, 2))])
    count = coreset_size(len(points), 0.1, 10_000)
    chosen = greedy_coreset(points, count, projection_dim=None, seed=0)
    assert count == 60 and len(chosen) == 60 and len(set(chosen.tolist())) == 60
    radius = _covering_radius(points, chosen)
    # Farthest-first certificate: every centre was at least `radius` from those chosen before it, so
    # the centres are pairwise >= radius apart and the radius is within 2x the optimal k-center radius.
    centres = points[chosen]
    pairwise = np.linalg.norm(centres[:, None] - centres[None], axis=2)[np.triu_indices(count, 1)]
    assert pairwise.min() >= radius - 1e-4
    random_radius = min(_covering_radius(points, rng.choice(len(points), count, replace=False)) for _ in range(20))
    assert radius < random_radius
    assert all(np.linalg.norm(centres - c, axis=1).min() < 3 for c in clusters)  # every cluster has a centre


def test_coreset_in_chunks_and_the_bank_bound() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 10, (40, 16))
    points = (centres[rng.integers(40, size=3000)] + rng.normal(0, 1, (3000, 16))).astype(np.float32)
    chunked = greedy_coreset(points, 150, projection_dim=None, seed=0, chunk_size=1000)
    exact = greedy_coreset(points, 150, projection_dim=None, seed=0, chunk_size=10_000)
    assert len(chunked) == 150 and len(set(chunked.tolist())) == 150
    radius = _covering_radius(points, chunked)
    assert radius <= 2 * _covering_radius(points, exact) + 1e-4  # composed greedy: within 2x of one greedy pass
    assert radius < _covering_radius(points, rng.choice(3000, 150, replace=False))
    assert coreset_size(1000, 0.5, 100) == 100 and coreset_size(1000, 0.1, 10**6) == 100 and coreset_size(3, 0.01, 10) == 1


@pytest.fixture(scope="module")
def anomaly_run(tmp_path_factory, demo_data, imagenet_weights):
    from keeneye import api
    from keeneye.config import config_from_dict

    root = tmp_path_factory.mktemp("anomaly")
    config = tiny_config(root, demo_data, run_name="oneclass", mode="anomaly",
                         anomaly={"coreset_share": 0.25, "threshold_rule": "false_alarm_rate", "false_alarm_rate": 0.1})
    return api.train(config_from_dict(config, base_dir=root), console=Console(quiet=True))


def test_anomaly_bundle_holds_bank_and_separates_the_demo_classes(anomaly_run) -> None:
    metadata = json.loads((anomaly_run.run_dir / "metadata.json").read_text())
    assert metadata["mode"] == "anomaly" and metadata["threshold"] == 0.5
    info = metadata["anomaly"]
    bank = np.load(anomaly_run.run_dir / BANK_FILE)
    assert bank.shape == (info["bank_size"], info["feature_dim"])
    assert info["bank_size"] == coreset_size(info["training_patches"], 0.25, info["max_bank_size"])
    assert metadata["threshold_choice"]["method"] == "anomaly_false_alarm_rate"
    assert (anomaly_run.run_dir / "model.onnx").is_file()
    assert anomaly_run.metrics["roc_auc"] >= 0.9  # the bank saw only good textures, never a defect


def test_pasted_defect_scores_above_every_good_image_and_the_map_peaks_on_it(anomaly_run) -> None:
    from keeneye.demo import surface_texture
    from keeneye.inference.predictor import Predictor

    rng = np.random.default_rng(123)
    goods = [surface_texture(rng, 96) for _ in range(6)]
    defect = goods[0].copy()
    cv2.rectangle(defect, (52, 52), (72, 72), (20, 20, 20), -1)  # a dark 20 px blob centred at (62, 62)
    predictor = Predictor.from_bundle(anomaly_run.run_dir)
    scores = predictor.predict_images(goods + [defect])
    assert scores[-1] > scores[:-1].max()
    maps, _ = predictor.engine.maps(np.stack([defect]))
    row, column = np.unravel_index(int(np.argmax(maps[0])), maps[0].shape)
    assert abs(row - 62) <= 26 and abs(column - 62) <= 26, (row, column)  # on the blob, give or take one 16 px patch
    inside = np.zeros_like(maps[0], dtype=bool)
    inside[52:73, 52:73] = True
    assert maps[0][inside].mean() > 1.5 * maps[0][~inside].mean()


def test_bundle_round_trip_gives_identical_scores(anomaly_run) -> None:
    from keeneye.inference.predictor import Predictor

    written = pd.read_csv(anomaly_run.run_dir / "predictions.csv")
    first = Predictor.from_bundle(anomaly_run.run_dir).predict_paths(written["path"].tolist())
    second = Predictor.from_bundle(anomaly_run.run_dir).predict_paths(written["path"].tolist())
    np.testing.assert_array_equal(first["probability"].to_numpy(), second["probability"].to_numpy())
    np.testing.assert_allclose(first["probability"].to_numpy(), written["probability"].to_numpy(), atol=1e-6)
    keras = Predictor.from_bundle(anomaly_run.run_dir, engine="keras").predict_paths(written["path"].tolist())
    np.testing.assert_allclose(keras["probability"].to_numpy(), written["probability"].to_numpy(), atol=1e-4)


def test_anomaly_mode_without_good_training_images_fails_clearly(tmp_path, demo_data) -> None:
    from keeneye import api
    from keeneye.config import config_from_dict

    # A manifest whose training rows are all defects (good parts only in testing): nothing to learn "good" from.
    rows = [(p, "defect", "training") for p in sorted((demo_data / "training" / "defect").glob("*.png"))]
    rows += [(p, p.parent.name, "testing") for p in sorted((demo_data / "testing").glob("*/*.png"))]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(manifest, index=False)
    config = tiny_config(tmp_path, demo_data, mode="anomaly", positive_class="defect")
    config["data"] = {"manifest_path": str(manifest)}
    del config["data_folder_path"]
    with pytest.raises(DataError, match="good images only.*no images of the good"):
        api.train(config_from_dict(config, base_dir=tmp_path), console=Console(quiet=True))


def test_anomaly_config_is_checked(tmp_path, demo_data) -> None:
    from keeneye.config import config_from_dict

    assert config_from_dict(tiny_config(tmp_path, demo_data), base_dir=tmp_path).mode == "supervised"
    with pytest.raises(ConfigError, match="mode"):
        config_from_dict(tiny_config(tmp_path, demo_data, mode="oneclass"), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="anomaly.layers"):
        config_from_dict(tiny_config(tmp_path, demo_data, anomaly={"layers": ["conv_pw_3"]}), base_dir=tmp_path)


def test_explain_and_predict_maps_on_an_anomaly_bundle(anomaly_run, demo_data, tmp_path) -> None:
    from keeneye import api
    from keeneye.explain import explain

    images = sorted((demo_data / "testing" / "defect").glob("*.png"))[:2]
    frame = explain(anomaly_run.run_dir, images, tmp_path / "explained", console=Console(quiet=True))
    assert frame["overlay"].notna().all() and all(str(p).endswith("_anomaly.png") for p in frame["overlay"])
    predicted = api.predict(anomaly_run.run_dir, images, maps=tmp_path / "maps", console=Console(quiet=True))
    assert predicted["anomaly_map"].notna().all()
    assert cv2.imread(predicted["anomaly_map"][0]).shape[:2] == (96, 96)


def test_export_of_an_anomaly_bundle_is_the_feature_graph_with_the_bank_beside_it(anomaly_run, tmp_path, monkeypatch) -> None:
    """The exported ONNX graph run by plain ONNX Runtime, plus the bank and record beside it, gives the bundle's scores."""
    import onnxruntime

    from keeneye.data.decode import load_image, resize_square
    from keeneye.inference.export import ExportError, export_bundle, load_exported

    import hashlib

    from keeneye.inference import export

    hashed = []  # the bank is hashed once per export (it was three times): by name through the file hash, by size inline
    file_hash, inline_hash = export.sha256_of_file, hashlib.sha256
    monkeypatch.setattr(export, "sha256_of_file", lambda path: hashed.append(Path(path).name) or file_hash(path))
    monkeypatch.setattr(export.hashlib, "sha256", lambda data=b"": hashed.append(len(data)) or inline_hash(data))
    result = export_bundle(anomaly_run.run_dir, "onnx", output=tmp_path, max_images=8)
    monkeypatch.undo()
    assert hashed.count(BANK_FILE) + hashed.count((anomaly_run.run_dir / BANK_FILE).stat().st_size) == 1
    assert result.passed and result.verification["max_abs_diff"] <= 1e-4 and result.verification["n_images"] > 0
    assert (tmp_path / BANK_FILE).read_bytes() == (anomaly_run.run_dir / BANK_FILE).read_bytes()
    record = json.loads((tmp_path / "model.onnx.anomaly.json").read_text())
    metadata = json.loads((anomaly_run.run_dir / "metadata.json").read_text())["anomaly"]
    assert record["raw_threshold"] == metadata["raw_threshold"] and record["score_top_k"] == metadata["score_top_k"]

    written = pd.read_csv(anomaly_run.run_dir / "predictions.csv").head(6)
    images = np.stack([resize_square(load_image(p), 96) for p in written["path"]])
    patches = onnxruntime.InferenceSession(str(result.path)).run(None, {"image": images})[0]
    bank = np.load(tmp_path / record["bank_file"]).astype(np.float64)
    flat = patches.reshape(len(images), -1, bank.shape[1]).astype(np.float64)
    nearest = np.sqrt(((flat[:, :, None, :] - bank[None, None]) ** 2).sum(-1).min(-1))  # brute force, (images, patches)
    raw = np.sort(nearest, axis=1)[:, -record["score_top_k"]:].mean(axis=1)
    expected = written["probability"].to_numpy()
    np.testing.assert_allclose(raw / (raw + record["raw_threshold"]), expected, atol=1e-4)
    np.testing.assert_allclose(load_exported(result.path)(images), expected, atol=1e-4)
    np.save(tmp_path / BANK_FILE, bank[:-1].astype(np.float32))  # another bank beside the graph: refused, not misread
    with pytest.raises(ExportError, match="memory bank"):
        load_exported(result.path)


def test_both_search_backends_find_the_exact_nearest_good_patch() -> None:
    from keeneye.model.patchcore import PatchBank

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(3000, 32)).astype(np.float32)
    patches = rng.normal(size=(2, 9, 9, 32)).astype(np.float32)
    all_distances = np.sqrt(((patches.reshape(-1, 1, 32) - bank[None]) ** 2).sum(-1))
    brute = all_distances.min(axis=1).reshape(2, 9, 9)
    import faiss  # noqa: F401 - loaded first: it brings its own BLAS, counted in both lists below
    from threadpoolctl import threadpool_info

    blas_threads = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    for backend in ("blas", "faiss"):
        distances, index = PatchBank(bank, backend=backend).nearest(patches)
        np.testing.assert_allclose(distances, brute, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(index.reshape(-1), all_distances.argmin(axis=1))  # the nearest patch itself, not a tie
    # The search runs its blocks on one BLAS thread each and gives the process its BLAS threads back afterwards.
    assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == blas_threads


def test_rest_explain_returns_the_anomaly_map_of_a_one_class_bundle(anomaly_run) -> None:
    """POST /explain on a one-class bundle: scores as /predict gives them, and a map that is hot on the defect."""
    import base64

    from fastapi.testclient import TestClient

    from keeneye.demo import surface_texture
    from keeneye.serving import ServeSettings, create_app

    good = surface_texture(np.random.default_rng(7), 96)
    defect = good.copy()
    cv2.rectangle(defect, (52, 52), (72, 72), (20, 20, 20), -1)
    files = [("files", (f"{name}.png", cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes(), "image/png"))
             for name, image in (("good", good), ("defect", defect))]
    with TestClient(create_app(anomaly_run.run_dir, ServeSettings())) as client:
        predicted = client.post("/predict", files=files).json()["results"]
        response = client.post("/explain", files=files)
    assert response.status_code == 200, response.text
    explained = response.json()["results"]
    assert [r["probability"] for r in explained] == pytest.approx([r["probability"] for r in predicted], abs=1e-5)
    assert explained[1]["label"] == "defect" and explained[1]["probability"] > explained[0]["probability"]
    overlays = [cv2.cvtColor(cv2.imdecode(np.frombuffer(base64.b64decode(r["heatmap"].split(",", 1)[1]), np.uint8),
                                          cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(float) for r in explained]
    assert overlays[1].shape == (96, 96, 3)
    # Undo the blend (overlay = 0.55 image + 0.45 colour) and read each colour back as its place on the JET scale.
    colours = (overlays[1] - 0.55 * defect.astype(float)) / 0.45
    jet = cv2.cvtColor(cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    level = np.linalg.norm(colours.reshape(-1, 1, 3) - jet.reshape(1, 256, 3).astype(float), axis=2).argmin(axis=1).reshape(96, 96)
    inside = np.zeros((96, 96), bool)
    inside[52:73, 52:73] = True
    assert level[inside].mean() > level[~inside].mean() + 40


def test_reweighted_score_follows_patchcore_and_keeps_the_order_of_clear_outliers() -> None:
    from keeneye.model.patchcore import PatchBank, reweighted_scores

    rng = np.random.default_rng(2)
    bank = PatchBank(rng.normal(size=(500, 8)).astype(np.float32))
    patches = rng.normal(size=(3, 4, 4, 8)).astype(np.float32)
    patches[2, 1, 1] += 6.0  # one far-away patch
    distances, index = bank.nearest(patches)
    plain = reweighted_scores(bank, patches, distances, index, 1)
    np.testing.assert_allclose(plain, distances.reshape(3, -1).max(axis=1), rtol=1e-6)
    weighted = reweighted_scores(bank, patches, distances, index, 9)
    # By hand for image 2: its most distant patch q, q's nearest bank patch m* and the 8 bank patches nearest m*.
    q = patches[2, 1, 1]
    m = bank.features[np.argmin(np.linalg.norm(bank.features - q, axis=1))]
    support = bank.features[np.argsort(np.linalg.norm(bank.features - m, axis=1))[:9]]
    gaps = np.linalg.norm(support - q, axis=1)
    expected = (1 - np.exp(gaps[0]) / np.exp(gaps).sum()) * gaps[0]
    assert weighted[2] == pytest.approx(expected, rel=1e-5)
    assert np.all(weighted <= plain + 1e-9) and np.argmax(weighted) == 2


def test_fitted_feature_transform_standardises_and_keeps_the_principal_axes() -> None:
    from keeneye.model.patchcore import fit_patch_transform

    rng = np.random.default_rng(2)
    good = rng.normal(0, 1, (4000, 7)) * np.array([10.0, 1, 1, 1, 1, 0.1, 0])  # loud, quiet and dead channels
    kernel, bias = fit_patch_transform(good, None, "random", standardise=True)
    z = good @ kernel + bias
    assert np.isfinite(kernel).all() and np.allclose(z[:, :6].std(axis=0), 1, atol=1e-3) and np.allclose(z.mean(axis=0), 0, atol=1e-6)
    # A defect moving the quiet channel by 10 of its spreads is now far from every good patch; unstandardised it is not.
    defect = good[:1] + np.array([[0, 0, 0, 0, 0, 1.0, 0]])
    assert np.linalg.norm((defect @ kernel + bias) - z, axis=1).min() > 5
    assert np.linalg.norm(defect - good, axis=1).min() <= 1.0 + 1e-9
    # PCA keeps the directions good patches vary along: 2 of them carry everything here.
    plane = rng.normal(0, 1, (3000, 2)) @ rng.normal(0, 1, (2, 8))
    kernel, bias = fit_patch_transform(plane, 2, "pca", standardise=False)
    assert kernel.shape == (8, 2) and bias.shape == (2,)
    pairs = rng.integers(len(plane), size=(200, 2))
    before = np.linalg.norm(plane[pairs[:, 0]] - plane[pairs[:, 1]], axis=1)
    after = np.linalg.norm((plane[pairs[:, 0]] - plane[pairs[:, 1]]) @ kernel, axis=1)
    assert np.allclose(before, after, rtol=1e-3, atol=1e-6)  # distances within the good subspace are kept exactly


def test_the_fitted_transform_is_part_of_the_feature_graph() -> None:
    from keeneye.model.patchcore import build_patch_extractor, fit_patch_transform, raw_patch_model, set_patch_transform

    extractor = build_patch_extractor(0.35, 64, None, ["block_3_expand_relu", "block_6_expand_relu"], projection_dim=16,
                                      fitted=True)
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    raw = np.asarray(raw_patch_model(extractor)(images, training=False))
    kernel, bias = fit_patch_transform(raw.reshape(-1, raw.shape[-1]), 16, "pca", standardise=True)
    set_patch_transform(extractor, kernel, bias)
    assert np.allclose(np.asarray(extractor(images, training=False)), raw @ kernel + bias, atol=1e-3)


def test_top_k_image_score_is_the_mean_of_the_largest_patch_distances() -> None:
    from keeneye.model.patchcore import image_scores

    maps = np.zeros((2, 4, 4))
    maps[0, 0, 0] = 9.0  # one odd patch
    maps[1, 1:3, 1:3] = 4.0  # a defect over 4 neighbouring patches
    assert image_scores(maps, 1).tolist() == [9.0, 4.0]  # the largest distance ranks the lone patch first
    assert image_scores(maps, 4).tolist() == [2.25, 4.0]  # the mean of the 4 largest ranks the extended defect first
    assert image_scores(maps, 100).tolist() == [9 / 16, 1.0] and image_scores(np.empty((0, 4, 4)), 3).shape == (0,)


def test_ivf_search_with_every_list_probed_scores_as_exact_search(anomaly_run, tmp_path, demo_data) -> None:
    import shutil

    from keeneye.config import config_from_dict
    from keeneye.inference.predictor import Predictor
    from keeneye.model.patchcore import PatchBank, ivf_lists

    rng = np.random.default_rng(2)
    bank = (rng.normal(0, 5, (30, 16))[rng.integers(30, size=400)] + rng.normal(size=(400, 16))).astype(np.float32)
    patches = rng.normal(0, 5, (3, 6, 6, 16)).astype(np.float32)
    exact = PatchBank(bank).distances(patches)
    lists = ivf_lists(len(bank))
    assert lists == 80
    np.testing.assert_allclose(PatchBank(bank, method="ivf", nprobe=lists).distances(patches), exact, rtol=1e-4, atol=1e-4)
    one = PatchBank(bank, method="ivf", nprobe=1).distances(patches)
    assert (one >= exact - 1e-4).all() and (one > exact + 1e-3).any()  # one list: never closer than exact, sometimes farther
    np.testing.assert_array_equal(one, PatchBank(bank, method="ivf", nprobe=1).distances(patches))  # rebuilt: the same index
    # The bundle's metadata chooses the search: a copy set to IVF over every list predicts the exact bundle's scores.
    copy = Path(shutil.copytree(anomaly_run.run_dir, tmp_path / "ivf"))
    metadata = json.loads((copy / "metadata.json").read_text())
    metadata["anomaly"] |= {"search": "ivf", "nprobe": ivf_lists(metadata["anomaly"]["bank_size"])}
    (copy / "metadata.json").write_text(json.dumps(metadata))
    paths = pd.read_csv(anomaly_run.run_dir / "predictions.csv")["path"].tolist()[:8]
    ivf, exact_bundle = Predictor.from_bundle(copy), Predictor.from_bundle(anomaly_run.run_dir)
    assert ivf.engine.bank.method == "ivf" and exact_bundle.engine.bank.method == "exact"
    np.testing.assert_allclose(ivf.predict_paths(paths)["probability"], exact_bundle.predict_paths(paths)["probability"], atol=1e-5)
    for bad, field in (({"search": "hnsw"}, "anomaly.search"), ({"nprobe": 0}, "anomaly.nprobe")):
        with pytest.raises(ConfigError, match=field):
            config_from_dict(tiny_config(tmp_path, demo_data, mode="anomaly", anomaly=bad), base_dir=tmp_path)
