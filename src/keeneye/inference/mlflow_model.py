"""A keeneye bundle as an MLflow pyfunc model: uint8 RGB images in, positive-class probabilities out.

MLflow loads this file itself ("models from code": keeneye.tracking logs its path, nothing is
pickled) and calls `load_context` with the bundle's model files as the artifact "bundle". The
probabilities are those of keeneye's own :class:`~keeneye.inference.predictor.Predictor` (same
resizing, same engine choice), so `mlflow.pyfunc.load_model(uri).predict(images)` gives what
`Predictor.from_bundle(run_dir).predict_images(images)` gives. Needs keeneye installed where
the model is loaded (`mlflow models serve --env-manager local` in keeneye's environment).
"""

import mlflow
import numpy as np

from keeneye.inference.predictor import Predictor


class KeeneyeModel(mlflow.pyfunc.PythonModel):
    """MLflow's side of a bundle; the decision threshold is in the bundle metadata (`predictor.bundle.threshold`)."""

    def load_context(self, context) -> None:
        self.predictor = Predictor.from_bundle(context.artifacts["bundle"])

    # np.ndarray: a type hint MLflow accepts without inferring a schema; the logged signature checks the input.
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        images = next(iter(model_input.values())) if isinstance(model_input, dict) else model_input
        return self.predictor.predict_images(np.asarray(images, dtype=np.uint8)).astype(np.float32)


mlflow.models.set_model(KeeneyeModel())
