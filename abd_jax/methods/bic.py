"""Bias Correction (Wu et al. 2019) as the release runs it (SPEC section 6b): a herding memory,
stage 1 with BiC's CE/KD mix on the task's data and the memory minus a held-out split, then
stage 2 fits a two-parameter linear correction of the new classes' logits on that split.

Each task keeps its own correction (alpha_t, beta_t); corrections of past tasks stay fixed and
apply to the student and the teacher in later tasks. The release evaluates the bare model
(`validation()` applies no correction), which produced the paper's BiC row;
`--config.bic.correct_at_test=True` evaluates with every correction, as the BiC paper does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct

from abd_jax import losses, programs, train
from abd_jax.methods import base
from abd_jax.methods.coreset import Coreset, TeacherRehearsal, memory_by_class
from abd_jax.methods.lifecycle import Runtime, Task, classes_per_task
from abd_jax.train import LossContext


@struct.dataclass
class BiCState:
    """teacher and memory as in the other coreset methods; alpha, beta `[N]`: each task's
    bias correction (1, 0 until fitted)."""

    teacher: train.Teacher
    memory: jax.Array
    alpha: jax.Array
    beta: jax.Array


@struct.dataclass
class CorrectionInputs:
    """What stage 2's loss reads: the frozen model, every task's correction and the index of
    the task whose (alpha, beta) the stage trains."""

    model: train.Teacher
    alpha: jax.Array
    beta: jax.Array
    task_index: jax.Array


def bic_loss(ctx: LossContext, classes_per_task: int, temperature: float):
    """Stage 1: (1 - lambda) CE + lambda KD over the past classes, student and teacher logits
    both through the past tasks' fixed corrections."""
    state: BiCState = ctx.method_state
    logits, _, new_bs = ctx.forward(ctx.images)
    teacher_logits = train.teacher_apply(ctx.model, state.teacher, ctx.images)[0]
    correct = functools.partial(losses.bias_correction, alpha=state.alpha, beta=state.beta,
                                classes_per_task=classes_per_task, num_corrected=ctx.num_old)
    loss, ce, kd = losses.bic_stage1_loss(correct(logits), correct(teacher_logits), ctx.labels,
                                          ctx.num_old, ctx.num_seen, temperature)
    return loss, new_bs, {"ce": ce, "kd": kd}


def correction_loss(ctx: LossContext, classes_per_task: int):
    """Stage 2: `losses.bic_stage2_loss` of the frozen model's (eval-mode) logits, the new
    task's (alpha, beta) being the trained parameters `ctx.params`."""
    inputs: CorrectionInputs = ctx.method_state
    logits = train.teacher_apply(ctx.model, inputs.model, ctx.images)[0]
    alpha = inputs.alpha.at[inputs.task_index].set(ctx.params["alpha"])
    beta = inputs.beta.at[inputs.task_index].set(ctx.params["beta"])
    ce = losses.bic_stage2_loss(logits, ctx.labels, alpha, beta, classes_per_task,
                                ctx.num_seen)
    return ce, None, {"ce": ce}


class BiC(TeacherRehearsal):
    name = "bic"

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.config = config
        self.coreset = Coreset(config.memory, config.bic.selection)
        self.classes_per_task = classes_per_task(config, spec)
        self.first_task_loss = base.ce
        self.distill_loss = programs.bind(bic_loss, classes_per_task=self.classes_per_task,
                                          temperature=config.kd_temperature)
        self.correction_loss = programs.bind(correction_loss,
                                             classes_per_task=self.classes_per_task)

    def init_state(self, rt, learner):
        n = self.config.num_tasks
        return BiCState(teacher=train.teacher_of(learner), memory=self.coreset.empty(),
                        alpha=jnp.ones((n,), jnp.float32), beta=jnp.zeros((n,), jnp.float32))

    # ---------------------------------------------------------------- the held-out split
    def held_out_per_class(self, stored: int, task: Task) -> int:
        """Held-out images per class for stage 2, the release's count: int(int(val_fraction
        * stored exemplars) / K_old) (none in the first task, which has no correction)."""
        if task.is_first:
            return 0
        return int(int(self.config.bic.val_fraction * stored) / task.num_old)

    def split(self, rt: Runtime, state: BiCState, task: Task) -> tuple[np.ndarray, np.ndarray]:
        """(training indices, held-out indices) of `task`: per old class its first
        (highest-priority) `held_out_per_class` exemplars, per new class its first as many
        training images (in stored order), as the release."""
        memory = memory_by_class(np.asarray(state.memory), rt.train_labels)
        v = self.held_out_per_class(sum(len(e) for e in memory.values()), task)
        index = rt.task_indices(task.index)
        labels = rt.train_labels[index]
        groups = [exemplars for _, exemplars in sorted(memory.items())]
        groups += [index[labels == c] for c in range(task.num_old, task.num_seen)]
        cat = lambda parts: (np.concatenate(parts) if parts else np.zeros(0)).astype(np.int32)
        return cat([g[v:] for g in groups]), cat([g[:v] for g in groups])

    def train_index(self, rt, state, task):
        return self.split(rt, state, task)[0]

    # ---------------------------------------------------------------- task end
    def end_task(self, rt, learner, state: BiCState, task):
        if not task.is_first:
            a, b = self.fit_correction(rt, learner, state, task)
            state = state.replace(alpha=state.alpha.at[task.index].set(a),
                                  beta=state.beta.at[task.index].set(b))
        memory = self.new_memory(rt, learner, state, task)
        return learner, state.replace(teacher=train.teacher_of(learner), memory=memory)

    def fit_correction(self, rt: Runtime, learner, state: BiCState, task: Task):
        """Stage 2: (alpha_t, beta_t) trained with SGD (momentum, weight decay) at
        lr * `bic.stage2_lr_scale` for the task's epochs and schedule (`bic.stage2_epochs` > 0:
        that many epochs at a constant rate) on augmented mini-batches of the held-out split.
        A split smaller than one batch takes no step (the release drops incomplete batches)."""
        c, bic = self.config, self.config.bic
        held = self.split(rt, state, task)[1]
        t = task.index
        if len(held) < c.batch_size:
            logging.warning("task %d: BiC's held-out split has %d images, fewer than one batch "
                            "(%d): the bias correction stays at alpha 1, beta 0 (raise "
                            "--config.bic.val_fraction or --config.memory)", t + 1, len(held),
                            c.batch_size)
            return state.alpha[t], state.beta[t]
        tx = programs.shared(train.learner_optimizer, c.lr, c.momentum, c.weight_decay)
        params = {"alpha": state.alpha[t], "beta": state.beta[t]}
        inputs = CorrectionInputs(model=train.teacher_of(learner), alpha=state.alpha,
                                  beta=state.beta, task_index=jnp.int32(t))
        fitted = rt.train_stage(
            train.parameters_state(params, tx), inputs, self.correction_loss, held,
            epochs=bic.stage2_epochs or c.epochs, lr=c.lr * bic.stage2_lr_scale,
            lr_milestones=() if bic.stage2_epochs else tuple(c.lr_milestones),
            key=jax.random.fold_in(rt.method_key, 20_000 + t), task=task,
            name="bias_correction")
        a, b = fitted.params["alpha"], fitted.params["beta"]
        rt.log(t + 1, {"alpha": float(a), "beta": float(b), "held_out_images": len(held)},
               task=t + 1, phase="bias_correction")
        return a, b

    def eval_logits(self, state: BiCState, logits: np.ndarray, task: Task) -> np.ndarray:
        if not self.config.bic.correct_at_test:
            return logits
        return np.asarray(losses.bias_correction(
            jnp.asarray(logits), state.alpha, state.beta, self.classes_per_task, task.num_seen))
