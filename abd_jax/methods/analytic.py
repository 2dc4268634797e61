"""ACIL (Zhuang et al., NeurIPS 2022) and DS-AL (Zhuang et al., AAAI 2024) as their official
code runs them (`ZHUANGHP/Analytic-continual-learning`, `analytic/ACIL.py`, `analytic/DSAL.py`,
`analytic/AnalyticLinear.py`'s `RecursiveLinear`, `analytic/Buffer.py`'s `RandomBuffer`;
docs/algorithm.md §12): the frozen first-task backbone, a random expansion of its features
and a ridge regression over every image seen, updated batch by batch in float64
(`losses.recursive_ridge`) after every task, the first included ("re-align"): the first
task too is scored by the analytic head. DS-AL adds a compensation stream (tanh of the same
projection) fitted to the main stream's residual on the task's own classes, scored with
weight `compensation`.

The float64 arrays live in the state as their bits (uint32, two per value), so that the
run's float32 device placement and checkpoints keep them exact; `analytic.compute` runs the
updates and scores on the host (NumPy) or on device (jitted under `jax.enable_x64`)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct

from abd_jax import hosts, losses, rng
from abd_jax.methods.frozen_backbone import (PYCIL_RECIPE, FrozenBackbone, class_features,
                                             head_shape)
from abd_jax.methods.lifecycle import Update
from abd_jax.methods.published import Published
from abd_jax.plan import Task

COMPUTE = ("host", "device")
README = ("the official README (`ZHUANGHP/Analytic-continual-learning`): CIFAR-100, "
          "ResNet-32, B50 + 25 phases of 2 classes, TrivialAugment on the first task, "
          "A_inc with the first phase; the code's numbers, which it says run 2-5 points "
          "above the papers'")


@dataclasses.dataclass(frozen=True)
class AnalyticOptions:
    """expansion: E, the random expansion's width; gamma: the ridge of both streams' R_0 =
    I / gamma (the scripts' 0.1; `gamma_comp` for DS-AL's second stream); batch_size: the
    images per recursive update (the code's IL batch size); compensation: DS-AL's C;
    compute: "host" or "device"."""

    expansion: int = 8192
    gamma: float = 0.1
    gamma_comp: float = 0.1
    batch_size: int = 4096
    compensation: float = 0.6
    compute: str = "host"


@struct.dataclass
class AnalyticState:
    """Float64 arrays as their bits (`as_bits`): projection `[D, E]` (A), r `[E, E]` and
    w `[E, C]` (the main stream's R and W), r_comp and w_comp (DS-AL's compensation stream;
    empty for ACIL); width `[]` int32: the targets' width so far (DS-AL's cleansing)."""

    projection: jax.Array
    r: jax.Array
    w: jax.Array
    r_comp: jax.Array
    w_comp: jax.Array
    width: jax.Array


def as_bits(x: np.ndarray) -> np.ndarray:
    """float64 `[..., n]` -> its bits, uint32 `[..., 2n]` (exact)."""
    return np.ascontiguousarray(x, np.float64).view(np.uint32)


def from_bits(bits) -> np.ndarray:
    """`as_bits`'s inverse (host numpy float64)."""
    return np.ascontiguousarray(hosts.fetch(bits), np.uint32).view(np.float64)


def random_projection(key, dim: int, width: int) -> np.ndarray:
    """A `[D, E]` float64: the code's `RandomBuffer`, PyTorch's default `Linear`
    initialisation (`rng.linear_init`), drawn from `key`."""
    return rng.linear_init(key, dim, (dim, width))


def fit_batch(arrays: dict, features, targets, cleansed, dual: bool) -> dict:
    """One batch of the analytic phase: the main stream's `recursive_ridge` on relu(F A) and
    one-hot targets; with `dual` (DS-AL), the compensation stream's on tanh(F A) and the main
    stream's `cleansed_residual` (`cleansed` columns cleared). NumPy or JAX arrays."""
    out = dict(arrays)
    x = losses.expand(features, arrays["projection"], "relu")
    out["r"], out["w"] = losses.recursive_ridge(arrays["r"], arrays["w"], x, targets)
    if dual:
        residual = losses.cleansed_residual(targets, x @ out["w"], cleansed)
        out["r_comp"], out["w_comp"] = losses.recursive_ridge(
            arrays["r_comp"], arrays["w_comp"],
            losses.expand(features, arrays["projection"], "tanh"), residual)
    return out


def scores(arrays: dict, features, compensation: float, dual: bool):
    """relu(F A) W (+ C tanh(F A) W_comp for DS-AL), `[n, C]`."""
    out = losses.expand(features, arrays["projection"], "relu") @ arrays["w"]
    if dual:
        out = out + compensation * (losses.expand(features, arrays["projection"], "tanh")
                                    @ arrays["w_comp"])
    return out


def _jitted_fit(dual: bool):
    return lambda arrays, features, targets, cleansed: fit_batch(arrays, features, targets,
                                                                 cleansed, dual)


def _jitted_scores(dual: bool, compensation: float):
    return lambda arrays, features: scores(arrays, features, compensation, dual)


class ACIL(FrozenBackbone):
    """ACIL; `DSAL` adds the compensation stream."""

    name = "acil"
    sections = ("first_task", "analytic")
    rank = 240
    dual = False
    row_settings = {**PYCIL_RECIPE, "head": "linear"}  # the code's plain Linear first head
    sources = {"ACIL README": README}
    published = (Published("cifar100", 26, 71.05, 0.0, "ACIL README", metric="A_inc",
                           first_task_classes=50),)

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.options = AnalyticOptions(**config.analytic.to_dict())
        if self.options.compute not in COMPUTE:
            raise ValueError(f"analytic.compute={self.options.compute!r}: use one of "
                             f"{COMPUTE} (--config.analytic.compute)")

    def init_state(self, rt, learner):
        (dim, classes), e = head_shape(learner), self.options.expansion
        stream = lambda gamma: (as_bits(np.eye(e) / gamma), as_bits(np.zeros((e, classes))))
        r, w = stream(self.options.gamma)
        r_comp, w_comp = (stream(self.options.gamma_comp) if self.dual
                          else (np.zeros((0, 0), np.uint32),) * 2)
        projection = random_projection(rng.fold_in(rt.method_key, 95_000), dim, e)
        return AnalyticState(projection=as_bits(projection), r=r, w=w, r_comp=r_comp,
                             w_comp=w_comp, width=np.int32(0))

    def end_task(self, task: Task) -> list:
        return [Update("analytic fit", self.fit)]

    def _arrays(self, state, names=("projection", "r", "w", "r_comp", "w_comp")) -> dict:
        """The state's float64 arrays `names` (DS-AL's streams only for DS-AL)."""
        return {n: from_bits(getattr(state, n)) for n in names
                if self.dual or not n.endswith("_comp")}

    def fit(self, rt, learner, state, task: Task):
        """The task's training images (eval mode, unaugmented), in random batches of
        `batch_size`, through `fit_batch`; the targets' width grows with the largest label
        seen, and the columns left of the task's newest are cleansed (the code's rule)."""
        o = self.options
        features, labels = class_features(rt, learner, task)
        order = rng.permutation(rng.fold_in(rt.method_key, 95_001 + task.index), len(labels))
        arrays, width = self._arrays(state), int(hosts.fetch(state.width))
        classes = arrays["w"].shape[1]
        update = fit_batch
        if o.compute == "device":
            update = rt.session.jitted(_jitted_fit, self.dual)
        for start in range(0, len(order), o.batch_size):
            batch = order[start:start + o.batch_size]
            width = max(width, int(labels[batch].max()) + 1)
            targets = np.eye(classes)[labels[batch]]
            cleansed = width - (task.num_seen - task.num_old)  # all but the newest columns
            if o.compute == "host":
                arrays = fit_batch(arrays, features[batch].astype(np.float64), targets,
                                   cleansed, self.dual)
            else:
                with jax.enable_x64(True):
                    arrays = jax.device_get(update(
                        jax.device_put(arrays), jax.device_put(features[batch].astype(
                            np.float64)), jax.device_put(targets), jax.device_put(cleansed)))
        if not np.isfinite(arrays["w"]).all():
            raise FloatingPointError("the analytic head is not finite: raise "
                                     "--config.analytic.gamma")
        stored = {n: as_bits(np.asarray(v)) for n, v in arrays.items() if n != "projection"}
        return learner, state.replace(**stored, width=np.int32(width))

    def kept_statistics(self, state):
        return state.projection, state.r, state.w, state.r_comp, state.w_comp

    def eval_logits(self, rt, state, logits, features, task):
        o = self.options
        arrays = self._arrays(state, ("projection", "w", "w_comp"))  # (not the E x E R's)
        features = np.asarray(features, np.float64)
        if o.compute == "host":
            out = scores(arrays, features, o.compensation, self.dual)
        else:
            score = rt.session.jitted(_jitted_scores, self.dual, o.compensation)
            with jax.enable_x64(True):
                out = jax.device_get(score(jax.device_put(arrays), jax.device_put(features)))
        out = np.asarray(out, np.float32)
        return np.where(np.arange(out.shape[1]) < task.num_seen, out, losses.NEG_INF)


class DSAL(ACIL):
    name = "dsal"
    rank = 250
    dual = True
    sources = {"DS-AL README": README}
    published = (Published("cifar100", 26, 71.28, 0.0, "DS-AL README", metric="A_inc",
                           first_task_classes=50),)


__all__ = ["ACIL", "DSAL", "AnalyticOptions", "AnalyticState", "as_bits", "from_bits",
           "fit_batch", "scores", "random_projection"]
