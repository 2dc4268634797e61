"""FeTrIL (Petit et al., WACV 2023; docs/algorithm.md §11): the frozen first-task backbone,
and after every later task a classifier trained on features: the new classes' real features
and, for every past class, pseudo-features translated from the new class nearest to it
(`losses.fetril_pseudo_features`). Two classifiers:

- `fetril.classifier="linear"` (default): the PyCIL port's (`models/fetril.py`, also in
  FeCAM's repository): the network's linear head, continued from the last task's, trained
  on the features for 50 epochs (SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine
  schedule, batch 128), CE over the classes seen; the nearest new class by the cosine of
  the means is PyCIL's, by the Euclidean distance the official code's (`similarity`);
- `"svm"`: the official one (`GregoirePetit/FeTrIL`, `codes/train_classifiers.py`):
  one-vs-rest linear SVMs (scikit-learn's LinearSVC, C 1, tol 1e-4) on L2-normalised
  features, from scratch at every task, on the host.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct

from abd_jax import driver, hosts, losses, plan, rng, sampling, train
from abd_jax.methods.frozen_backbone import (PYCIL_RECIPE, FrozenBackbone, MeansState,
                                             class_features, head_shape)
from abd_jax.methods.lifecycle import Loop, Update
from abd_jax.methods.published import Published
from abd_jax.plan import Schedule, Task

CLASSIFIERS = ("linear", "svm")


@dataclasses.dataclass(frozen=True)
class FetrilOptions:
    """similarity: "euclidean" (official) or "cosine" (PyCIL); classifier: "linear" or
    "svm"; the linear head's epochs, lr and weight decay; the SVM's C and tolerance."""

    similarity: str = "euclidean"
    classifier: str = "linear"
    epochs: int = 50
    lr: float = 0.05
    weight_decay: float = 5e-4
    svm_c: float = 1.0
    svm_tol: float = 1e-4


@struct.dataclass
class FetrilState(MeansState):
    """means as `MeansState`'s; head: the linear head its stage trains; svm_kernel `[D, C]`,
    svm_bias `[C]`: the SVMs (their switch)."""

    head: train.TrainState
    svm_kernel: jax.Array
    svm_bias: jax.Array


def training_features(rt, learner, state: FetrilState, task: Task, similarity: str):
    """(features `[n, D]`, labels `[n]`) FeTrIL's classifier trains on after `task`: the task's
    real features and the past classes' pseudo-features (host numpy, a function of the frozen
    backbone and the means: a resumed stage computes them again)."""
    features, labels = class_features(rt, learner, task)
    if task.is_first:
        return features, labels
    pseudo, pseudo_labels, _ = losses.fetril_pseudo_features(
        features, labels, hosts.fetch(state.means), task.num_old, similarity)
    return np.concatenate([features, pseudo]), np.concatenate([labels, pseudo_labels])


def _head_step(batch_size: int):
    """One SGD step of a linear head on the `step`-th batch of a feature array: CE over the
    valid classes of x W + b (the stage's `TaskInfo` draws the batches and the rate)."""
    def step(state, features, labels, info):
        chosen = sampling.batch_indices(info, state.step, batch_size)
        x, y = features[chosen], labels[chosen]

        def loss_of(params):
            return losses.valid_ce_loss(x @ params["kernel"] + params["bias"], y,
                                        info.num_seen)

        loss, grads = jax.value_and_grad(loss_of)(state.params)
        lr = train.learning_rate(state.step, info, 1.0)
        return train.sgd_update(state, grads, None, lr), {"loss": loss, "lr": lr}

    return step


def _head_chunk(batch_size: int, chunk: int):
    return train.fuse_steps(_head_step(batch_size), chunk)


@dataclasses.dataclass(frozen=True)
class FeatureHeadStage(Loop):
    """The linear head trained on `training_features`: from the learner's head, with a fresh
    SGD state, written back into the learner."""

    method: "FeTrIL"
    name: str = "feature_head"
    setting: str = "fetril.lr"

    def get(self, learner, state):
        return state.head

    def put(self, learner, state, trained):
        return learner, state.replace(head=trained)

    def begin(self, rt, learner, state, task):
        head = jax.tree.map(np.copy, hosts.fetch(learner.params["head"]))
        return learner, state.replace(head=train.reset_optimizer(
            rt.session, state.head.replace(params=jax.device_put(head))))

    def program(self, rt, learner, state, task, start):
        o = self.method.options
        features, labels = training_features(rt, learner, state, task, o.similarity)
        capacity = plan.shared_capacity(len(features))
        padded_x = np.zeros((capacity, features.shape[1]), np.float32)
        padded_y = np.zeros((capacity,), np.int32)
        padded_x[:len(features)], padded_y[:len(labels)] = features, labels
        info = rt.plan.task_info(task, np.arange(len(features), dtype=np.int32),
                                 Schedule(o.epochs, o.lr, cosine=True),
                                 rng.fold_in(rt.method_key, 80_000 + task.index), capacity)
        chunk = rt.session.jitted(_head_chunk, rt.config.batch_size, rt.steps_per_call,
                                  donate_argnums=(0,))
        args = jax.device_put((padded_x, padded_y, info))
        return driver.DrivenLoop(f"task {task.index + 1} feature head",
                                 lambda s, *a: chunk(s, int(info.total_steps), *a), args,
                                 start, int(info.total_steps), rt.steps_per_call,
                                 rt.config.batch_size)

    def end(self, rt, learner, state, task):
        head = jax.tree.map(np.copy, hosts.fetch(state.head.params))
        return learner.replace(params={**learner.params, "head": jax.device_put(head)}), state


class FeTrIL(FrozenBackbone):
    name = "fetril"
    sections = ("first_task", "fetril")
    rank = 220
    row_settings = {**PYCIL_RECIPE, "head": "linear"}  # PyCIL's IncrementalNet: a linear head
    heads = ("linear",)
    sources = {"FeTrIL": "FeTrIL's README (Petit et al., WACV 2023, `GregoirePetit/FeTrIL`): "
                         "ResNet-18 at 224x224 (CIFAR-100 upsampled), LinearSVC, no class "
                         "shuffle, A_inc with the first task; CIFAR-100 B50 (B40 for 20 "
                         "steps), Tiny-ImageNet B100"}
    published = tuple(
        Published(dataset, steps + 1, mean, 0.0, "FeTrIL", metric="A_inc",
                  first_task_classes=first)
        for dataset, first, figures in (
            ("cifar100", 50, {5: 66.3, 10: 65.2}), ("cifar100", 40, {20: 61.5}),
            ("tiny_imagenet", 100, {5: 54.8, 10: 53.1, 20: 52.2}))
        for steps, mean in figures.items())

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.options = FetrilOptions(**config.fetril.to_dict())
        if self.options.classifier not in CLASSIFIERS:
            raise ValueError(f"fetril.classifier={self.options.classifier!r}: use one of "
                             f"{CLASSIFIERS} (--config.fetril.classifier)")

    def init_state(self, rt, learner):
        dim, classes = head_shape(learner)
        head = train.new_train_state(
            rt.session, None, {"params": jax.tree.map(np.copy, hosts.fetch(
                learner.params["head"]))},
            train.learner_optimizer(rt.session, self.options.lr, rt.config.momentum,
                                    self.options.weight_decay))
        return FetrilState(means=self.empty_means(rt, learner), head=head,
                           svm_kernel=np.zeros((dim, classes), np.float32),
                           svm_bias=np.zeros((classes,), np.float32))

    def end_task(self, task: Task) -> list:
        stages = super().end_task(task)
        if self.options.classifier == "svm":
            return stages + [Update("SVMs", self.fit_svms)]
        return stages if task.is_first else stages + [FeatureHeadStage(method=self)]

    def fit_svms(self, rt, learner, state, task):
        """One-vs-rest LinearSVC over the classes seen, on L2-normalised features."""
        from sklearn.svm import LinearSVC  # noqa: PLC0415 (only this switch needs it)
        o = self.options
        features, labels = training_features(rt, learner, state, task, o.similarity)
        svm = LinearSVC(C=o.svm_c, tol=o.svm_tol).fit(losses.unit_rows(features), labels)
        kernel = np.zeros_like(hosts.fetch(state.svm_kernel))
        bias = np.zeros_like(hosts.fetch(state.svm_bias))
        if len(svm.classes_) == 2:  # scikit-learn keeps one hyperplane for two classes
            kernel[:, svm.classes_[1]], bias[svm.classes_[1]] = svm.coef_[0], svm.intercept_[0]
        else:
            kernel[:, svm.classes_], bias[svm.classes_] = svm.coef_.T, svm.intercept_
        return learner, state.replace(svm_kernel=kernel, svm_bias=bias)

    def kept_statistics(self, state):
        if self.options.classifier == "svm":
            return state.means, state.svm_kernel, state.svm_bias
        return state.means

    def eval_logits(self, rt, state, logits, features, task):
        if self.options.classifier == "linear":
            return logits
        scores = losses.unit_rows(features) @ hosts.fetch(state.svm_kernel)
        scores = scores + hosts.fetch(state.svm_bias)
        return np.where(np.arange(scores.shape[1]) < task.num_seen, scores, losses.NEG_INF)
