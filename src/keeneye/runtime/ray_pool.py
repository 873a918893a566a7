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


def node_cpus() -> list[float]:
    """The CPUs of each live node of the connected cluster."""
    ray = require_ray()
    return [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]


def cpus_per_actor(actors: int, cpus_of_nodes: list[float]) -> int:
    """The most CPUs each of `actors` actors can hold at once on nodes with `cpus_of_nodes` (at least 1).

    Each CPU actor runs its engine with this many threads and reserves as many CPUs from Ray, so the
    actors of one machine share its cores without oversubscribing them: 1 actor on 2 cores gets 2
    threads (measured: a lone actor with 1 thread leaves a core idle), 2 actors get 1 each (2 x 2
    threads on 2 cores only add contention). The count is the largest k with which every actor fits
    whole on some node (sum of floor(cpus / k) >= actors), so the pool never waits for an actor that
    cannot be placed; with fewer CPUs than actors it is 1 (Ray then queues the extra actors).
    """
    best = 1
    for k in range(2, int(max(cpus_of_nodes, default=1)) + 1):
        if sum(int(cpus // k) for cpus in cpus_of_nodes) >= actors:
            best = k
    return best


def rows_per_block(rows: int, actors: int, batch_size: int) -> int:
    """Rows per Ray Data block: a whole number of batches, about 8 blocks per actor.

    Whole batches: a block of 45 rows scored in batches of 32 runs a ragged batch of 13 in every
    block. About 8 per actor: enough blocks that the actors stay busy to the end and a lost actor
    costs little work, few enough that per-block scheduling stays negligible (one block per actor
    would leave no parallelism in a retry and nothing to balance a slower actor with).
    """
    batches = -(-max(rows, 1) // batch_size)
    return batch_size * max(1, -(-batches // (8 * actors)))


def map_on_actor_pool(
    actor_class: type, rows: list[dict[str, Any]], actors: int, batch_size: int, constructor_kwargs: dict[str, Any],
    gpus: int = 0, cpus: int = 1, whole_blocks: bool = False,
) -> Iterator[pd.DataFrame]:
    """`actor_class(**constructor_kwargs)` once per actor, called on numpy batches of `rows`; results as they finish.

    Each actor reserves `cpus` CPUs (and `gpus` GPUs). Blocks hold whole batches (`rows_per_block`).
    `whole_blocks`: each call gets a whole block (several batches), so an actor that decodes and
    scores in a pipeline of its own overlaps decoding the next batch with scoring this one.
    Order is not kept: each result row must carry its own key.
    """
    ray = require_ray()
    if actors < 1:
        raise RayError(f"actors must be at least 1 (got {actors}).")
    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows progress
    block = rows_per_block(len(rows), actors, batch_size)
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // block)))
    mapped = dataset.map_batches(
        actor_class, batch_size=block if whole_blocks else batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus, num_gpus=gpus, batch_format="numpy", fn_constructor_kwargs=constructor_kwargs,
    )
    yield from mapped.iter_batches(batch_size=None, batch_format="pandas")
