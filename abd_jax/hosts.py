"""Several processes (hosts) as one run: process roles and cross-process data movement.

Every process runs the same task loop on the same data; the device mesh spans all processes'
devices (`jax.devices()`), so a jitted step computes each device's shard of the global batch
wherever that device lives. Host values enter the mesh through `to_global` and device values
leave it through `fetch`; `agree` makes a per-process decision (a stop request) the same on
every process. With one process each is the single-process operation and costs nothing more.

Initialisation (`initialize`) is `main`'s job and happens before any other JAX call.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding


def launched_as_several(environ: Mapping[str, str] = os.environ) -> bool:
    """True if the environment says this process is one of several that
    `jax.distributed.initialize()` can join by itself: `JAX_COORDINATOR_ADDRESS` is set, or an
    `srun` step (`SLURM_STEP_NUM_TASKS`) or `mpirun` (`OMPI_COMM_WORLD_SIZE`) started more than
    one process. A plain machine, or a batch script outside `srun`, says no. Cloud TPU slices
    are not detected (that takes a metadata-server query, and a one-host TPU VM looks the
    same): pass --multihost there."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return any(int(environ.get(name, "1")) > 1
               for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
    """`jax.distributed.initialize`, with gloo for cross-process collectives between CPU
    devices (it only affects the CPU backend). Arguments left None are read from
    `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, else detected from
    the cluster environment (Cloud TPU, SLURM, Open MPI)."""
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def is_main() -> bool:
    """The process that writes files shared by the run (logs, results, plots, config)."""
    return jax.process_index() == 0


def to_global(tree, sharding: Sharding, *, whole: bool = True):
    """`tree` (numpy or process-local arrays) as global arrays with `sharding`.

    whole=True: every process holds each leaf whole (the global value, the same everywhere)
    and keeps the slices its devices need, e.g. the training split replicated, or a batch
    `[B, ...]` sharded over the batch axis. whole=False: each process holds its own slice
    along the sharded axes (`[B / num_processes, ...]` for a batch sharding).
    With one process: `jax.device_put(tree, sharding)`."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def place(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jax.device_put(leaf, sharding)  # already global
        local = np.asarray(leaf)
        return jax.make_array_from_process_local_data(
            sharding, local, local.shape if whole else None)

    return jax.tree.map(place, tree)


def fetch(tree):
    """`tree`'s leaves as numpy arrays holding their global values, also where a leaf is
    sharded over other processes' devices (gathered from them: every process calls this)."""

    def get(leaf):  # explicit transfers only (runs pass under jax.transfer_guard)
        if not isinstance(leaf, jax.Array):
            return np.asarray(leaf)
        if leaf.is_fully_addressable:
            return np.asarray(jax.device_get(leaf))
        if leaf.is_fully_replicated:
            return np.asarray(jax.device_get(leaf.addressable_data(0)))
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree.map(get, tree)


def agree(flag: bool) -> bool:
    """True on every process if `flag` is True on any (every process calls this at the same
    point; one small cross-process max). With one process: `flag`."""
    if jax.process_count() == 1:
        return flag
    flags = multihost_utils.process_allgather(np.int32(flag))
    return bool(np.max(flags))
