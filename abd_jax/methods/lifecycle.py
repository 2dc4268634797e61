"""The method lifecycle: what a method owns, and what the shared task loop offers it.

The task loop (`abd_jax.runner`) names no method. For every task t it calls

    learner, state = method.begin_task(rt, learner, state, task)  # once, at the task's start
    index = method.train_index(rt, state, task)                   # which examples to train on
    ... the driven SGD loop of method.loss_fn(task), each step seeing `state` ...
    for stage in method.end_task(task): ...                       # teacher, synthesis, ...
    ... evaluate with method.eval_logits, checkpoint {learner, state} ...

`state` is the method's own immutable pytree (a `flax.struct.dataclass`), created by
`init_state` with the structure it keeps for the whole run and saved in every checkpoint.
The stages after a task are `Update`s (short host computations, rerun whole after an
interrupt) and `Loop`s (jitted steps run by the shared driver: periodic checkpoints, stop
requests, one divergence message), so an interrupt anywhere resumes to identical results.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from abd_jax import data as data_lib
from abd_jax import driver, models, train
from abd_jax.plan import RunPlan, Schedule, Task, run_schedule


class Services(Protocol):
    """The run's services a method's hooks may call (implemented by `services.RepeatServices`)."""

    def fresh_learner(self, t: int) -> train.TrainState:
        """A newly initialised, placed learner for task t (its own key)."""

    def train_images(self, index: np.ndarray) -> np.ndarray:
        """The training images `index`, uint8 `[n, H, W, C]` on the host (unaugmented)."""

    def predict_train(self, learner, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits `[n, C]`, features `[n, D]`), host numpy: the eval-mode model on the
        (normalised, not augmented) training images `index`."""

    def sgd_loop(self, name: str, loss_fn: train.LossFn, inputs, index: np.ndarray,
                 schedule: Schedule, key, task: Task, start: int) -> driver.DrivenLoop:
        """The driven loop of SGD steps of `loss_fn` (its `ctx.inputs`: `inputs`) on augmented
        batches of `index` under `schedule`, from step `start`: with a task's own index,
        schedule and key (`plan.task_key`), the batches are that task's."""

    def log(self, step: int, scalars: dict, **tags) -> None:
        """The run's metric writer (tagged with the repeat)."""

    def save_samples(self, t: int, images, labels, title: str) -> None:
        """A PNG grid of normalised images `[N, H, W, C]` labelled with (remapped) classes."""


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What a method's hooks see of one repeat: its settings and plan as data, and the
    `services` interface to the run (None outside a task loop: benchmarks, tests)."""

    config: Any
    plan: Optional[RunPlan]
    model: nn.Module
    mesh: Mesh
    image_shape: tuple
    steps_per_call: int
    method_key: Any
    session: Any
    services: Optional[Services] = None


@dataclasses.dataclass(frozen=True)
class Update:
    """An end-of-task stage computed on the host (e.g. a memory update):
    `fn(rt, learner, state, task) -> (learner, state)`, short, rerun whole after an interrupt
    (a deterministic function of its inputs)."""

    name: str
    fn: Callable


class Loop:
    """An end-of-task stage of jitted steps run by the shared driver. It trains one
    TrainState: `get(learner, state)`, stored back with `put`. `begin` prepares the stage
    when it starts (not when it resumes), `program` gives the `driver.DrivenLoop` from step
    `start` (None: nothing to run), `end` runs after the last step. Subclasses name the stage
    (`name`: the log's phase) and the rate a divergence message advises to lower
    (`setting`)."""

    def begin(self, rt: Runtime, learner, state, task: Task):
        del rt, task
        return learner, state

    def get(self, learner, state) -> train.TrainState:
        raise NotImplementedError

    def put(self, learner, state, trained):
        raise NotImplementedError

    def program(self, rt: Runtime, learner, state, task: Task,
                start: int) -> Optional[driver.DrivenLoop]:
        raise NotImplementedError

    def end(self, rt: Runtime, learner, state, task: Task):
        del rt, task
        return learner, state

    def log_every(self, config) -> int:
        return config.log_every_steps

    def checkpoint_every(self, config) -> int:
        return config.checkpoint_every_steps


@dataclasses.dataclass(frozen=True)
class SGDLoop(Loop):
    """SGD steps on augmented training batches, as a task's training: of the learner
    (`slot` None) or of the TrainState in the method state's field `slot`, from a fresh
    optimiser. `index(rt, state, task)`, `inputs(learner, state)` (the loss's `ctx.inputs`),
    `schedule(config)` and `key(rt, task)` describe the stage.

    A slot's TrainState that carries `batch_stats` runs the learner's frozen backbone in
    train mode (the release's `model.train()` in its balancing stages): its running
    statistics start as the learner's, move with every batch, and are the learner's after the
    stage."""

    name: str
    loss_fn: Any
    index: Callable
    inputs: Callable
    schedule: Callable
    key: Callable
    slot: Optional[str] = None
    setting: str = "lr"

    def get(self, learner, state):
        return learner if self.slot is None else getattr(state, self.slot)

    def put(self, learner, state, trained):
        if self.slot is None:
            return trained, state
        return learner, state.replace(**{self.slot: trained})

    def _moves_backbone_statistics(self, learner, state) -> bool:
        return self.slot is not None and self.get(learner, state).batch_stats is not None

    def begin(self, rt, learner, state, task):
        del task
        trained = train.reset_optimizer(rt.session, self.get(learner, state))
        if self._moves_backbone_statistics(learner, state):
            trained = trained.replace(batch_stats=jax.tree.map(jnp.copy, learner.batch_stats))
        return self.put(learner, state, trained)

    def program(self, rt, learner, state, task, start):
        return rt.services.sgd_loop(self.name, self.loss_fn, self.inputs(learner, state),
                                    self.index(rt, state, task), self.schedule(rt.config),
                                    self.key(rt, task), task, start)

    def end(self, rt, learner, state, task):
        del rt, task
        if self._moves_backbone_statistics(learner, state):
            statistics = jax.tree.map(jnp.copy, self.get(learner, state).batch_stats)
            learner = learner.replace(batch_stats=statistics)
        return learner, state


@dataclasses.dataclass(frozen=True)
class HeadStage(SGDLoop):
    """An SGD stage of the classifier head alone (in the method state's field `slot`, a
    `head_state`), on the frozen backbone its loss reads: it starts from the learner's head
    and writes the trained head back into the learner."""

    def begin(self, rt, learner, state, task):
        head = getattr(state, self.slot).replace(params=jax.tree.map(jnp.copy,
                                                                     learner.params["head"]))
        return super().begin(rt, learner, state.replace(**{self.slot: head}), task)

    def end(self, rt, learner, state, task):
        head = jax.tree.map(jnp.copy, getattr(state, self.slot).params)
        learner = learner.replace(params={**learner.params, "head": head})
        return super().end(rt, learner, state, task)


def head_state(rt: Runtime, learner: train.TrainState, weight_decay: float,
               train_bn: bool = False) -> train.TrainState:
    """A TrainState of the learner's head alone (a copy) under the learner's SGD, for a
    `HeadStage`; with `train_bn`, also the backbone's running statistics, which the stage
    moves (see `SGDLoop`)."""
    variables = jax.tree.map(jnp.copy, {"params": learner.params["head"],
                                        **({"batch_stats": learner.batch_stats} if train_bn
                                           else {})})
    return train.new_train_state(rt.session, None, variables, train.learner_optimizer(
        rt.session, rt.config.lr, rt.config.momentum, weight_decay))


def new_learner(rt: Runtime, method: "Method", key, tx) -> train.TrainState:
    """A freshly initialised learner (from `key`) with a fresh state of optimiser `tx`: the
    classifier's variables plus what `method.learner_variables` adds."""
    variables = models.init_variables(rt.session, rt.model, key, (1, *rt.image_shape),
                                      train=False)
    return train.new_train_state(rt.session, rt.model,
                                 method.learner_variables(rt, variables, key), tx)


def task_bounds(config, spec: data_lib.DatasetSpec) -> tuple:
    """((K_old, K_new), ...) of the run's tasks (`data.task_boundaries`), hashable: the losses
    that treat tasks one by one (E2E's, BiC's) take it as a static argument."""
    return tuple(data_lib.task_boundaries(config.num_classes or spec.num_classes,
                                          config.num_tasks, config.get("first_task_classes", 0)))


class Method:
    """A class-incremental method: losses plus task-boundary hooks (see the module docstring).

    The defaults train on the task's own classes with a reset optimiser, carry no state and
    have no end-of-task stage."""

    name: str = ""
    sections: tuple = ()  # the config subtrees it reads (the others don't fingerprint its runs)
    # run_table.py: the tables it is a row of, its place among the rows (`rank`), extra rows
    # of it under other settings ({row: config overrides}, listed after it in
    # `variant_tables`), the figures papers report for it (`published.Published`) with the
    # texts of their sources not in `published.SOURCES`.
    tables: tuple = ()
    rank: int = 1000
    variants: dict = {}
    variant_tables: tuple = ()
    published: tuple = ()
    sources: dict = {}
    row_settings: dict = {}  # the settings its table row runs with (e.g. its backbone)
    # Its backbone freezes after the first task: the run keeps that task's model for others
    # (`--config.first_task_from`, `abd_jax.first_task`).
    keeps_first_task: bool = False
    published_note: str = ""  # said below a table that shows published figures beside it
    head_bias: bool = True  # whether its classifier's head has a bias
    heads: tuple = ("linear", "cosine")  # the `--config.head`s its losses support

    def __init__(self, config, spec: data_lib.DatasetSpec):
        """Built by `methods.get_method` from the run's config and its data's spec (classes,
        image shape, mean/std)."""
        self.config = config

    def classifier(self, num_classes: int) -> nn.Module:
        """The classifier it trains: `--config.model` with `num_classes` outputs and the
        `--config.head` head ("linear" or "cosine")."""
        c = self.config
        return models.create_classifier(c.model, num_classes, c.dtype, c.conv_impl,
                                        head_bias=self.head_bias, head=c.get("head", "linear"))

    def input_stats(self, spec: data_lib.DatasetSpec) -> tuple[tuple, tuple]:
        """(mean, std) per channel that the classifier's inputs are normalised with."""
        return tuple(spec.mean), tuple(spec.std)

    def weight_decay(self, config) -> float:
        """The learner's SGD weight decay."""
        return config.weight_decay

    def learner_variables(self, rt: Runtime, variables: dict, key) -> dict:
        """The learner's initial variables: the classifier's (`{"params", "batch_stats"}`),
        plus what the method trains or counts beside it (the classifier ignores extra
        entries); the learner keeps this structure all run."""
        del rt, key
        return variables

    def init_state(self, rt: Runtime, learner: train.TrainState) -> Any:
        """The state before the first task, with the structure it keeps all run."""
        del rt, learner
        return NoState()

    def index_capacity(self, rt: Runtime) -> int:
        """The most training examples any stage trains on (sets one compiled step's shape)."""
        return max(len(rt.plan.task_indices(t)) for t in range(rt.plan.num_tasks))

    def begin_task(self, rt: Runtime, learner: train.TrainState, state, task: Task):
        """`(learner, state)` at the start of `task` (docs/algorithm.md §1: a fresh optimiser
        every task)."""
        del task
        return train.reset_optimizer(rt.session, learner), state

    def trains(self, task: Task) -> bool:
        """Whether `task` has a training loop (a method whose backbone freezes after the first
        task trains only that one; its end-of-task stages still run)."""
        del task
        return True

    def schedule(self, config, task: Task) -> Schedule:
        """The SGD schedule of `task`'s training: the run's (docs/algorithm.md §1)."""
        del task
        return run_schedule(config)

    def train_index(self, rt: Runtime, state, task: Task) -> np.ndarray:
        """The training examples of `task` (a pure function of `state`: resume calls it)."""
        del state
        return rt.plan.task_indices(task.index)

    def loss_fn(self, task: Task) -> train.LossFn:
        """The step's loss for `task`; return the same object for tasks that share it (one
        compilation each)."""
        raise NotImplementedError

    def end_task(self, task: Task) -> list:
        """The stages (`Update`, `Loop`) after `task`'s training, before its evaluation."""
        del task
        return []

    def programs(self, rt: Runtime, learner: train.TrainState, state) -> list:
        """[(name, jitted function, example arguments)] of the method's own programs that its
        stages call later (e.g. the generator's step), for compiling ahead
        (`--config.compile_ahead`); arguments typed as that call's (arrays or shapes)."""
        del rt, learner, state
        return []

    def eval_logits(self, rt: Runtime, state, logits: np.ndarray, features: np.ndarray,
                    task: Task) -> np.ndarray:
        """The scores `[n, C]` the method classifies the test images with after `task`, from
        the model's logits `[n, C]` and features `[n, D]` (host numpy): by default the
        logits; BiC's corrected logits; a head that scores features, such as nearest class
        mean or Mahalanobis distance (negated distances, the largest wins)."""
        del rt, state, features, task
        return logits

    def memory_footprint(self, rt: Runtime, state) -> dict:
        """What the method keeps between tasks to run the next one, for the paper's memory
        comparison: parameter counts and stored images (see `metrics.memory_totals`)."""
        del state
        return {"classifier_parameters": rt.session.shared(classifier_parameters, rt.model,
                                                           rt.image_shape)}


@struct.dataclass
class NoState:
    """The state of a method that carries nothing between tasks."""


def classifier_parameters(model: nn.Module, image_shape: tuple) -> int:
    """The number of parameters of the classifier `model` on images `image_shape`."""
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jax.numpy.zeros((1, *image_shape)), train=False))["params"]
    return models.parameter_count(shapes)
