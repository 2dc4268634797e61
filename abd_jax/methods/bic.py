"""Bias Correction (Wu et al. 2019) as in SPEC section 6: a herding memory, stage 1 with BiC's
CE/KD mix, then stage 2 fits a two-parameter linear correction of the new classes' logits on
a held-out split taken from the memory budget (old classes) and the new data (new classes).

Each task keeps its own correction (alpha_t, beta_t); corrections of past tasks stay fixed and
apply to the student and the teacher in later tasks, and to every evaluation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


@functools.partial(jax.jit, static_argnames=("classes_per_task", "steps"))
def fit_bias(logits, labels, alpha, beta, task_index, num_seen, classes_per_task: int,
             steps: int, lr):
    """Stage 2: (alpha_t, beta_t) minimising the CE over the valid logits of the held-out
    `logits [n, C]` (frozen model) after every correction up to task t; full-batch Adam."""
    def loss(ab):
        a, b = alpha.at[task_index].set(ab[0]), beta.at[task_index].set(ab[1])
        z = losses.bias_correction(logits, a, b, classes_per_task, num_seen)
        return losses.valid_ce_loss(z, labels, num_seen)

    tx = optax.adam(lr)
    ab = jnp.stack([alpha[task_index], beta[task_index]])

    def step(carry, _):
        ab, opt = carry
        updates, opt = tx.update(jax.grad(loss)(ab), opt)
        return (optax.apply_updates(ab, updates), opt), None

    (ab, _), _ = jax.lax.scan(step, (ab, tx.init(ab)), None, length=steps)
    return ab[0], ab[1], loss(ab)


class BiC(TeacherRehearsal):
    name = "bic"

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.config = config
        self.coreset = Coreset(config.memory, "herding")
        self.classes_per_task = classes_per_task(config, spec)
        self.first_task_loss = base.ce
        self.distill_loss = programs.bind(bic_loss, classes_per_task=self.classes_per_task,
                                          temperature=config.kd_temperature)

    def init_state(self, rt, learner):
        n = self.config.num_tasks
        return BiCState(teacher=train.teacher_of(learner), memory=self.coreset.empty(),
                        alpha=jnp.ones((n,), jnp.float32), beta=jnp.zeros((n,), jnp.float32))

    # ---------------------------------------------------------------- the held-out split
    def held_out_per_class(self, task: Task) -> int:
        """Held-out images per class for stage 2: the validation fraction of an old class's
        memory quota (none in the first task, which has no correction)."""
        if task.is_first:
            return 0
        return max(1, int(self.coreset.size // task.num_old * self.config.bic.val_fraction))

    def split(self, rt: Runtime, state: BiCState, task: Task) -> tuple[np.ndarray, np.ndarray]:
        """(training indices, held-out indices) of `task`: per old class, the last
        `held_out_per_class` exemplars of its memory; per new class, as many of its images
        chosen by a seeded shuffle."""
        v = self.held_out_per_class(task)
        train_parts, held = [], []
        for _, exemplars in sorted(memory_by_class(np.asarray(state.memory),
                                                   rt.train_labels).items()):
            cut = len(exemplars) - min(v, len(exemplars) - 1) if v else len(exemplars)
            train_parts.append(exemplars[:cut])
            held.append(exemplars[cut:])
        index = rt.task_indices(task.index)
        labels = rt.train_labels[index]
        for c in range(task.num_old, task.num_seen):
            members = index[labels == c]
            key = jax.random.fold_in(rt.method_key, 20_000 + c)
            shuffled = members[np.asarray(jax.random.permutation(key, len(members)))]
            held.append(shuffled[:v])
            train_parts.append(shuffled[v:])
        cat = lambda parts: (np.concatenate(parts) if parts else np.zeros(0)).astype(np.int32)
        return cat(train_parts), cat(held)

    def train_index(self, rt, state, task):
        return self.split(rt, state, task)[0]

    # ---------------------------------------------------------------- task end
    def end_task(self, rt, learner, state: BiCState, task):
        if not task.is_first:
            held = self.split(rt, state, task)[1]
            logits = rt.predict_train(learner, held)[0]
            bic = self.config.bic
            a, b, loss = fit_bias(jnp.asarray(logits), jnp.asarray(rt.train_labels[held]),
                                  state.alpha, state.beta, task.index, task.num_seen,
                                  self.classes_per_task, bic.steps, bic.lr)
            rt.log(task.index + 1, {"alpha": float(a), "beta": float(b), "held_out_ce":
                                    float(loss), "held_out_images": len(held)},
                   task=task.index + 1, phase="bias_correction")
            state = state.replace(alpha=state.alpha.at[task.index].set(a),
                                  beta=state.beta.at[task.index].set(b))
        memory = self.new_memory(rt, learner, state, task)
        return learner, state.replace(teacher=train.teacher_of(learner), memory=memory)

    def eval_logits(self, state: BiCState, logits: np.ndarray, task: Task) -> np.ndarray:
        return np.asarray(losses.bias_correction(
            jnp.asarray(logits), state.alpha, state.beta, self.classes_per_task, task.num_seen))
