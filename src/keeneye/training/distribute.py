"""Devices: which tf.distribute strategy trains, mixed precision, op determinism.

The same code path runs everywhere: every model that trains is built and compiled inside
``strategy.scope()``; on one CPU or one GPU that is TensorFlow's default strategy (a no-op scope).

* ``training.distribute = "auto"`` (default): a cluster in ``TF_CONFIG`` -> MultiWorkerMirroredStrategy;
  else two or more GPUs -> MirroredStrategy over them; else the default strategy (TensorFlow places
  work on the one GPU when there is one, else on the CPU).
* ``"mirrored"``: MirroredStrategy over the local GPUs, or over the logical CPU devices when there
  is no GPU (how the tests run it: two logical CPUs via ``tf.config.set_logical_device_configuration``).
* ``"multi_worker"``: MultiWorkerMirroredStrategy, which needs ``TF_CONFIG``. TensorFlow requires it
  to be created before anything else runs on the TensorFlow runtime, which is why
  :func:`keeneye.api.train` chooses the strategy first thing.
* ``"off"``: the default strategy.

``training.batch_size`` is the global batch: each of N replicas gets batch_size / N rows per step.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Iterator

from keeneye.errors import ConfigError

_MULTI_WORKER = None  # MultiWorkerMirroredStrategy can be created once per process


@dataclass
class Devices:
    strategy: object  # tf.distribute.Strategy
    description: str
    gpus: int
    replicas: int
    is_chief: bool = True
    worker_index: int = 0


def tf_config_cluster() -> tuple[int, str | None, int, bool]:
    """(number of workers, task type, task index, is chief) from TF_CONFIG; (0, None, 0, True) without it.

    The chief (it writes the bundle) is the "chief" task, or worker 0 when the cluster names no chief.
    """
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return 0, None, 0, True
    try:
        config = json.loads(text)
        cluster = config.get("cluster", {})
        task = config.get("task", {})
        workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
        task_type, index = task.get("type"), int(task.get("index", 0))
    except (ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON with cluster and task ({exc}).") from None
    chief = task_type == "chief" or (task_type == "worker" and index == 0 and not cluster.get("chief"))
    return workers, task_type, index, chief


def choose_devices(mode: str = "auto") -> Devices:
    """The strategy for `training.distribute` on this machine (see module doc)."""
    global _MULTI_WORKER
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    workers, task_type, task_index, chief = tf_config_cluster()
    if mode == "multi_worker" and workers == 0:
        raise ConfigError(
            'training.distribute is "multi_worker" but the TF_CONFIG environment variable is not set; it must '
            'describe the cluster, e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}.'
        )
    if mode == "multi_worker" or (mode == "auto" and workers > 0):
        if _MULTI_WORKER is None:
            try:
                _MULTI_WORKER = tf.distribute.MultiWorkerMirroredStrategy()
            except RuntimeError as exc:
                raise ConfigError(
                    f"could not start MultiWorkerMirroredStrategy ({exc}); it must be created before TensorFlow runs "
                    "anything in this process: start a fresh process for multi-worker training."
                ) from None
        strategy = _MULTI_WORKER
        return Devices(strategy, f"MultiWorkerMirroredStrategy, {workers} workers (this is {task_type} {task_index}), "
                       f"{strategy.num_replicas_in_sync} replicas", len(gpus), strategy.num_replicas_in_sync,
                       is_chief=chief, worker_index=task_index)
    if mode == "mirrored" or (mode == "auto" and len(gpus) > 1):
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        return Devices(strategy, f"MirroredStrategy over {', '.join(devices)} ({strategy.num_replicas_in_sync} replicas)", len(gpus),
                       strategy.num_replicas_in_sync)
    strategy = tf.distribute.get_strategy()
    where = f"GPU ({gpus[0].name})" if gpus else "CPU"
    return Devices(strategy, f"one device: {where}", len(gpus), 1)


@contextlib.contextmanager
def op_determinism(enabled: bool) -> Iterator[None]:
    """tf.config.experimental.enable_op_determinism() for the duration (restored afterwards, so that one
    deterministic train in a notebook does not change the rest of the session)."""
    if not enabled:
        yield
        return
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    before = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not before:
            disable = getattr(tf_config, "disable_op_determinism", None)
            if disable is not None:
                disable()


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under a Keras dtype policy (e.g. "mixed_float16"), restoring the previous one."""
    import keras

    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def mixed_precision_policy(requested: bool, devices: Devices) -> tuple[str, str | None]:
    """("mixed_float16" or "float32", a note when the request is ignored)."""
    if not requested:
        return "float32", None
    if devices.gpus == 0:
        return "float32", "training.mixed_precision ignored: no GPU (float16 on CPU is slower, not faster)."
    return "mixed_float16", None
