"""Devices and strategies: MirroredStrategy over two logical CPUs end to end, strategy choice, mixed precision (issue #4).

Logical devices must be configured before TensorFlow initialises its devices, which has long happened
in this pytest process: the end-to-end test runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from keeneye.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mirrored_strategy_over_two_logical_cpus_trains_end_to_end(tmp_path, demo_data, imagenet_weights) -> None:
    config = tiny_config(tmp_path, demo_data, run_name="mirrored", training={"epochs": 3, "distribute": "mirrored"},
                         fine_tune={"enabled": True, "method": "images", "unfreeze": 5, "epochs": 1, "judge": "validation"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from rich.console import Console
        from keeneye import api
        result = api.train({str(tmp_path / "config.json")!r}, console=Console(width=250))
        print("RESULT", json.dumps({{"run": str(result.run_dir), "f1": result.metrics["at_threshold"]["f1"]}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "devices: MirroredStrategy over /device:CPU:0, /device:CPU:1 (2 replicas)" in done.stdout
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    run = Path(result["run"])
    metadata = json.loads((run / "metadata.json").read_text())
    assert metadata["training"]["devices"].startswith("MirroredStrategy") and set(metadata["training"]["phases"]) == {"head", "fine_tune"}
    assert 0 <= result["f1"] <= 1
    import keras

    model = keras.saving.load_model(run / "model.keras", compile=False)  # plain variables: loads anywhere
    assert model.predict(np.zeros((1, 96, 96, 3), np.uint8), verbose=0).shape == (1, 1)


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_multi_worker_strategy_with_two_local_workers(tmp_path, demo_data, imagenet_weights) -> None:
    """TF_CONFIG with two workers on this machine: both train in lockstep, only the chief writes the bundle.
    (Keras 3 needs keeneye's workaround for keras-team/keras#20585 here: this test is its guard.)"""
    config = tiny_config(tmp_path, demo_data, run_name="mw", training={"epochs": 2, "distribute": "multi_worker"},
                         fine_tune={"enabled": True, "method": "images", "unfreeze": 3, "epochs": 1, "judge": "validation"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    script = textwrap.dedent(f"""
        import json
        from rich.console import Console
        from keeneye import api
        result = api.train({str(tmp_path / "config.json")!r}, console=Console(width=250))
        print("RESULT", json.dumps({{"run": None if result.run_dir is None else str(result.run_dir),
                                    "metrics": result.metrics["at_threshold"]}}))
    """)
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TF_CONFIG": tf_config}
        processes.append(subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env, cwd=tmp_path))
    outputs = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=240)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
        outputs.append(stdout)
    assert "MultiWorkerMirroredStrategy, 2 workers (this is worker 0), 2 replicas" in outputs[0]
    assert "MultiWorkerMirroredStrategy, 2 workers (this is worker 1), 2 replicas" in outputs[1]
    chief, other = (json.loads(out.split("RESULT ", 1)[1]) for out in outputs)
    assert chief["run"] == str(tmp_path / "runs" / "mw") and other["run"] is None
    assert chief["metrics"] == other["metrics"], "the workers train one model in lockstep"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mw"], "only the chief writes into output_dir"


def test_strategy_choice_on_this_machine(monkeypatch) -> None:
    import tensorflow as tf

    from keeneye.training.distribute import choose_devices, mixed_precision_policy, tf_config_cluster

    monkeypatch.delenv("TF_CONFIG", raising=False)
    devices = choose_devices("off")
    assert devices.strategy is tf.distribute.get_strategy() and devices.replicas == 1 and devices.is_chief
    if not tf.config.list_physical_devices("GPU"):
        assert choose_devices("auto").description == "one device: CPU"
        assert mixed_precision_policy(True, devices)[0] == "float32"
        assert "ignored: no GPU" in mixed_precision_policy(True, devices)[1]
    with pytest.raises(ConfigError, match="TF_CONFIG environment variable is not set"):
        choose_devices("multi_worker")
    cluster = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    assert tf_config_cluster() == (2, "worker", 1, False)
    monkeypatch.setenv("TF_CONFIG", json.dumps({**cluster, "task": {"type": "worker", "index": 0}}))
    assert tf_config_cluster() == (2, "worker", 0, True)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}))
    assert tf_config_cluster() == (2, "worker", 0, False)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG is not valid JSON"):
        tf_config_cluster()


def test_mixed_precision_computes_in_float16_and_saves_float32() -> None:
    """What fine-tuning builds on a GPU with training.mixed_precision (checked here on CPU, no training)."""
    import keras

    from keeneye.config import config_from_dict
    from keeneye.model.backbone import ResolvedWeights, build_feature_extractor
    from keeneye.model.head import build_head
    from keeneye.training.distribute import dtype_policy
    from keeneye.training.finetune import build_finetune_model, find_backbone, plain_copy

    cfg = config_from_dict({"data_folder_path": str(REPO), "model": {"image_size": 32, "weights": "none"}, "head": {"dense_units": [8]}})
    with dtype_policy("mixed_float16"):
        extractor = build_feature_extractor(1.0, 32, ResolvedWeights("none", None, None))
        head = build_head(extractor.output_shape[-1], [8], 0.2, seed=0)
        model = build_finetune_model(extractor, head, None)
        model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="binary_crossentropy")
    assert keras.config.dtype_policy().name == "float32", "the global policy is restored"
    conv = find_backbone(extractor).get_layer("Conv_1")
    assert conv.compute_dtype == "float16" and conv.variable_dtype == "float32"
    assert head.get_layer("probability").compute_dtype == "float32"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    out = model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0)
    assert out.dtype == np.float32
    plain_extractor, plain_head = plain_copy(cfg, extractor, head)
    assert find_backbone(plain_extractor).get_layer("Conv_1").compute_dtype == "float32"
    for a, b in zip(plain_extractor.get_weights() + plain_head.get_weights(), extractor.get_weights() + head.get_weights()):
        assert a.dtype == b.dtype and np.array_equal(a, b)
