"""End-to-End Incremental Learning (Castro et al. 2018) as in SPEC section 6: CE plus a KD
term per past task, herding memory, and a class-balanced fine-tuning stage at lr/100."""
from __future__ import annotations

import jax

from abd_jax import losses, programs, train
from abd_jax.methods import base
from abd_jax.methods.coreset import Coreset, TeacherMemoryState, TeacherRehearsal
from abd_jax.methods.lifecycle import classes_per_task
from abd_jax.train import LossContext


def e2e_loss(ctx: LossContext, classes_per_task: int, temperature: float):
    """CE over the valid logits + sum over past tasks j of KD over task j's logits."""
    logits, _, new_bs = ctx.forward(ctx.images)
    teacher_logits = train.teacher_apply(ctx.model, ctx.method_state.teacher, ctx.images)[0]
    ce = losses.valid_ce_loss(logits, ctx.labels, ctx.num_seen)
    kd = losses.taskwise_kd_loss(logits, teacher_logits, ctx.num_old, classes_per_task,
                                 temperature)
    return ce + kd, new_bs, {"ce": ce, "kd": kd}


class E2E(TeacherRehearsal):
    """After each task: herding adds the new classes to the memory; from the second task on,
    the model is then fine-tuned on the class-balanced memory (`--config.e2e.*`)."""

    name = "e2e"

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.config = config
        self.coreset = Coreset(config.memory, "herding")
        self.first_task_loss = base.ce
        self.distill_loss = programs.bind(
            e2e_loss, classes_per_task=classes_per_task(config, spec),
            temperature=config.kd_temperature)

    def end_task(self, rt, learner, state, task):
        memory = self.new_memory(rt, learner, state, task)
        if not task.is_first:
            e2e = self.config.e2e
            learner = rt.train_stage(
                learner, state, self.distill_loss, self.coreset.stored(memory),
                epochs=e2e.balanced_epochs, lr=self.config.lr * e2e.balanced_lr_scale,
                key=jax.random.fold_in(rt.method_key, 10_000 + task.index), task=task,
                name="balanced_finetuning")
        return learner, TeacherMemoryState(teacher=train.teacher_of(learner), memory=memory)
