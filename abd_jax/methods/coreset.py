"""Coreset (rehearsal) baselines (docs/algorithm.md §6b): a class-balanced memory of real training
images, kept as indices into the training set and mixed into every later task's data.

Naive Rehearsal is Base plus the memory; LwF + coreset (`lwf.LwFCoreset`) is LwF plus the
memory (random selection, seeded). As in the release, each task trains on its own images plus
as many memory samples drawn with replacement (1:1), and after the task every class's memory
is drawn again, without replacement, from that training set (`release_redraw`): an old class's
exemplars are drawn from its resampled copies, so it keeps duplicates and loses distinct
images task after task. `--config.coreset.distinct_memory=True` keeps distinct images instead
(an old class keeps its first exemplars). E2E and BiC (their own modules) append the whole
memory, chosen from features (`SELECTIONS`), and keep distinct images, as the release's
`update_coreset_ic` / `update_coreset_ete` (each class's exemplars are chosen once and cut).

The memory is `int32 [M]` (`-1` = empty): class by class in label order, each class's
exemplars in priority order (herding's picking order, or a seeded shuffle), so shrinking a
class to its new quota keeps its first exemplars. A redrawn memory may hold an index more
than once.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct

from abd_jax import hosts, metrics, rng
from abd_jax.methods.base import ce
from abd_jax.methods.lifecycle import Method, Runtime, Update
from abd_jax.methods.teacher import FrozenModel, TeacherMethod, freeze
from abd_jax.methods.published import abd_table
from abd_jax.plan import Task

# random: a seeded shuffle. herding: iCaRL's herding on L2-normalised features (the iCaRL,
# E2E and BiC papers); herding_raw: the same on raw features (the release's BiC);
# closest_to_mean: by distance of the raw feature to the class mean (the release's E2E).
SELECTIONS = ("random", "herding", "herding_raw", "closest_to_mean")


def class_quotas(num_seen: int, size: int) -> np.ndarray:
    """Memory slots per class `[K_new]`: floor(M / K_new) each, the newest `M mod K_new`
    classes one more."""
    quota, extra = divmod(size, num_seen)
    quotas = np.full(num_seen, quota, np.int64)
    if extra:
        quotas[num_seen - extra:] += 1
    return quotas


def herding_order(features: np.ndarray, count: int, normalize: bool = True) -> np.ndarray:
    """iCaRL's herding: positions (into `features [n, D]`) of `count` examples, in picking
    order: step k picks the unpicked example that brings the mean of the k picked ones
    closest to the class mean. Features are L2-normalised first unless `normalize` is False."""
    f = np.asarray(features, np.float64)
    if normalize:
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    mean = f.mean(axis=0)
    picked, total = [], np.zeros_like(mean)
    available = np.ones(len(f), bool)
    for k in range(1, min(count, len(f)) + 1):
        distance = np.linalg.norm(mean - (total + f) / k, axis=1)
        distance[~available] = np.inf
        i = int(np.argmin(distance))
        picked.append(i)
        available[i] = False
        total += f[i]
    return np.asarray(picked, np.int64)


def closest_to_mean_order(features: np.ndarray, count: int) -> np.ndarray:
    """Positions of the `count` examples of `features [n, D]` nearest to their mean (raw
    features, Euclidean), nearest first."""
    f = np.asarray(features, np.float64)
    distance = np.linalg.norm(f - f.mean(axis=0), axis=1)
    return np.argsort(distance, kind="stable")[:count].astype(np.int64)


def ranked(features: np.ndarray, count: int, selection: str) -> np.ndarray:
    """Positions of `count` examples in priority order by a feature-based `selection`."""
    if selection == "closest_to_mean":
        return closest_to_mean_order(features, count)
    return herding_order(features, count, normalize=selection == "herding")


def release_redraw(pool: np.ndarray, labels: np.ndarray, num_seen: int, size: int,
                   key) -> np.ndarray:
    """The release's `update_coreset`: the memory `int32 [M]` after a task, each class's
    exemplars drawn without replacement from `pool` (the task's training examples: its own
    images and the memory's draws, duplicates included), classes in label order. From the
    newest class down, a class takes floor(M / K_new) of its candidates, one more while
    M mod K_new slots are left and it has more candidates than floor(M / K_new), all of them
    when it has fewer. `labels`: every training example's (remapped) label."""
    pool = np.asarray(pool)
    pool_labels = labels[pool]
    quota, extra = divmod(size, num_seen)
    kept = {}
    for c in reversed(range(num_seen)):
        members = np.flatnonzero(pool_labels == c)
        take = min(len(members), quota)
        if extra > 0 and len(members) > quota:
            take, extra = quota + 1, extra - 1
        kept[c] = pool[members[rng.permutation(rng.fold_in(key, c), len(members))[:take]]]
    flat = np.concatenate([kept[c] for c in range(num_seen)])
    out = np.full(size, -1, np.int32)
    out[:len(flat)] = flat
    return out


def distinct_count(memory) -> int:
    """The number of distinct training images a memory array holds."""
    memory = np.asarray(memory)
    return len(np.unique(memory[memory >= 0]))


def memory_by_class(memory: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """{class: its exemplar indices in priority order} of a memory array (-1 = empty)."""
    valid = memory[memory >= 0]
    out: dict[int, np.ndarray] = {}
    for c in np.unique(labels[valid]):
        out[int(c)] = valid[labels[valid] == c]
    return out


def rebuild_memory(memory: np.ndarray, labels: np.ndarray, ranked_new: dict[int, np.ndarray],
                   num_seen: int, size: int) -> np.ndarray:
    """The memory after a task: every class in `[0, K_new)` cut to its quota (old classes keep
    their first exemplars; `ranked_new[c]` lists a new class's candidates in priority order)."""
    by_class = {**memory_by_class(memory, labels), **ranked_new}
    quotas = class_quotas(num_seen, size)
    kept = [by_class.get(c, np.zeros(0, np.int64))[:quotas[c]] for c in range(num_seen)]
    out = np.full(size, -1, np.int32)
    flat = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    out[:len(flat)] = flat
    return out


@dataclasses.dataclass(frozen=True)
class Coreset:
    """A memory of `size` training images, new classes chosen by `selection`."""

    size: int
    selection: str

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"the memory must hold >= 1 image, got {self.size}; set "
                             "--config.coreset.memory")
        if self.selection not in SELECTIONS:
            raise ValueError(f"coreset selection {self.selection!r}: use one of {SELECTIONS}")

    def empty(self) -> np.ndarray:
        return np.full((self.size,), -1, np.int32)

    def stored(self, memory) -> np.ndarray:
        """The valid indices of a memory array (host numpy)."""
        memory = hosts.fetch(memory)
        return memory[memory >= 0].astype(np.int32)

    def rank_new_classes(self, rt: Runtime, learner, task: Task, key) -> dict[int, np.ndarray]:
        """{new class: candidate indices in priority order} (as many as its largest quota)."""
        index = rt.plan.task_indices(task.index)
        labels = rt.plan.train_labels[index]
        need = int(class_quotas(task.num_seen, self.size).max())
        features = (None if self.selection == "random" else
                    rt.services.predict_train(learner, index)[1])
        by_class = {}
        for c in range(task.num_old, task.num_seen):
            members = np.flatnonzero(labels == c)
            if self.selection == "random":
                order = rng.permutation(rng.fold_in(key, c), len(members))[:need]
            else:
                order = ranked(features[members], need, self.selection)
            by_class[c] = index[members[order]]
        return by_class

    def updated(self, rt: Runtime, learner, memory, task: Task, key) -> np.ndarray:
        """The memory once `task` is learned (its new classes added, every class at quota)."""
        ranked_new = self.rank_new_classes(rt, learner, task, key)
        return rebuild_memory(hosts.fetch(memory), rt.plan.train_labels, ranked_new,
                              task.num_seen, self.size)

    def footprint(self, rt: Runtime) -> dict:
        return {"stored_images": self.size,
                "stored_image_bytes": self.size * int(np.prod(rt.image_shape))}


@struct.dataclass
class MemoryState:
    """memory: `int32 [M]` training-example indices (-1 = empty), see the module docstring;
    distinct: `int32 [N]` the distinct images it held after each task (0 = not yet)."""

    memory: jax.Array
    distinct: jax.Array


@struct.dataclass
class TeacherMemoryState:
    """The previous task's frozen model, and the memory as in `MemoryState`."""

    teacher: FrozenModel
    memory: jax.Array
    distinct: jax.Array


def no_distinct(rt: Runtime) -> np.ndarray:
    """`MemoryState.distinct` before the first task."""
    return np.zeros((rt.config.num_tasks,), np.int32)


class RehearsalMixin:
    """Trains on the task's data plus the whole memory; updates the memory at each task end."""

    coreset: Coreset

    def index_capacity(self, rt):
        return super().index_capacity(rt) + self.coreset.size

    def train_index(self, rt, state, task):
        return np.concatenate([rt.plan.task_indices(task.index),
                               self.coreset.stored(state.memory)])

    def new_memory(self, rt, learner, state, task):
        return self.coreset.updated(rt, learner, state.memory, task,
                                    rng.fold_in(rt.method_key, task.index))

    def remember(self, rt, learner, state, task):
        """`state` with the memory after `task` and its distinct count recorded."""
        memory = self.new_memory(rt, learner, state, task)
        distinct = hosts.fetch(state.distinct).copy()
        distinct[task.index] = distinct_count(memory)
        return state.replace(memory=memory, distinct=distinct)

    def memory_footprint(self, rt, state):
        distinct = hosts.fetch(state.distinct).tolist()
        return {**super().memory_footprint(rt, state), **self.coreset.footprint(rt),
                metrics.DISTINCT: distinct}


class RandomReplayMixin(RehearsalMixin):
    """Trains on the task's images plus as many memory samples, drawn with replacement once
    per task (the release's `append_coreset`: 1:1, e.g. 5,000 : 5,000 at 10 CIFAR-100 tasks)."""

    def index_capacity(self, rt):
        return 2 * max(len(rt.plan.task_indices(t)) for t in range(rt.plan.num_tasks))

    def train_index(self, rt, state, task):
        own = rt.plan.task_indices(task.index)
        stored = self.coreset.stored(state.memory)
        if not len(stored):
            return own
        draw = rng.randint(rng.fold_in(rt.method_key, 30_000 + task.index), len(own),
                           len(stored))
        return np.concatenate([own, stored[draw]])

    def new_memory(self, rt, learner, state, task):
        """The release's redraw from the task's training set (`release_redraw`), or, with
        `coreset.distinct_memory`, the new classes added to a memory of distinct images."""
        if self.config.coreset.distinct_memory:
            return super().new_memory(rt, learner, state, task)
        return release_redraw(self.train_index(rt, state, task), rt.plan.train_labels,
                              task.num_seen, self.coreset.size,
                              rng.fold_in(rt.method_key, task.index))


class NaiveRehearsal(RandomReplayMixin, Method):
    """Base (CE over the valid logits) on the task's data plus a random class-balanced
    memory."""

    name = "naive_rehearsal"
    sections = ("coreset",)
    tables, rank = ("methods", "coreset"), 90
    published = abd_table((34.0, 0.2), (24.0, 1.0), (14.9, 0.7))

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.coreset = Coreset(config.coreset.memory, "random")

    def init_state(self, rt, learner):
        return MemoryState(memory=self.coreset.empty(), distinct=no_distinct(rt))

    def loss_fn(self, task):
        return ce

    def end_task(self, task):
        return [Update("memory", self.update_memory)]

    def update_memory(self, rt, learner, state, task):
        return learner, self.remember(rt, learner, state, task)


class TeacherRehearsal(RehearsalMixin, TeacherMethod):
    """A distillation method with a memory: the teacher and the memory are renewed at every
    task end."""

    def init_state(self, rt, learner):
        return TeacherMemoryState(teacher=freeze(learner), memory=self.coreset.empty(),
                                  distinct=no_distinct(rt))

    def end_task(self, task):
        return [Update("memory and teacher", self.update_memory_and_teacher)]

    def update_memory_and_teacher(self, rt, learner, state, task):
        return learner, self.remember(rt, learner, state, task).replace(
            teacher=freeze(learner))
