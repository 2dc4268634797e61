"""Base (fine-tuning on each new task) and the Upper bound (retrain on everything seen)."""
from __future__ import annotations

from abd_jax import losses
from abd_jax.methods.lifecycle import Method
from abd_jax.methods.published import abd_table
from abd_jax.plan import Task
from abd_jax.train import LossContext


def ce(ctx: LossContext):
    """CE over the valid logits `[0, K_new)` on the real batch (docs/algorithm.md §6, Base)."""
    logits, _, new_bs = ctx.forward(ctx.images)
    loss = losses.valid_ce_loss(logits, ctx.labels, ctx.num_seen)
    return loss, new_bs, {"ce": loss}


class Base(Method):
    name = "base"
    tables, rank = ("methods", "data_free"), 10
    published = abd_table((16.4, 0.4), (8.8, 0.1), (4.4, 0.3))

    def loss_fn(self, task: Task):
        return ce


class UpperBound(Base):
    """For each task a freshly initialised model trained on all classes seen so far."""

    name = "upper_bound"
    tables, rank = ("methods", "data_free", "coreset", "exemplar_free"), 0
    published = abd_table((69.9, 0.2), (69.9, 0.2), (69.9, 0.2))

    def index_capacity(self, rt):
        return len(rt.plan.seen_indices(rt.plan.num_tasks - 1))

    def begin_task(self, rt, learner, state, task):
        if task.is_first:
            return super().begin_task(rt, learner, state, task)
        return rt.services.fresh_learner(task.index), state

    def train_index(self, rt, state, task):
        return rt.plan.seen_indices(task.index)
