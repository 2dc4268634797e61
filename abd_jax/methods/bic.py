"""Bias Correction (Wu et al. 2019) as the release runs it (docs/algorithm.md §6b): a herding
memory, stage 1 with BiC's CE/KD mix on the task's data and the memory minus a held-out split, then
stage 2 fits a two-parameter linear correction of the new classes' logits on that split.

Each task keeps its own correction (alpha_t, beta_t); corrections of past tasks stay fixed and
apply to the student and the teacher in later tasks. The release evaluates the bare model
(`validation()` applies no correction), which produced the paper's BiC row;
`--config.bic.correct_at_test=True` evaluates with every correction, as the BiC paper does.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct

from abd_jax import hosts, losses, rng, train
from abd_jax.methods.base import ce
from abd_jax.methods.coreset import Coreset, TeacherRehearsal, no_distinct
from abd_jax.methods.lifecycle import Runtime, SGDLoop, Update, task_bounds
from abd_jax.methods.teacher import FrozenModel, check_bn_mode, freeze, train_mode_apply
from abd_jax.methods.published import abd_table
from abd_jax.plan import Schedule, Task
from abd_jax.session import bind
from abd_jax.synthesis import frozen_apply
from abd_jax.train import LossContext


@struct.dataclass
class BiCState:
    """teacher, memory and distinct as in the other coreset methods; alpha, beta `[N]`: each
    task's bias correction (1, 0 until fitted); correction: the (alpha, beta) stage 2 trains."""

    teacher: FrozenModel
    memory: jax.Array
    distinct: jax.Array
    alpha: jax.Array
    beta: jax.Array
    correction: train.TrainState


@struct.dataclass
class CorrectionInputs:
    """What stage 2's loss reads: the frozen model, every task's correction and the index of
    the task whose (alpha, beta) the stage trains."""

    model: FrozenModel
    alpha: jax.Array
    beta: jax.Array
    task_index: jax.Array


def bic_loss(ctx: LossContext, bounds: tuple, temperature: float):
    """Stage 1: (1 - lambda) CE + lambda KD over the past classes, student and teacher logits
    both through the past tasks' fixed corrections."""
    state: BiCState = ctx.inputs
    logits, _, new_bs = ctx.forward(ctx.images)
    teacher_logits = frozen_apply(ctx.model, state.teacher, ctx.images)[0]
    correct = functools.partial(losses.bias_correction, alpha=state.alpha, beta=state.beta,
                                bounds=bounds, num_corrected=ctx.num_old)
    loss, ce, kd = losses.bic_stage1_loss(correct(logits), correct(teacher_logits), ctx.labels,
                                          ctx.num_old, ctx.num_seen, temperature)
    return loss, new_bs, {"ce": ce, "kd": kd}


def correction_loss(ctx: LossContext, bounds: tuple):
    """Stage 2: `losses.bic_stage2_loss` of the frozen model's logits, the new task's
    (alpha, beta) being the trained parameters `ctx.params`. The model's BatchNorm runs in
    train mode when the trained state carries its running statistics (`bic.stage2_bn=train`,
    the release), else in eval mode."""
    inputs: CorrectionInputs = ctx.inputs
    if ctx.batch_stats is None:
        logits, new_bs = frozen_apply(ctx.model, inputs.model, ctx.images)[0], None
    else:
        logits, _, new_bs = train_mode_apply(ctx.model, inputs.model.params, ctx.batch_stats,
                                             ctx.images)
    alpha = inputs.alpha.at[inputs.task_index].set(ctx.params["alpha"])
    beta = inputs.beta.at[inputs.task_index].set(ctx.params["beta"])
    ce = losses.bic_stage2_loss(logits, ctx.labels, alpha, beta, bounds, ctx.num_seen)
    return ce, new_bs, {"ce": ce}


@dataclasses.dataclass(frozen=True)
class CorrectionStage(SGDLoop):
    """Stage 2: (alpha_t, beta_t) from (1, 0), SGD (momentum, weight decay) at lr *
    `bic.stage2_lr_scale` for the task's epochs and schedule (`bic.stage2_epochs` > 0: that
    many epochs at a constant rate) on augmented mini-batches of the held-out split, the
    backbone's BatchNorm in `bic.stage2_bn` mode. A split smaller than one batch takes no
    step (the release drops incomplete batches)."""

    def begin(self, rt, learner, state, task):
        fresh = jax.device_put({"alpha": np.float32(1.0), "beta": np.float32(0.0)})
        return super().begin(rt, learner, state.replace(
            correction=state.correction.replace(params=fresh)), task)

    def program(self, rt, learner, state, task, start):
        held = self.index(rt, state, task)
        if len(held) < rt.config.batch_size:
            logging.warning("task %d: BiC's held-out split has %d images, fewer than one "
                            "batch (%d): the bias correction stays at alpha 1, beta 0 (raise "
                            "--config.bic.val_fraction or --config.coreset.memory)",
                            task.index + 1, len(held), rt.config.batch_size)
            return None
        return super().program(rt, learner, state, task, start)

    def end(self, rt, learner, state, task):
        a, b = hosts.fetch((state.correction.params["alpha"], state.correction.params["beta"]))
        alpha, beta = hosts.fetch((state.alpha, state.beta))
        alpha, beta = alpha.copy(), beta.copy()
        alpha[task.index], beta[task.index] = a, b
        rt.services.log(task.index + 1, {"alpha": float(a), "beta": float(b)},
                        task=task.index + 1, phase="bias_correction")
        return super().end(rt, learner, state.replace(alpha=alpha, beta=beta), task)


class BiC(TeacherRehearsal):
    name = "bic"
    sections = ("coreset", "bic")
    tables, rank = ("methods", "coreset"), 120
    published = abd_table((53.7, 0.4), (45.9, 1.8), (37.5, 3.2))

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.coreset = Coreset(config.coreset.memory, config.bic.selection)
        check_bn_mode(config.bic.stage2_bn, "bic.stage2_bn")
        self.bounds = task_bounds(config, spec)
        self.first_task_loss = ce
        self.distill_loss = bind(bic_loss, bounds=self.bounds,
                                 temperature=config.kd_temperature)
        self.correction_loss = bind(correction_loss, bounds=self.bounds)

    def init_state(self, rt, learner):
        n = rt.config.num_tasks
        statistics = ({"batch_stats": jax.tree.map(jnp.copy, learner.batch_stats)}
                      if self.config.bic.stage2_bn == "train" else {})
        correction = train.new_train_state(
            rt.session, None,
            {"params": {"alpha": np.float32(1.0), "beta": np.float32(0.0)}, **statistics},
            train.learner_optimizer(rt.session, rt.config.lr, rt.config.momentum,
                                    self.weight_decay(rt.config)))
        return BiCState(teacher=freeze(learner), memory=self.coreset.empty(),
                        distinct=no_distinct(rt),
                        alpha=np.ones((n,), np.float32), beta=np.zeros((n,), np.float32),
                        correction=correction)

    # ---------------------------------------------------------------- the held-out split
    def held_out_per_class(self, stored: int, task: Task) -> int:
        """Held-out images per class for stage 2, the release's count: int(int(val_fraction
        * stored exemplars) / K_old) (none in the first task, which has no correction)."""
        if task.is_first:
            return 0
        return int(int(self.config.bic.val_fraction * stored) / task.num_old)

    def split(self, rt: Runtime, state: BiCState, task: Task) -> tuple[np.ndarray, np.ndarray]:
        """(training indices, held-out indices) of `task`, as the release's
        `load_bic_dataset` and `append_coreset_ic`: per new class its first
        `held_out_per_class` images (stored order), per old class its first
        (highest-priority) exemplars are held out; training is the task's other images in
        stored order, then the memory's other exemplars (the first task: the task's images as
        Naive Rehearsal's, nothing held out)."""
        labels = rt.plan.train_labels
        memory = hosts.fetch(state.memory)
        memory = memory[memory >= 0]
        v = self.held_out_per_class(len(memory), task)
        own = rt.plan.task_indices(task.index)
        held_own, held_memory = first_per_class(labels[own], v), first_per_class(labels[memory], v)
        cat = lambda *parts: np.concatenate(parts).astype(np.int32)
        return (cat(own[~held_own], memory[~held_memory]),
                cat(own[held_own], memory[held_memory]))

    def train_index(self, rt, state, task):
        return self.split(rt, state, task)[0]

    # ---------------------------------------------------------------- task end
    def end_task(self, task: Task):
        if task.is_first:
            return super().end_task(task)
        correction = CorrectionStage(
            name="bias_correction", loss_fn=self.correction_loss,
            index=lambda rt, state, task: self.split(rt, state, task)[1],
            inputs=lambda learner, state: CorrectionInputs(
                model=freeze(learner), alpha=state.alpha, beta=state.beta,
                task_index=np.int32(task.index)),
            schedule=self.correction_schedule,
            key=lambda rt, task: rng.fold_in(rt.method_key, 20_000 + task.index),
            slot="correction")
        return [correction, Update("memory and teacher", self.update_memory_and_teacher)]

    def correction_schedule(self, config) -> Schedule:
        bic = config.bic
        return Schedule(bic.stage2_epochs or config.epochs, config.lr * bic.stage2_lr_scale,
                        () if bic.stage2_epochs else tuple(config.lr_milestones))

    def eval_logits(self, rt, state: BiCState, logits, features, task: Task) -> np.ndarray:
        del features
        if not self.config.bic.correct_at_test:
            return logits
        logits, alpha, beta, num_seen = jax.device_put(
            (logits, state.alpha, state.beta, np.int32(task.num_seen)))
        corrected = rt.session.jitted(_corrector, self.bounds)(logits, alpha, beta, num_seen)
        return hosts.fetch(corrected)


def first_per_class(labels: np.ndarray, count: int) -> np.ndarray:
    """Boolean `[n]`: True at the first `count` positions of each class in `labels` `[n]`."""
    taken: dict[int, int] = {}
    out = np.zeros(len(labels), bool)
    for i, c in enumerate(np.asarray(labels).tolist()):
        taken[c] = taken.get(c, 0) + 1
        out[i] = taken[c] <= count
    return out


def _corrector(bounds: tuple):
    """`losses.bias_correction` over these task bounds, for `Session.jitted`."""
    return lambda logits, alpha, beta, num_corrected: losses.bias_correction(
        logits, alpha, beta, bounds, num_corrected)
