"""Batch inference on Ray Data: same numbers as local predict, every input once, resume, actor loss."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from typer.testing import CliRunner  # noqa: E402

from keeneye.api import predict  # noqa: E402
from keeneye.cli import app  # noqa: E402
from keeneye.inference.distributed import parts_folder, predict_ray  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPUs for the whole module, shut down after."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory, demo_data) -> Path:
    """The demo test images, plus an empty file, a truncated JPEG and a text file named .png."""
    folder = tmp_path_factory.mktemp("ray_inputs")
    sources = sorted((demo_data / "testing").rglob("*.png"))
    assert len(sources) == 24
    for index, source in enumerate(sources):
        (folder / f"{index:03d}{source.suffix}").write_bytes(source.read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(40))
    (folder / "text.png").write_text("not an image")
    return folder


def _rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.set_index("path").sort_index()


@pytest.mark.slow
def test_ray_matches_local_predict_including_bad_files(local_ray, tiny_bundle, images, tmp_path):
    local = predict(tiny_bundle.run_dir, [images, images / "missing.png"])
    distributed = predict_ray(tiny_bundle.run_dir, [images, images / "missing.png"], output=tmp_path / "out.parquet", actors=2, batch_size=4)
    assert len(distributed) == len(local) == len(set(distributed["path"]))
    assert set(distributed["path"]) == set(local["path"])
    a, b = _rows(local), _rows(distributed)
    assert (a["error"].isna() == b["error"].isna()).all()
    assert b["error"].notna().sum() == 4  # empty, truncated, text, missing: each with its reason
    assert b.loc[str(images / "missing.png"), "error"] == "no such file or folder"
    ok = a["error"].isna()
    assert ok.sum() == 24
    np.testing.assert_allclose(b.loc[ok, "probability"].to_numpy(float), a.loc[ok, "probability"].to_numpy(float), atol=1e-5)
    assert (a.loc[ok, "label"] == b.loc[ok, "label"]).all()
    written = pd.read_parquet(tmp_path / "out.parquet")
    assert list(written.columns) == ["path", "probability", "label", "error"]
    assert set(written["path"]) == set(local["path"]) and len(written) == len(local)
    assert not parts_folder(tmp_path / "out.parquet").exists()


@pytest.mark.slow
def test_resume_through_the_cli_scores_only_missing_rows(local_ray, tiny_bundle, images, tmp_path):
    output = tmp_path / "out.csv"
    everything = sorted(str(p) for p in images.iterdir() if p.name[0].isdigit())
    local = predict(tiny_bundle.run_dir, everything)
    # a crash after some batches: their part files survive; and an output left by an earlier run.
    # Their rows carry impossible probabilities, so a row scored again would show.
    parts = parts_folder(output)
    parts.mkdir()
    local.iloc[:3].assign(probability=-1.0).to_parquet(parts / "earlier.parquet", index=False)
    local.iloc[3:6].assign(probability=-2.0).to_csv(output, index=False)
    result = CliRunner().invoke(app, ["predict", str(tiny_bundle.run_dir), *everything, "--ray", "--actors", "1", "--batch-size", "4", "--output", str(output)])
    assert result.exit_code == 0, result.output
    written = pd.read_csv(output)
    assert written["path"].tolist() == everything  # every input once, in input order
    assert (written["probability"].iloc[:3] == -1.0).all() and (written["probability"].iloc[3:6] == -2.0).all()
    np.testing.assert_allclose(written["probability"].iloc[6:], local["probability"].iloc[6:], atol=1e-5)
    assert not parts.exists()
    again: list[int] = []
    predict_ray(tiny_bundle.run_dir, everything, output=output, progress=again.append)
    assert again == []  # nothing left to score


def _actor_pids() -> list[int]:
    """Processes of this test's Ray map actors (descendants of this process)."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "MapWorker" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_killing_an_actor_mid_job_keeps_every_row_once(local_ray, tiny_bundle, images, tmp_path):
    inputs = sorted(p for p in images.iterdir() if p.name[0].isdigit())
    killed: list[int] = []

    def kill_one_actor(_: int) -> None:
        if not killed:  # after the first finished batch: the others are queued or running
            pids = _actor_pids()
            assert pids, "no Ray actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    frame = predict_ray(tiny_bundle.run_dir, inputs, output=tmp_path / "out.parquet", actors=2, batch_size=2, progress=kill_one_actor)
    assert killed
    assert len(frame) == len(inputs) == len(set(frame["path"]))
    assert set(frame["path"]) == {str(p) for p in inputs}
    assert frame["error"].isna().all() and frame["probability"].between(0, 1).all()
    assert len(pd.read_parquet(tmp_path / "out.parquet")) == len(inputs)


def test_without_ray_the_cli_says_how_to_install(monkeypatch, tiny_bundle, images):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = CliRunner().invoke(app, ["predict", str(tiny_bundle.run_dir), str(images), "--ray"])
    assert result.exit_code == 2
    assert "pip install 'keeneye[ray]'" in result.output


def test_a_folder_that_is_not_a_bundle_fails_before_any_actor_starts(tmp_path, images):
    from keeneye.errors import KeeneyeError

    with pytest.raises(KeeneyeError):
        predict_ray(tmp_path, [images], output=tmp_path / "out.parquet")
    with pytest.raises(KeeneyeError, match=r"\.parquet or \.csv"):
        predict_ray(tmp_path, [images], output=tmp_path / "out.json")


@pytest.mark.slow  # 13-31 s: the optional Ray embedding pass
def test_embedding_pass_on_ray_gives_the_local_vectors_shards_and_reasons(local_ray, demo_data, imagenet_weights, tmp_path):
    """training.embed_on "ray": same vectors (1e-5) and drop reasons as the local pass, written as ordinary cache shards."""
    import hashlib

    from keeneye.data.cache import EmbeddingCache
    from keeneye.data.preprocess import InputSpec
    from keeneye.inference.distributed import FeatureEngineFactory
    from keeneye.inference.engines import make_feature_engine
    from keeneye.model.backbone import build_feature_extractor, resolve_weights
    from keeneye.training.embed_ray import embed_manifest_ray
    from keeneye.training.features import embed_manifest

    paths = sorted((demo_data / "training").rglob("*.png"))[::3]
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + bytes(40))
    paths = [*paths[:5], bad, *paths[5:]]
    manifest = pd.DataFrame({"path": [str(p) for p in paths], "label": "x", "split": "training", "group": "",
                             "sha1": [hashlib.sha1(p.read_bytes()).hexdigest() for p in paths]},
                            index=pd.RangeIndex(100, 100 + len(paths)))
    weights = resolve_weights("imagenet", 1.0, 96)
    extractor = build_feature_extractor(1.0, 96, weights)
    dim = extractor.output_shape[-1]
    local_cache, ray_cache = EmbeddingCache(tmp_path / "local", "key"), EmbeddingCache(tmp_path / "ray", "key")
    # Keras on both sides: the engine choice is FeatureEngine's own (tested with it); no ONNX conversion per actor here
    local = embed_manifest(manifest, make_feature_engine(extractor, engine="keras"), dim, InputSpec(96), local_cache, batch_size=4)
    factory = FeatureEngineFactory(1.0, 96, weights, "gap", None, None, engine="keras")
    remote = embed_manifest_ray(manifest, factory, dim, InputSpec(96), ray_cache, batch_size=3, actors=2)

    assert list(remote.dropped.index) == list(local.dropped.index) == [105]
    assert remote.dropped["reason"].tolist() == local.dropped["reason"].tolist() and local.dropped["reason"].iloc[0]
    assert (remote.ok == local.ok).all() and local.ok.sum() == len(paths) - 1
    np.testing.assert_allclose(remote.features[remote.ok], local.features[local.ok], atol=1e-5)
    assert remote.n_computed == len(paths) - 1 and remote.n_cached == 0
    # what Ray wrote is an ordinary cache: a fresh reader (as the local pass uses it) finds every good vector
    again = np.full((len(paths), dim), np.nan, dtype=np.float32)
    found = EmbeddingCache(tmp_path / "ray", "key").fill(manifest["sha1"].to_numpy(), again)
    assert (found == local.ok).all()
    np.testing.assert_allclose(again[found], local.features[local.ok], atol=1e-5)


def test_each_actor_gets_the_cores_it_can_hold_whole_and_blocks_hold_whole_batches():
    """Threads per actor = cores/actors without oversubscribing any node; blocks = whole batches, ~8 per actor."""
    from keeneye.runtime.ray_pool import cpus_per_actor, rows_per_block

    assert cpus_per_actor(1, [2.0]) == 2  # a lone actor uses both cores
    assert cpus_per_actor(2, [2.0]) == 1  # two actors on 2 cores: one thread each, not 2 x 2
    assert cpus_per_actor(3, [2.0]) == 1  # more actors than cores: 1, Ray queues the rest
    assert cpus_per_actor(4, [16.0, 16.0]) == 8
    assert cpus_per_actor(3, [3.0, 3.0]) == 1  # 2 CPUs each would fit only 2 actors (one per node)
    assert cpus_per_actor(3, [4.0, 2.0]) == 2
    assert cpus_per_actor(2, []) == 1
    assert rows_per_block(715, 2, 32) == 64 and rows_per_block(715, 1, 32) == 96
    assert rows_per_block(10, 2, 32) == 32 and rows_per_block(0, 2, 32) == 32
    big = rows_per_block(1_000_000, 16, 32)
    assert big % 32 == 0 and 100 <= -(-1_000_000 // big) <= 8 * 16
