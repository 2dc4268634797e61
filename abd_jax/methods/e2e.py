"""End-to-End Incremental Learning (Castro et al. 2018) as the release runs it (SPEC section
6b): CE plus a KD term per past task, the whole memory appended to each task, and after every
task but the first a class-balanced fine-tuning stage on the memory."""
from __future__ import annotations

import jax
from flax import struct

from abd_jax import losses, programs, train
from abd_jax.methods import base
from abd_jax.methods.coreset import Coreset, TeacherMemoryState, TeacherRehearsal
from abd_jax.methods.lifecycle import classes_per_task
from abd_jax.train import LossContext

WEIGHTINGS = ("mean", "sum")
BALANCED_TRAINS = ("head", "all")


@struct.dataclass
class BalancedInputs:
    """What the balanced stage's loss reads: the previous task's model (KD over the past
    tasks) and the model as it was before the stage (KD over the new classes)."""

    teacher: train.Teacher
    before: train.Teacher


def e2e_loss(ctx: LossContext, classes_per_task: int, temperature: float, weighting: str):
    """`losses.e2e_loss` on the real batch, the teacher in eval mode."""
    logits, _, new_bs = ctx.forward(ctx.images)
    teacher_logits = train.teacher_apply(ctx.model, ctx.method_state.teacher, ctx.images)[0]
    loss, ce, kd = losses.e2e_loss(logits, teacher_logits, ctx.labels, ctx.num_old,
                                   ctx.num_seen, classes_per_task, temperature, weighting)
    return loss, new_bs, {"ce": ce, "kd": kd}


def balanced_loss(ctx: LossContext, classes_per_task: int, temperature: float, weighting: str,
                  head_only: bool):
    """`losses.e2e_balanced_loss` on a memory batch. head_only: the backbone is frozen (eval
    mode, its features stop-gradient) and only the head's logits `f W + b` train; else the
    whole network trains in train mode."""
    inputs: BalancedInputs = ctx.method_state
    if head_only:
        _, features = train.teacher_apply(ctx.model, train.Teacher(ctx.params, ctx.batch_stats),
                                          ctx.images)
        head = ctx.params["head"]
        logits = jax.lax.stop_gradient(features) @ head["kernel"] + head["bias"]
        new_bs = ctx.batch_stats
    else:
        logits, _, new_bs = ctx.forward(ctx.images)
    teacher_logits = train.teacher_apply(ctx.model, inputs.teacher, ctx.images)[0]
    before_logits = train.teacher_apply(ctx.model, inputs.before, ctx.images)[0]
    loss, ce, kd_old, kd_new = losses.e2e_balanced_loss(
        logits, teacher_logits, before_logits, ctx.labels, ctx.num_old, ctx.num_seen,
        classes_per_task, temperature, weighting)
    return loss, new_bs, {"ce": ce, "kd": kd_old, "kd_new_classes": kd_new}


class E2E(TeacherRehearsal):
    """After each task the new classes join the memory (`--config.e2e.selection`); from the
    second task on, the model is then fine-tuned on the class-balanced memory
    (`--config.e2e.*`: by default the head only, at lr / 100, with the task's epochs and
    schedule, as the release)."""

    name = "e2e"

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.config = config
        e2e = config.e2e
        if e2e.kd_weighting not in WEIGHTINGS:
            raise ValueError(f"e2e.kd_weighting={e2e.kd_weighting!r}: use one of {WEIGHTINGS}")
        if e2e.balanced_trains not in BALANCED_TRAINS:
            raise ValueError(f"e2e.balanced_trains={e2e.balanced_trains!r}: use one of "
                             f"{BALANCED_TRAINS}")
        self.coreset = Coreset(config.memory, e2e.selection)
        self.first_task_loss = base.ce
        s = classes_per_task(config, spec)
        self.distill_loss = programs.bind(e2e_loss, classes_per_task=s,
                                          temperature=config.kd_temperature,
                                          weighting=e2e.kd_weighting)
        self.balanced_loss = programs.bind(balanced_loss, classes_per_task=s,
                                           temperature=config.kd_temperature,
                                           weighting=e2e.kd_weighting,
                                           head_only=e2e.balanced_trains == "head")

    def end_task(self, rt, learner, state, task):
        memory = self.new_memory(rt, learner, state, task)
        if not task.is_first:
            learner = self.balanced_stage(rt, learner, state, memory, task)
        return learner, TeacherMemoryState(teacher=train.teacher_of(learner), memory=memory)

    def balanced_stage(self, rt, learner, state, memory, task):
        """The class-balanced fine-tuning on the updated memory (`--config.e2e.*`)."""
        c, e2e = self.config, self.config.e2e
        trainable = ("head",) if e2e.balanced_trains == "head" else None
        stage = train.with_optimizer(learner, programs.shared(
            train.learner_optimizer, c.lr, c.momentum, c.weight_decay, trainable))
        inputs = BalancedInputs(teacher=state.teacher, before=train.teacher_of(learner))
        stage = rt.train_stage(
            stage, inputs, self.balanced_loss, self.coreset.stored(memory),
            epochs=e2e.balanced_epochs or c.epochs, lr=c.lr * e2e.balanced_lr_scale,
            lr_milestones=() if e2e.balanced_epochs else tuple(c.lr_milestones),
            key=jax.random.fold_in(rt.method_key, 10_000 + task.index), task=task,
            name="balanced_finetuning")
        return train.with_optimizer(stage, learner.tx)
