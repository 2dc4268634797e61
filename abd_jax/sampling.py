"""Which training examples a step sees: the rules shared by the jitted step (`train`) and the
streaming input path (`input_pipeline`).

A training stage (a task's training, or a stage after it) is described by a `TaskInfo` of
arrays, so one compiled step serves every task and stage. Its `step`-th batch is a function
of (`key`, epoch, position) only: each epoch draws one permutation of the stage's examples
(`epoch_order`) and the step takes its slice of it, the last partial batch dropped. The data
argument of the step says where the pixels come from: `DeviceData`, the whole split on the
mesh, gathered there; or `StreamedBatches`, read on the host by `input_pipeline`, which picks
the same examples with the same rule.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

NO_MILESTONE = np.iinfo(np.int32).max


@struct.dataclass
class TaskInfo:
    """Per-stage dynamic inputs of the step (arrays, so no recompilation between tasks or
    stages).

    index: `[M]` int32 indices into the training arrays, the first `count` valid.
    num_old, num_seen: K_old and K_new of the task. key: the stage's PRNG key.
    base_lr: float32 `[]`; lr_milestones: int32 `[K]` epochs after which lr *= lr_decay
    (`NO_MILESTONE` pads: a stage without decay keeps the run's K, so its shapes);
    cosine_epochs: int32 `[]`, > 0 for a cosine schedule over that many epochs.
    weight_decay: float32 `[]`, the stage's weight decay; negative: the optimiser's own.
    """

    index: jax.Array
    count: jax.Array
    num_old: jax.Array
    num_seen: jax.Array
    steps_per_epoch: jax.Array
    total_steps: jax.Array
    key: jax.Array
    base_lr: jax.Array
    lr_milestones: jax.Array
    cosine_epochs: jax.Array
    weight_decay: jax.Array = -1.0


def lr_milestones(milestones, length: int) -> np.ndarray:
    """int32 `[length]`: the epochs `milestones`, padded with `NO_MILESTONE`."""
    if len(milestones) > length:
        raise ValueError(f"{len(milestones)} lr milestones do not fit {length}")
    padded = np.full(length, NO_MILESTONE, np.int32)
    padded[:len(milestones)] = milestones
    return padded


def epoch_order(task: TaskInfo, epoch) -> jax.Array:
    """int32 `[M]` positions into `task.index` in epoch `epoch`'s shuffled order (the `count`
    valid ones first). A function of (task.key, epoch) only: one uniform key per position
    (JAX's partitionable threefry), ranked, so the padding length `M` changes nothing."""
    m = task.index.shape[0]
    keys = jax.random.uniform(jax.random.fold_in(task.key, 2 * epoch + 1), (m,))
    return jnp.argsort(jnp.where(jnp.arange(m) < task.count, keys, 2.0)).astype(jnp.int32)


def batch_indices(task: TaskInfo, step, batch_size) -> jax.Array:
    """int32 `[B]` training-example indices of the stage's `step`-th batch: epoch-wise
    shuffled examples, the last partial batch of an epoch dropped."""
    epoch = step // task.steps_per_epoch
    position = step % task.steps_per_epoch
    order = epoch_order(task, epoch)
    return task.index[jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,))]


def sample_batch(images, labels, task: TaskInfo, step, batch_size):
    """The `step`-th batch `(images[chosen], labels[chosen])` (see `batch_indices`)."""
    chosen = batch_indices(task, step, batch_size)
    return images[chosen], labels[chosen]


@struct.dataclass
class DeviceData:
    """The whole training split on the mesh (input_pipeline "device"): every step gathers its
    own batch on device. images uint8 `[N, H, W, C]`, labels int32 `[N]` (remapped)."""

    images: jax.Array
    labels: jax.Array

    def batch(self, task: TaskInfo, step, batch_size):
        return sample_batch(self.images, self.labels, task, step, batch_size)


@struct.dataclass
class StreamedBatches:
    """`S` consecutive batches read on the host (input_pipeline "stream"), the first for step
    `first_step`: images uint8 `[S, B, H, W, C]`, labels int32 `[S, B]` (remapped)."""

    images: jax.Array
    labels: jax.Array
    first_step: jax.Array

    def batch(self, task: TaskInfo, step, batch_size):
        del task, batch_size
        i = jnp.clip(step - self.first_step, 0, self.images.shape[0] - 1)
        return self.images[i], self.labels[i]


class Feed:
    """Host side of a data argument that changes between jitted calls: the driver replaces
    it by `next_call()` (the data for the next `steps_per_call` steps) before every call."""

    def next_call(self):
        raise NotImplementedError
