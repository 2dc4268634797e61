"""What the exemplar-free methods whose backbone freezes after the first task share
(docs/algorithm.md §11): the first task trained with its own recipe (`first_task`: the
official code's 200 epochs, SGD lr 0.1, weight decay 5e-4, cosine schedule), no training
loop afterwards, and after every task a statistics stage that runs the frozen backbone over
the task's training images (eval mode, unaugmented, jitted and batched) and keeps each new
class's feature mean. Scores of features are computed on device in chunks."""
from __future__ import annotations

import jax
import numpy as np
from flax import struct

from abd_jax import hosts
from abd_jax.methods.base import ce
from abd_jax.methods.lifecycle import Method, Runtime, Update
from abd_jax.plan import Schedule, Task

# The exemplar-free papers' first-task network (their row of a table): the CIFAR-stem
# ResNet-18, a cosine head, the PyCIL line's augmentation.
PYCIL_RECIPE = {"model": "resnet18_cifar", "head": "cosine", "augment.policy": "pycil"}


@struct.dataclass
class MeansState:
    """means `[C, D]`: each class's mean feature (raw, float32), zero until its task ends."""

    means: jax.Array


def head_shape(learner) -> tuple[int, int]:
    """(D, C): the width of the features the classifier's head reads, and its classes."""
    return tuple(int(n) for n in learner.params["head"]["kernel"].shape)


def class_features(rt: Runtime, learner, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """(features `[n, D]`, labels `[n]`) of `task`'s training images through the frozen
    model: eval mode, normalised, not augmented (the official code's test transforms)."""
    index = rt.plan.task_indices(task.index)
    return rt.services.predict_train(learner, index)[1], rt.plan.train_labels[index]


def chunked_scores(rt: Runtime, build, features: np.ndarray, *args) -> np.ndarray:
    """`build(*static)` applied on device to `features` `[n, D]` in chunks of
    `eval_batch_size` rows, with `args` (device arrays) as its further inputs; host numpy."""
    score = rt.session.jitted(*build)
    size = rt.config.eval_batch_size
    args = jax.device_put(args)
    return np.concatenate([hosts.fetch(score(jax.device_put(features[i:i + size]), *args))
                           for i in range(0, len(features), size)])


def first_task_schedule(config) -> Schedule:
    """The first task's schedule from the `first_task` subtree (its weight decay is the
    method's `weight_decay`)."""
    ft = config.first_task
    if ft.schedule not in ("cosine", "steps"):
        raise ValueError(f"first_task.schedule={ft.schedule!r}: use 'cosine' or 'steps' "
                         "(--config.first_task.schedule)")
    return Schedule(ft.epochs, ft.lr, tuple(ft.milestones), cosine=ft.schedule == "cosine")


class FrozenBackbone(Method):
    """Trains the first task only, with `first_task`'s recipe (plain CE), then keeps the
    backbone; `update_statistics` after every task. Subclasses give the state, the other
    statistics and the scores (`eval_logits`)."""

    sections = ("first_task",)
    tables = ("exemplar_free",)
    keeps_first_task = True

    def trains(self, task: Task) -> bool:
        return task.is_first

    def schedule(self, config, task: Task) -> Schedule:
        del task
        return first_task_schedule(config)

    def weight_decay(self, config) -> float:
        return config.first_task.weight_decay

    def loss_fn(self, task: Task):
        return ce

    def init_state(self, rt, learner):
        return MeansState(means=self.empty_means(rt, learner))

    def empty_means(self, rt, learner) -> np.ndarray:
        del rt
        dim, classes = head_shape(learner)
        return np.zeros((classes, dim), np.float32)

    def end_task(self, task: Task) -> list:
        return [Update("class statistics", self.update_statistics)]

    def update_statistics(self, rt, learner, state, task):
        """The new classes' feature means join the state (`statistics` adds the rest)."""
        features, labels = class_features(rt, learner, task)
        means = hosts.fetch(state.means).copy()
        for c in range(task.num_old, task.num_seen):
            means[c] = features[labels == c].mean(axis=0)
        return learner, self.statistics(rt, state.replace(means=means), features, labels, task)

    def memory_footprint(self, rt, state) -> dict:
        """The classifier and the class statistics it keeps (every class's)."""
        kept = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.kept_statistics(state)))
        return {**super().memory_footprint(rt, state), "statistics_values": kept}

    def kept_statistics(self, state):
        """The arrays of class statistics the method keeps between tasks."""
        return state.means

    def statistics(self, rt, state, features, labels, task: Task):
        """The method's further class statistics of the task's `features` (host numpy)."""
        del rt, features, labels, task
        return state
