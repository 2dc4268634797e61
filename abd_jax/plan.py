"""One repeat's class-incremental plan, as host values: its class order, the tasks and their
label bounds, which training examples each task owns, its PRNG keys, and the `TaskInfo` of
any training stage (padded indices, schedule).

The task loop, `analysis`, the benchmark and the sweep read a plan; none of them needs a
runner to know what a repeat is.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from abd_jax import checkpoint as ckpt_lib
from abd_jax import data as data_lib
from abd_jax import rng
from abd_jax.sampling import TaskInfo, lr_milestones

MIN_INDEX_CAPACITY = 2048


@dataclasses.dataclass(frozen=True)
class Task:
    """Task `index` (0-based) of `num_tasks`; it owns labels `[num_old, num_seen)`, i.e.
    K_old = num_old and K_new = num_seen."""

    index: int
    num_tasks: int
    num_old: int
    num_seen: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_tasks - 1


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A training stage's SGD schedule: `epochs` at `lr`, times `lr_decay` after each epoch
    of `milestones`; or, `cosine`, annealed per epoch to 0 over the `epochs` (PyTorch's
    CosineAnnealingLR with T_max = epochs, stepped after each epoch); `weight_decay` for this
    stage alone (a method whose later tasks decay otherwise than its first)."""

    epochs: int
    lr: float
    milestones: tuple = ()
    cosine: bool = False
    weight_decay: float | None = None  # None: the optimiser's (the method's `weight_decay`)


def run_schedule(config) -> Schedule:
    """The per-task schedule of the run's config (docs/algorithm.md §1)."""
    return Schedule(config.epochs, config.lr, tuple(config.lr_milestones))


def shared_capacity(largest_stage: int) -> int:
    """The length of `TaskInfo.index` for a run whose largest stage trains on `largest_stage`
    examples: the next power of two, at least `MIN_INDEX_CAPACITY`, so that runs whose tasks
    differ in size share one compiled step (a table's task-count columns, sweep folds, every
    run on a dataset of up to 2,048 training images). The batches do not depend on it
    (`sampling.epoch_order`)."""
    return max(MIN_INDEX_CAPACITY, 1 << max(largest_stage - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Repeat `repeat` of a run: seed `seed + repeat`, its own class order. Labels are
    remapped so that task t owns `[K_old, K_new)`; keys are raw uint32 `[2]`."""

    repeat: int
    seed: int
    order: np.ndarray         # int32 [dataset classes]: original id of remapped class i
    bounds: tuple             # ((K_old, K_new), ...) per task
    train_labels: np.ndarray  # int32 [N_train], remapped
    test_labels: np.ndarray   # int32 [N_test], remapped
    train_per_class: int
    batch_size: int
    num_milestones: int
    init_key: np.ndarray
    run_key: np.ndarray
    method_key: np.ndarray

    @classmethod
    def create(cls, config, num_dataset_classes: int, train_labels, test_labels,
               repeat: int) -> "RunPlan":
        """The plan of `config`'s repeat `repeat` for a dataset's original labels."""
        seed = config.seed + repeat
        order = data_lib.class_order(num_dataset_classes, config.class_order, seed, repeat,
                                     config.dataset)
        used = config.num_classes or num_dataset_classes
        init_key, run_key, method_key = rng.split(rng.key(seed), 3)
        return cls(repeat=repeat, seed=seed, order=order,
                   bounds=tuple(data_lib.task_boundaries(
                       used, config.num_tasks, config.get("first_task_classes", 0))),
                   train_labels=data_lib.remap_labels(np.asarray(train_labels), order),
                   test_labels=data_lib.remap_labels(np.asarray(test_labels), order),
                   train_per_class=config.train_per_class, batch_size=config.batch_size,
                   num_milestones=len(config.lr_milestones), init_key=init_key,
                   run_key=run_key, method_key=method_key)

    @property
    def num_tasks(self) -> int:
        return len(self.bounds)

    def task(self, t: int) -> Task:
        lo, hi = self.bounds[t]
        return Task(index=t, num_tasks=self.num_tasks, num_old=lo, num_seen=hi)

    def class_indices(self, lo: int, hi: int) -> np.ndarray:
        """int32 indices of the training examples with labels in `[lo, hi)` (the first
        `train_per_class` of each class when set)."""
        return data_lib.class_indices(self.train_labels, lo, hi,
                                      self.train_per_class).astype(np.int32)

    def task_indices(self, t: int) -> np.ndarray:
        """The training examples of task t's own classes."""
        return self.class_indices(*self.bounds[t])

    def seen_indices(self, t: int) -> np.ndarray:
        """The training examples of every class seen up to task t."""
        return self.class_indices(0, self.bounds[t][1])

    def task_key(self, t: int) -> np.ndarray:
        """The key task t's training draws its batches and step keys from."""
        return rng.fold_in(self.run_key, t)

    def task_info(self, task: Task, index: np.ndarray, schedule: Schedule, key,
                  capacity: int) -> TaskInfo:
        """The `TaskInfo` (numpy) of a stage of `task` training on `index` with `schedule`,
        its index padded to `capacity`. Errors name the setting to change."""
        if len(index) < self.batch_size:
            raise ValueError(
                f"task {task.index + 1} trains on {len(index)} images, fewer than "
                f"batch_size {self.batch_size}; lower --config.batch_size or raise "
                "--config.train_per_class (or --config.coreset.memory)")
        if len(index) > capacity:
            raise ValueError(f"task {task.index + 1} trains on {len(index)} images, more "
                             f"than the method's index capacity {capacity}")
        steps_per_epoch = len(index) // self.batch_size
        if steps_per_epoch * schedule.epochs >= ckpt_lib.STAGE_STRIDE:
            raise ValueError(f"task {task.index + 1} would train "
                             f"{steps_per_epoch * schedule.epochs} steps; at most "
                             f"{ckpt_lib.STAGE_STRIDE - 1} fit a checkpoint position: lower "
                             "--config.epochs")
        padded = np.zeros(capacity, np.int32)
        padded[:len(index)] = index
        return TaskInfo(
            index=padded, count=np.int32(len(index)), num_old=np.int32(task.num_old),
            num_seen=np.int32(task.num_seen), steps_per_epoch=np.int32(steps_per_epoch),
            total_steps=np.int32(steps_per_epoch * schedule.epochs),
            key=np.asarray(key, np.uint32), base_lr=np.float32(schedule.lr),
            lr_milestones=lr_milestones(schedule.milestones, self.num_milestones),
            cosine_epochs=np.int32(schedule.epochs if schedule.cosine else 0),
            weight_decay=np.float32(-1.0 if schedule.weight_decay is None
                                    else schedule.weight_decay))


def validate_task_sizes(config, plan: RunPlan) -> None:
    """Every task must hold at least one batch of its own training images (checked before
    anything is written to the workdir)."""
    for t in range(plan.num_tasks):
        count = len(plan.task_indices(t))
        if count < config.batch_size:
            raise ValueError(
                f"task {t + 1} has {count} training images, fewer than batch_size "
                f"{config.batch_size}; lower --config.batch_size or raise "
                "--config.train_per_class")
