"""Frozen models (the teacher: the model frozen at the end of a task; the model before a
stage), and the methods that distil from the teacher. Their forward is
`synthesis.frozen_apply`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from abd_jax.methods.lifecycle import Method, Runtime, Update
from abd_jax.plan import Task


@struct.dataclass
class FrozenModel:
    """A frozen model's variables (eval mode only): a teacher, or another model a loss reads
    without training it (E2E's model before its balanced stage, BiC's corrected model,
    R-DFCIL's backbone)."""

    params: dict
    batch_stats: dict


def freeze(state) -> FrozenModel:
    """The variables of `state` (a TrainState) as a `FrozenModel`, in buffers of its own: the
    training chunks donate the state's buffers to their next step."""
    return FrozenModel(*jax.tree.map(jnp.copy, (state.params, state.batch_stats)))


# How a stage that trains only a head or a correction runs the frozen backbone's BatchNorm:
# "train" as the release (batch statistics normalise, the running statistics move), "eval".
BN_MODES = ("train", "eval")


def train_mode_apply(model, params, batch_stats, images):
    """The release's `model.train()` forward of a model whose `params` a stage does not
    train: every BatchNorm normalises with the batch's statistics and moves its running
    statistics `batch_stats`. Returns (logits, features, new batch_stats)."""
    (logits, features), updates = model.apply({"params": params, "batch_stats": batch_stats},
                                              images, train=True, mutable=["batch_stats"])
    return logits, features, updates["batch_stats"]


def check_bn_mode(value: str, setting: str) -> str:
    """`value` if it is a BatchNorm mode (`BN_MODES`), else a ValueError naming `setting`."""
    if value not in BN_MODES:
        raise ValueError(f"{setting}={value!r}: use one of {BN_MODES} (--config.{setting})")
    return value


@struct.dataclass
class TeacherState:
    """The model frozen at the end of the previous task (before the first task ends: the
    initial model, never used)."""

    teacher: FrozenModel


def freeze_teacher(rt: Runtime, learner, state, task: Task):
    """The state with the trained model as the next task's teacher."""
    del rt, task
    return learner, state.replace(teacher=freeze(learner))


class TeacherMethod(Method):
    """A method that distils from the model frozen at the end of each task: plain CE for the
    first task, `distill_loss` afterwards."""

    distill_loss = None
    first_task_loss = None

    def init_state(self, rt, learner) -> TeacherState:
        del rt
        return TeacherState(teacher=freeze(learner))

    def loss_fn(self, task: Task):
        return self.first_task_loss if task.is_first else self.distill_loss

    def end_task(self, task: Task) -> list:
        del task
        return [Update("teacher", freeze_teacher)]
