"""Ray Data actor pools: the machinery the distributed jobs share (batch predict, the embedding pass).

Both jobs are Ray's offline batch-inference shape: a dataset of small rows (paths, keys),
`map_batches` on an actor pool whose callable class loads its model once per actor, and results
streamed back to the driver as they finish. Ray retries the batches of an actor that dies, and only
completed batches reach the driver, so the driver (never a worker) writes results. Ray is an optional
extra: without it, every entry point says how to install it.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import pandas as pd

from keeneye.errors import KeeneyeError

INSTALL_HINT = "Ray is not installed: pip install 'keeneye[ray]' (or pip install 'ray[data]')."


class RayError(KeeneyeError):
    """Ray is missing, or the cluster cannot be reached, or a job on it failed."""

    exit_code = 2


def require_ray():
    """The `ray` module, or a KeeneyeError saying how to install it (Ray is an optional extra)."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks pyarrow/pandas glue)
    except ImportError as exc:
        raise RayError(f"{INSTALL_HINT} ({exc})") from None
    return ray


def connect(address: str | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start or reuse a local Ray."""
    ray = require_ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    except ConnectionError as exc:
        raise RayError(f"cannot reach the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: {exc}") from None


def gpus_per_actor(actors: int) -> int:
    """1 when the cluster has a GPU for every actor, else 0 (actors then run on CPU)."""
    ray = require_ray()
    return 1 if ray.cluster_resources().get("GPU", 0) >= actors else 0


def map_on_actor_pool(
    actor_class: type, rows: list[dict[str, Any]], actors: int, batch_size: int, constructor_kwargs: dict[str, Any],
    gpus: int = 0,
) -> Iterator[pd.DataFrame]:
    """`actor_class(**constructor_kwargs)` once per actor, called on numpy batches of `rows`; results as they finish.

    Blocks are small (about 8 per actor) so a lost actor costs little work and progress is smooth.
    Order is not kept: each result row must carry its own key.
    """
    ray = require_ray()
    if actors < 1:
        raise RayError(f"actors must be at least 1 (got {actors}).")
    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows progress
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), actors * 8)))
    mapped = dataset.map_batches(
        actor_class, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=gpus,
        batch_format="numpy", fn_constructor_kwargs=constructor_kwargs,
    )
    yield from mapped.iter_batches(batch_size=None, batch_format="pandas")
