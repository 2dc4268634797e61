"""The method lifecycle: what a method owns, and what the shared task loop offers it.

The task loop (`abd_jax.experiment`) names no method. For every task t it calls

    learner, state = method.begin_task(rt, learner, state, task)   # once, at the task's start
    index = method.train_index(rt, state, task)                    # which examples to train on
    ... jitted SGD steps of method.loss_fn(task), each seeing `state` as ctx.method_state ...
    learner, state = method.end_task(rt, learner, state, task)     # teacher, synthesis, ...
    ... evaluate the learner, checkpoint {learner, state} ...

`state` is the method's own immutable pytree (a `flax.struct.dataclass`), created by
`init_state` with the structure it keeps for the whole run and saved in every checkpoint, so
an interrupt anywhere resumes to identical results: mid-task from the last periodic
checkpoint, and inside `end_task` by running it again from the checkpoint taken when the
task's training finished (every hook is a deterministic function of its inputs).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from abd_jax import data as data_lib
from abd_jax import programs, train


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
class Runtime:
    """What the task loop offers a method's hooks (one repeat).

    fresh_learner(t) -> a newly initialised, placed TrainState for task t (its own key).
    task_indices(t) / seen_indices(t) -> int32 training-example indices of task t's classes /
        of every class seen up to task t.
    train_labels: the (remapped) label of every training example, host int32 `[N]`.
    task_key(t) -> the PRNG key task t's training draws its batches and step keys from.
    predict_train(learner, index) -> (logits `[n, C]`, features `[n, D]`), host numpy: the
        eval-mode model on the (normalised, not augmented) training images `index`.
    train_stage(state, method_state, loss_fn, index, *, epochs, lr, lr_milestones, key, task,
        name) -> state: `epochs` SGD epochs of `loss_fn` (seeing `method_state`) over `index`
        (augmented batches, as the task's training), from a fresh optimiser of `state` (any
        TrainState: the learner, or e.g. BiC's correction), at `lr` decayed after the epochs
        `lr_milestones`, logged with phase=name (e.g. E2E's balanced fine-tuning). With the
        task's own index, epochs, schedule and `task_key` its batches are the task's.
    checkpoint_progress(task, learner, state, progress) -> None: save a checkpoint inside
        `end_task` (progress: an int > 0 that grows, e.g. generator iterations done). An
        interrupt then resumes by calling `end_task` again with this `state`, so a method that
        calls it must continue from the progress its state records.
    method_key: the repeat's PRNG key for the method's own randomness (fold_in per use).
    log(step, scalars, **tags): the run's metric writer (tagged with the repeat).
    save_samples(t, images, labels, title): a PNG grid of normalised images `[N, H, W, C]`
        labelled with (remapped) classes `[N]`, saved in the workdir for task t.
    """

    config: Any
    model: nn.Module
    mesh: Mesh
    image_shape: tuple
    steps_per_call: int
    fresh_learner: Callable[[int], train.TrainState]
    task_indices: Callable[[int], np.ndarray]
    seen_indices: Callable[[int], np.ndarray]
    train_labels: np.ndarray
    task_key: Callable[[int], Any]
    predict_train: Callable[..., tuple]
    train_stage: Callable[..., train.TrainState]
    checkpoint_progress: Callable[..., None]
    method_key: Any
    log: Callable[..., None]
    save_samples: Callable[..., None]

    @classmethod
    def outside_the_loop(cls, config, model: nn.Module, mesh: Mesh, image_shape: tuple,
                         steps_per_call: int, method_key) -> "Runtime":
        """A runtime for building method states and steps without a task loop (benchmarks,
        tests): the data services raise, logging and sample grids are dropped."""
        def no_data(t):
            raise RuntimeError(f"no training data outside the task loop (task {t})")

        return cls(config=config, model=model, mesh=mesh, image_shape=tuple(image_shape),
                   steps_per_call=steps_per_call, fresh_learner=no_data, task_indices=no_data,
                   seen_indices=no_data, train_labels=np.zeros(0, np.int32),
                   task_key=no_data, predict_train=no_data, train_stage=no_data,
                   checkpoint_progress=lambda *args: None, method_key=method_key,
                   log=lambda *args, **kwargs: None, save_samples=lambda *args: None)


def classes_per_task(config, spec: data_lib.DatasetSpec) -> int:
    """s = C / N of the run (every task owns s classes; `data.task_boundaries` checks it)."""
    return spec.num_classes // config.num_tasks


@struct.dataclass
class NoState:
    """The state of a method that carries nothing between tasks."""


@struct.dataclass
class TeacherState:
    """The model frozen at the end of the previous task (before the first task ends: the
    initial model, never used)."""

    teacher: train.Teacher


class Method:
    """A class-incremental method: losses plus task-boundary hooks (see the module docstring).

    The defaults train on the task's own classes with a reset optimiser and carry no state.
    """

    name: str = ""

    def __init__(self, config, spec: data_lib.DatasetSpec):
        """Built by `methods.get_method` from the run's config and its data's spec (classes,
        image shape, mean/std)."""
        del config, spec

    def input_stats(self, spec: data_lib.DatasetSpec) -> tuple[tuple, tuple]:
        """(mean, std) per channel that the classifier's inputs are normalised with."""
        return tuple(spec.mean), tuple(spec.std)

    def weight_decay(self, config) -> float:
        """The learner's SGD weight decay."""
        return config.weight_decay

    def init_state(self, rt: Runtime, learner: train.TrainState) -> Any:
        """The state before the first task, with the structure it keeps all run."""
        del rt, learner
        return NoState()

    def index_capacity(self, rt: Runtime, num_tasks: int) -> int:
        """The most training examples any task trains on (sets one compiled step's shape)."""
        return max(len(rt.task_indices(t)) for t in range(num_tasks))

    def begin_task(self, rt: Runtime, learner: train.TrainState, state, task: Task):
        """`(learner, state)` at the start of `task` (SPEC: a fresh optimiser every task)."""
        del rt, task
        return train.reset_optimizer(learner), state

    def train_index(self, rt: Runtime, state, task: Task) -> np.ndarray:
        """The training examples of `task` (a pure function of `state`: resume calls it)."""
        del state
        return rt.task_indices(task.index)

    def loss_fn(self, task: Task) -> train.LossFn:
        """The step's loss for `task`; return the same object for tasks that share it (one
        compilation each)."""
        raise NotImplementedError

    def end_task(self, rt: Runtime, learner: train.TrainState, state, task: Task):
        """`(learner, state)` once `task`'s training is done, before it is evaluated."""
        del rt, task
        return learner, state

    def programs(self, rt: Runtime, learner: train.TrainState, state) -> list:
        """[(name, jitted function, example arguments)] of the method's own programs that its
        hooks call later (e.g. the generator's step), for compiling ahead
        (`--config.compile_ahead`); arguments typed as that call's (arrays or shapes)."""
        del rt, learner, state
        return []

    def eval_logits(self, state, logits: np.ndarray, task: Task) -> np.ndarray:
        """The logits `[n, C]` the method classifies with after `task` (e.g. BiC's
        correction); by default the model's own."""
        del state, task
        return logits

    def memory_footprint(self, rt: Runtime, state) -> dict:
        """What the method keeps between tasks to run the next one, for the paper's memory
        comparison: parameter counts and stored images (see `metrics.memory_totals`)."""
        del state
        return {"classifier_parameters": programs.shared(parameter_count, rt.model,
                                                         rt.image_shape)}


def parameter_count(model: nn.Module, image_shape: tuple) -> int:
    """The number of parameters of the classifier `model` on images `image_shape`."""
    params = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False))["params"]
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


class TeacherMethod(Method):
    """A method that distils from the model frozen at the end of each task: plain CE for the
    first task, `distill_loss` afterwards."""

    distill_loss: train.LossFn
    first_task_loss: train.LossFn

    def init_state(self, rt, learner) -> TeacherState:
        del rt
        return TeacherState(teacher=train.teacher_of(learner))

    def loss_fn(self, task: Task) -> train.LossFn:
        return self.first_task_loss if task.is_first else self.distill_loss

    def end_task(self, rt, learner, state, task):
        del rt, task
        return learner, state.replace(teacher=train.teacher_of(learner))
