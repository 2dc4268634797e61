"""LwF + NCM with the drift of its class means compensated, as ADC's and LDC's code run it
(`dipamgoswami/ADC`, `alviur/ldc` `LDC_supervised/`: `models/lwf.py`, `utils/attack.py`,
`models/base.py`, `exps/lwf.json`; docs/algorithm.md §13).

The first task trains with the exemplar-free recipe (`first_task`: the cosine head, CE).
Every later task trains the whole network with CE over the new classes' logits alone plus
lambda KD over the old ones (lambda 10, T 2, no T^2), at its own schedule (`lwf_ncm`: 100
epochs, lr 0.05 x0.1 at 45 and 90, weight decay 2e-4). After every task each new class keeps
its mean feature (eval mode, unaugmented); a test image goes to the nearest mean of unit
vectors (NCM), from the first task on. The old means stay where they were computed unless
`lwf_ncm.drift` moves them after each later task:

- "sdc": by the Gaussian-weighted drift of the task's images' features (sigma 0.3);
- "adc": each old class by the mean drift of up to 100 of the task's images pushed 3 steps
  towards it against the old model (step 25), those the old model then assigns to it (or,
  when none is, the unperturbed ones);
- "ldc": through a linear map (D x D, no bias) fitted with Adam (lr 1e-3, 20 epochs, batch
  128) from the old model's features of the task's images to the new model's.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
from absl import logging
from flax import struct

from abd_jax import augment, hosts, losses, rng
from abd_jax.methods.base import ce
from abd_jax.methods.frozen_backbone import (PYCIL_RECIPE, chunked_scores, first_task_schedule,
                                             head_shape)
from abd_jax.methods.lifecycle import Update
from abd_jax.methods.published import Published
from abd_jax.methods.teacher import TeacherMethod, TeacherState, freeze, freeze_teacher
from abd_jax.plan import Schedule, Task
from abd_jax.session import bind
from abd_jax.synthesis import frozen_apply
from abd_jax.train import LossContext

DRIFTS = ("none", "sdc", "adc", "ldc")


@dataclasses.dataclass(frozen=True)
class LwfNcmOptions:
    """lam, temperature: the KD's weight and T; epochs, lr, milestones, weight_decay: the later
    tasks' SGD; drift: "none", "sdc", "adc" or "ldc"; sigma: SDC's kernel width;
    adc_alpha, adc_steps, adc_samples: ADC's step size, steps and images per class;
    ldc_epochs, ldc_lr, ldc_batch_size: LDC's Adam fit."""

    lam: float = 10.0
    temperature: float = 2.0
    epochs: int = 100
    lr: float = 0.05
    milestones: tuple = (45, 90)
    weight_decay: float = 2e-4
    drift: str = "none"
    sigma: float = 0.3
    adc_alpha: float = 25.0
    adc_steps: int = 3
    adc_samples: int = 100
    ldc_epochs: int = 20
    ldc_lr: float = 1e-3
    ldc_batch_size: int = 128


@struct.dataclass
class LwfNcmState(TeacherState):
    """teacher: the model at the end of the last task; means `[C, D]`: each class's mean
    feature (raw, float32), zero until its task ends, then moved by the drift correction."""

    means: jax.Array


def lwf_local_loss(ctx: LossContext, lam: float, temperature: float):
    """CE(z[:, K_old:K_new], y - K_old) + lam KD(z[:, :K_old], teacher(x)[:, :K_old], T)."""
    logits, _, new_bs = ctx.forward(ctx.images)
    teacher = frozen_apply(ctx.model, ctx.inputs.teacher, ctx.images)[0]
    local = losses.local_ce_loss(losses.mask_logits(logits, 0, ctx.num_seen), ctx.labels,
                                 ctx.num_old)
    kd = losses.kd_loss(losses.mask_logits(logits, 0, ctx.num_old),
                        losses.mask_logits(teacher, 0, ctx.num_old), temperature)
    return local + lam * kd, new_bs, {"ce": local, "kd": kd}


def _ncm():
    return losses.ncm_scores


def _attack(model, mean: tuple, std: tuple, steps: int, alpha: float):
    """Jitted `(old, images_uint8, target_mean, low, high) -> (x, old features of x)`: ADC's
    `steps` steps on the normalised images against the old model's feature MSE to the
    target mean."""
    def attack(old, images, target, low, high):
        x = augment.normalize(images, mean, std)

        def distance(x):
            return losses.feature_mse(frozen_apply(model, old, x)[1], target[None, :])

        for _ in range(steps):
            x = losses.adversarial_step(x, jax.grad(distance)(x), alpha, low, high)
        return x, frozen_apply(model, old, x)[1]

    return attack


def _features(model):
    """Jitted `(variables, normalised images) -> features` (eval mode)."""
    return lambda variables, x: frozen_apply(model, variables, x)[1]


def _ldc_fit(lr: float):
    """Jitted `(kernel, old_features, new_features, index [S, b], weights [S, b]) -> (kernel,
    losses [S])`: Adam on `losses.linear_map_loss` over the S given batches."""
    tx = optax.adam(lr)

    def fit(kernel, old, new, index, weights):
        def step(carry, batch):
            kernel, opt = carry
            rows, w = batch
            loss, grad = jax.value_and_grad(losses.linear_map_loss)(kernel, old[rows],
                                                                   new[rows], w)
            updates, opt = tx.update(grad, opt, kernel)
            return (optax.apply_updates(kernel, updates), opt), loss

        (kernel, _), out = jax.lax.scan(step, (kernel, tx.init(kernel)), (index, weights))
        return kernel, out

    return fit


def epoch_batches(key, count: int, epochs: int, batch_size: int):
    """(index `[S, b]`, weights `[S, b]`): every epoch a permutation of `count` rows cut into
    batches of `batch_size`, the last one partial (weights 0 on its padding), as a shuffled
    PyTorch loader without `drop_last`."""
    per_epoch = -(-count // batch_size)
    index = np.zeros((epochs * per_epoch, batch_size), np.int32)
    weights = np.zeros((epochs * per_epoch, batch_size), np.float32)
    for e in range(epochs):
        order = rng.permutation(rng.fold_in(key, e), count)
        for b in range(per_epoch):
            rows = order[b * batch_size:(b + 1) * batch_size]
            index[e * per_epoch + b, :len(rows)] = rows
            weights[e * per_epoch + b, :len(rows)] = 1.0
    return index, weights


class LwFNCM(TeacherMethod):
    name = "lwf_ncm"
    sections = ("first_task", "lwf_ncm")
    tables, rank = ("exemplar_free",), 230
    variants = {f"lwf_ncm_{d}": {"lwf_ncm.drift": d} for d in ("sdc", "adc", "ldc")}
    variant_tables = ("exemplar_free",)
    row_settings = PYCIL_RECIPE
    keeps_first_task = True
    sources = {"LDC": "LDC's Table 1 (Gomez-Villa et al., ECCV 2024), as the field's tables "
                      "quote it (second-hand): CIFAR-100, 10 tasks of 10 from scratch, "
                      "ResNet-18, LwF + NCM 40.5 A_N / 56.2 A_inc"}
    published = (Published("cifar100", 10, 56.2, 0.0, "LDC", metric="A_inc"),)

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.options = o = LwfNcmOptions(**{**config.lwf_ncm.to_dict(), "milestones": tuple(
            config.lwf_ncm.milestones)})
        if o.drift not in DRIFTS:
            raise ValueError(f"lwf_ncm.drift={o.drift!r}: use one of {DRIFTS} "
                             "(--config.lwf_ncm.drift)")
        self.mean, self.std = self.input_stats(spec)
        self.first_task_loss = ce
        self.distill_loss = bind(lwf_local_loss, lam=o.lam, temperature=o.temperature)

    def schedule(self, config, task: Task) -> Schedule:
        if task.is_first:
            return first_task_schedule(config)
        o = self.options
        return Schedule(o.epochs, o.lr, o.milestones, weight_decay=o.weight_decay)

    def weight_decay(self, config) -> float:
        return config.first_task.weight_decay  # the later tasks': their schedule's

    def init_state(self, rt, learner):
        dim, classes = head_shape(learner)
        return LwfNcmState(teacher=freeze(learner), means=np.zeros((classes, dim), np.float32))

    def end_task(self, task: Task) -> list:
        return [Update("class means", self.update_means), Update("teacher", freeze_teacher)]

    def update_means(self, rt, learner, state, task: Task):
        """The old means moved by the drift correction (after a later task), then the new
        classes' means."""
        index = rt.plan.task_indices(task.index)
        labels = rt.plan.train_labels[index]
        new = rt.services.predict_train(learner, index)[1]
        means = hosts.fetch(state.means).copy()
        if not task.is_first and self.options.drift != "none":
            old = rt.services.predict_train(state.teacher, index)[1]
            means[:task.num_old] = getattr(self, f"_{self.options.drift}")(
                rt, learner, state, task, index, old, new, means[:task.num_old])
        for c in range(task.num_old, task.num_seen):
            means[c] = new[labels == c].mean(axis=0)
        return learner, state.replace(means=means)

    def _sdc(self, rt, learner, state, task, index, old, new, means):
        return means + losses.sdc_drift(old, new, means, self.options.sigma)

    def _ldc(self, rt, learner, state, task, index, old, new, means):
        o = self.options
        dim = old.shape[1]
        kernel = rng.linear_init(rng.fold_in(rt.method_key, 96_000 + task.index), dim,
                                 (dim, dim))
        batches = epoch_batches(rng.fold_in(rt.method_key, 96_500 + task.index), len(old),
                                o.ldc_epochs, o.ldc_batch_size)
        kernel, fit_losses = rt.session.jitted(_ldc_fit, o.ldc_lr)(
            *jax.device_put((kernel.astype(np.float32), old, new, *batches)))
        kernel, fit_losses = hosts.fetch((kernel, fit_losses))
        logging.info("task %d LDC: map fitted, MSE %.4g -> %.4g", task.index + 1,
                     fit_losses[0], fit_losses[-1])
        rt.services.log(task.index + 1, {"ldc_mse": float(fit_losses[-1])}, task=task.index + 1,
                        phase="drift")
        return means @ kernel.T

    def _adc(self, rt, learner, state, task, index, old, new, means):
        """Class by class, as the code: the NCM check uses the old means as moved so far."""
        o = self.options
        images = rt.services.train_images(index)
        normalised = hosts.fetch(augment.normalize(jax.device_put(images), self.mean,
                                                   self.std))
        low, high = normalised.min(), normalised.max()
        attack = rt.session.jitted(_attack, rt.model, tuple(self.mean), tuple(self.std),
                                   o.adc_steps, o.adc_alpha)
        features = rt.session.jitted(_features, rt.model)
        means = means.copy()
        fallbacks = 0
        for c in range(len(means)):
            nearest = np.argsort(((old - means[c]) ** 2).sum(-1), kind="stable")[:o.adc_samples]
            x, x_old = hosts.fetch(attack(state.teacher, jax.device_put(images[nearest]),
                                          jax.device_put(means[c]), low, high))
            assigned = np.argmin(((x_old[:, None] - means[None]) ** 2).sum(-1), axis=1) == c
            if assigned.any():
                x = x[assigned]
            else:  # the code's fallback: the unperturbed images
                fallbacks += 1
                x = normalised[nearest]
            x = jax.device_put(x)
            drift = hosts.fetch(features(learner, x)) - hosts.fetch(features(state.teacher, x))
            means[c] = means[c] + drift.mean(axis=0)
        logging.info("task %d ADC: %d of %d old classes fell back to unperturbed images",
                     task.index + 1, fallbacks, len(means))
        rt.services.log(task.index + 1, {"adc_fallbacks": fallbacks}, task=task.index + 1,
                        phase="drift")
        return means

    def memory_footprint(self, rt, state) -> dict:
        """The classifier, the teacher (as LwF) and the class means."""
        means = int(np.prod(state.means.shape))
        return {**super().memory_footprint(rt, state), "statistics_values": means}

    def eval_logits(self, rt, state, logits, features, task):
        return chunked_scores(rt, (_ncm,), features, state.means, task.num_seen)


__all__ = ["LwFNCM", "LwfNcmOptions", "LwfNcmState", "lwf_local_loss", "epoch_batches"]
