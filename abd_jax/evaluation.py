"""Evaluation: the eval-mode model over an image set, and the accuracies of docs/algorithm.md §7.

`predict_all` walks a set of uint8 images in batches of one fixed size (the last padded), so
one compiled program serves every image set of a run, and fetches (logits, features) to the
host. `task_accuracies` turns a task's logits into the class-incremental ("global"), the
task-incremental ("local") and the top-5 accuracy on every task seen so far.
"""
from __future__ import annotations

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax

from abd_jax import augment, hosts


def _predict_fn(model, mean, std, mesh: Mesh):
    batch_sharding = NamedSharding(mesh, P("data"))

    def predict(params, batch_stats, images):
        images = jax.lax.with_sharding_constraint(images, batch_sharding)
        x = augment.normalize(images, mean, std)
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    return predict


def make_predict(session, model, mean: tuple, std: tuple, mesh: Mesh):
    """Jitted `(params, batch_stats, images_uint8 [B,H,W,C]) -> (logits [B, C], features
    [B, D])` (eval mode; one per session for equal arguments)."""
    return session.jitted(_predict_fn, model, tuple(mean), tuple(std), mesh)


def eval_batch_size(batch_size: int, num_devices: int) -> int:
    """The batch `predict_all` feeds `predict`: `batch_size` rounded up to the devices."""
    return -(-batch_size // num_devices) * num_devices


def predict_all(predict, variables, images, batch_size: int, mesh: Mesh, stop=None):
    """Host loop: (logits `[N, C]`, features `[N, D]`) (numpy) of `variables` (anything with
    `.params` and `.batch_stats`) for uint8 images `[N, H, W, C]` (an array, or
    `input_pipeline.SourceImages` read batch by batch). `stop` (`preemption.StopRequests`)
    is checked between batches."""
    batch_size = eval_batch_size(batch_size, mesh.size)
    batch_sharding = NamedSharding(mesh, P("data"))
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        if stop is not None:
            stop.check()
        batch = images[start:start + batch_size]
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]),
                                                    batch.dtype)])
        z, f = predict(variables.params, variables.batch_stats,
                       hosts.to_global(batch, batch_sharding))
        z, f = hosts.fetch((z, f))
        logits.append(z[:n])
        features.append(f[:n])
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(logits), np.concatenate(features)


def task_accuracies(logits: np.ndarray, labels: np.ndarray, bounds, task: int):
    """[(global, local, global top-5)] accuracy (%) on tasks 0..task; global among logits
    [0, K_new), local within task j's own logits [lo_j, hi_j); top-5: the label is among
    the 5 largest of the K_new logits (docs/algorithm.md §7: reported for ImageNet)."""
    num_seen = bounds[task][1]
    out = []
    for lo, hi in bounds[:task + 1]:
        mask = (labels >= lo) & (labels < hi)
        z, y = logits[mask][:, :num_seen], labels[mask]
        global_acc = float(np.mean(np.argmax(z, axis=1) == y)) * 100
        local_acc = float(np.mean(np.argmax(z[:, lo:hi], axis=1) + lo == y)) * 100
        top5 = np.argpartition(-z, min(5, num_seen) - 1, axis=1)[:, :5]
        top5_acc = float(np.mean((top5 == y[:, None]).any(axis=1))) * 100
        out.append((global_acc, local_acc, top5_acc))
    return out
