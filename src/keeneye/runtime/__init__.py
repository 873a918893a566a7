"""The layer training and inference both stand on (data -> runtime -> training | inference).

* :mod:`keeneye.runtime.batches`: the decode pipeline (one bounded thread pool, order kept,
  failures with their reasons) and :func:`~keeneye.runtime.batches.run_engine`, the one loop
  "decode a batch, run an engine, keep the outputs, collect the failures";
* :mod:`keeneye.runtime.engines`: the :class:`~keeneye.runtime.engines.Engine` interface and its
  implementations (Keras, ONNX Runtime, OpenVINO, TFLite, SavedModel);
* :mod:`keeneye.runtime.convert`: Keras -> ONNX, convert-and-verify, the model-file validity check;
* :mod:`keeneye.runtime.choice`: which engine runs ('auto': the fastest on this machine that agrees
  with Keras, with a fallback chain), for a bundle's classifier and for the embedding pass;
* :mod:`keeneye.runtime.ray_pool`: Ray Data actor pools for the distributed jobs.

Nothing here imports training, inference, api, cli or serving (tests/test_layering.py).
"""
