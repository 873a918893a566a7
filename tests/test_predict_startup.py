"""`keeneye predict` on a bundle with a verified model.onnx runs ONNX Runtime without importing TensorFlow
(its import and model.keras were most of a short predict command's time), and gives the Keras model's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from keeneye import api
frame = api.predict(sys.argv[1], sys.argv[2:])
print(json.dumps({"probability": frame["probability"].tolist(), "tensorflow": "tensorflow" in sys.modules,
                  "keras": "keras" in sys.modules}))
"""


@pytest.mark.slow  # a fresh Python process importing keeneye: 4-10 s, and make test has no room left
def test_predict_on_an_onnx_bundle_never_imports_tensorflow(tiny_bundle, demo_data) -> None:
    from keeneye.bundle import load_bundle
    from keeneye.data.decode import load_image

    bundle = tiny_bundle.run_dir
    paths = sorted(str(p) for p in (demo_data / "testing").rglob("*.png"))[:3]
    assert (bundle / "model.onnx").is_file() and len(paths) == 3
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle), *paths], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tensorflow"] is False and result["keras"] is False
    model = load_bundle(bundle).model  # the Keras model, here, where TensorFlow is loaded anyway
    size = model.input_shape[1]
    expected = np.asarray(model.predict_on_batch(np.stack([load_image(p, size) for p in paths]))).reshape(-1)
    np.testing.assert_allclose(result["probability"], expected, atol=1e-4)


@pytest.mark.slow  # a fresh Python process importing keeneye
def test_the_overlay_modules_import_without_tensorflow() -> None:
    """`predict --maps` on a one-class ONNX bundle imports keeneye.explain for its overlays; Grad-CAM's keras import
    waits until Grad-CAM runs (once it sat at module level and every such predict loaded TensorFlow)."""
    code = "import sys, keeneye.explain, keeneye.inference.anomaly; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "False"]
