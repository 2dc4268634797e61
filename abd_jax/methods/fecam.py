"""FeCAM (Goswami et al., NeurIPS 2023) as its official code runs it (`dipamgoswami/FeCAM`,
`models/fecam.py`, `models/base.py`, `utils/maha_utils.py`; docs/algorithm.md §11): the
frozen first-task backbone, and per class its mean feature and the covariance of its
Tukey-transformed features, shrunk twice and normalised to a correlation; a test image goes
to the class of the smallest Mahalanobis distance (`losses.fecam_scores`). The covariances
are computed on the host in float64; the distances on device, all classes at once, in
chunks of test images. After the first task the cosine classifier scores, as in the code.
`--config.fecam.shared_covariance=True` gives the one-shared-covariance row."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct

from abd_jax import hosts, losses
from abd_jax.methods.frozen_backbone import (PYCIL_RECIPE, FrozenBackbone, MeansState,
                                             chunked_scores, head_shape)
from abd_jax.methods.ncm import FECAM_TABLE_1, warm_start


@dataclasses.dataclass(frozen=True)
class FecamOptions:
    """beta: Tukey's exponent (0: log); alpha1, alpha2: the shrinkage of the diagonal and
    the off-diagonal; shrinks: how often (the code: twice); normalize: to a correlation;
    shared_covariance: one covariance for all classes, the tasks' weighted by their classes
    (the code's `per_class: false`: no correlation, the first task's not shrunk)."""

    beta: float = 0.5
    alpha1: float = 1.0
    alpha2: float = 1.0
    shrinks: int = 2
    normalize: bool = True
    shared_covariance: bool = False


@struct.dataclass
class FecamState(MeansState):
    """means as `MeansState`'s; precisions `[C, D, D]`: each class's pseudo-inverse covariance
    (float32); shared `[D, D]`: the one shared covariance (its switch)."""

    precisions: jax.Array
    shared: jax.Array


def _fecam(beta: float):
    return lambda features, means, precisions, num_seen: losses.fecam_scores(
        features, means, precisions, beta, num_seen)


class FeCAM(FrozenBackbone):
    name = "fecam"
    sections = ("first_task", "fecam")
    rank = 210
    row_settings = PYCIL_RECIPE
    sources = {"FeCAM": FECAM_TABLE_1}
    published = (warm_start("cifar100", 50, {5: 70.9, 10: 70.8, 20: 69.4})
                 + warm_start("tiny_imagenet", 100, {5: 59.6, 10: 59.4, 20: 59.3}))

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.options = FecamOptions(**config.fecam.to_dict())

    def init_state(self, rt, learner):
        dim, classes = head_shape(learner)
        return FecamState(means=self.empty_means(rt, learner),
                          precisions=np.zeros((classes, dim, dim), np.float32),
                          shared=np.zeros((dim, dim), np.float32))

    def statistics(self, rt, state, features, labels, task):
        """The new classes' precisions (per class), or the shared covariance's update:
        `K_old / K_new` of the old one plus the rest of the task's (shrunk after the first)."""
        o = self.options
        g = losses.tukey(np.asarray(features, np.float64), o.beta)
        if o.shared_covariance:
            cov = losses.class_covariance(g)
            if not task.is_first:
                cov = losses.shrink_covariance(cov, o.alpha1, o.alpha2)
            ratio = task.num_old / task.num_seen
            shared = ratio * hosts.fetch(state.shared).astype(np.float64) + (1 - ratio) * cov
            return state.replace(shared=shared.astype(np.float32))
        precisions = hosts.fetch(state.precisions).copy()
        for c in range(task.num_old, task.num_seen):
            precisions[c] = losses.fecam_precision(g[labels == c], o.alpha1, o.alpha2,
                                                   o.shrinks, o.normalize)
        return state.replace(precisions=precisions)

    def kept_statistics(self, state):
        covariances = state.shared if self.options.shared_covariance else state.precisions
        return state.means, covariances

    def eval_logits(self, rt, state, logits, features, task):
        if task.is_first:
            return logits
        precisions = state.precisions
        if self.options.shared_covariance:
            shared = np.linalg.pinv(hosts.fetch(state.shared).astype(np.float64))
            precisions = np.broadcast_to(shared.astype(np.float32),
                                         hosts.fetch(state.precisions).shape)
        return chunked_scores(rt, (_fecam, self.options.beta), features, state.means,
                              precisions, task.num_seen)
