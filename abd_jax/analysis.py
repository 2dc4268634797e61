"""The paper's feature-space diagnostics (Section 5, Appendices B and C): how far synthetic
replay is from the real data it stands for, in the penultimate features of the model after
task T.

- MID (docs/algorithm.md §7): `|| (mu_ref - mu_X) / sd_ref ||_2`, mean feature vectors `mu` and
  the reference sample's per-feature std `sd_ref`.
- MMD (Appendix B): the unbiased estimate of MMD^2 with a Gaussian kernel
  `k(a, b) = exp(-||a - b||^2 / (2 s^2))`, `s` the median pairwise distance of the pooled
  sample.

`feature_sets` loads a run's checkpoints (kept with `--config.keep_task_checkpoints=True`) and
returns the three feature sets the paper compares: real task 1, real task T and synthetic
task 1 (the generator the learner replayed from during task T).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Optional

import jax
import ml_collections
import numpy as np

from abd_jax import checkpoint as ckpt_lib
from abd_jax import data as data_lib
from abd_jax import augment, experiment, methods, rng, train
from abd_jax.methods.lifecycle import Runtime, new_learner
from abd_jax.methods.synthetic_replay import SyntheticReplay
from abd_jax.methods.teacher import freeze
from abd_jax.plan import RunPlan
from abd_jax.session import Session
from abd_jax.synthesis import frozen_apply

EPS = 1e-8


def mean_image_distance(reference: np.ndarray, sample: np.ndarray) -> float:
    """MID of `sample [M, D]` from `reference [N, D]`: `||(mu_ref - mu_X) / sd_ref||_2`
    (a feature the reference never varies, `sd_ref = 0`, is divided by `EPS`)."""
    reference, sample = np.asarray(reference, np.float64), np.asarray(sample, np.float64)
    sd = reference.std(axis=0)
    return float(np.linalg.norm((reference.mean(axis=0) - sample.mean(axis=0))
                                / np.maximum(sd, EPS)))


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def median_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
    """The median distance between distinct points of the pooled sample `[x; y]`."""
    pooled = np.concatenate([x, y]).astype(np.float64)
    d = np.sqrt(_sq_distances(pooled, pooled))
    return float(np.median(d[np.triu_indices(len(pooled), 1)]))


def gaussian_mmd2(x: np.ndarray, y: np.ndarray, bandwidth: Optional[float] = None) -> float:
    """Unbiased MMD^2 of `x [M, D]` and `y [N, D]` (M, N >= 2):
    `mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)`
    (can be slightly negative when the two samples come from one distribution)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    s = median_bandwidth(x, y) if bandwidth is None else bandwidth
    k = lambda a, b: np.exp(-_sq_distances(a, b) / (2.0 * max(s, EPS) ** 2))
    m, n = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    within = lambda kk, c: (kk.sum() - np.trace(kk)) / (c * (c - 1))
    return float(within(kxx, m) + within(kyy, n) - 2.0 * k(x, y).mean())


def compare(real_first: np.ndarray, real_current: np.ndarray,
            synthetic_first: np.ndarray) -> dict:
    """The paper's two pairs, each measured from real task 1: against real task T (how far
    apart two real tasks are) and against synthetic task 1 (the replay's domain gap)."""
    pairs = {"real1_vs_realT": real_current, "real1_vs_synthetic1": synthetic_first}
    return {name: {"mid": mean_image_distance(real_first, other),
                   "mmd2": gaussian_mmd2(real_first, other)} for name, other in pairs.items()}


@dataclasses.dataclass
class FeatureSets:
    """Penultimate features `[n, D]` of the model after task `task` (1-based)."""

    method: str
    task: int
    real_first: np.ndarray
    real_current: np.ndarray
    synthetic_first: np.ndarray


def run_folder(workdir: pathlib.Path, repeat: int = 0) -> pathlib.Path:
    """The folder of `workdir`'s run holding `repeat`: `workdir` itself, or for a table cell
    run in processes (`run_table.py --parallel`) its `repeat_<repeat>/`."""
    workdir = pathlib.Path(workdir)
    if (workdir / "config.json").exists():
        return workdir
    if (workdir / f"repeat_{repeat}" / "config.json").exists():
        return workdir / f"repeat_{repeat}"
    raise FileNotFoundError(f"{workdir} holds no run of repeat {repeat} (no config.json, "
                            f"nor repeat_{repeat}/config.json); pass the --workdir of a run "
                            "made with abd_jax.main or of a run_table.py cell")


def load_config(workdir: pathlib.Path, repeat: int = 0) -> ml_collections.ConfigDict:
    path = run_folder(workdir, repeat) / "config.json"
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def feature_sets(workdir: pathlib.Path, task: int = 2, repeat: int = 0, split: str = "test",
                 max_per_set: int = 1000, seed: int = 0,
                 session: Optional[Session] = None) -> FeatureSets:
    """Features of real task 1, real task `task` (`split` images, at most `max_per_set` each)
    and as many synthetic task-1 images, from the checkpoints at the ends of tasks `task - 1`
    (the generator replayed during task `task`) and `task` (the model)."""
    if session is None:
        with Session() as own:
            return feature_sets(workdir, task, repeat, split, max_per_set, seed, own)
    workdir = run_folder(workdir, repeat)
    config = load_config(workdir)
    if not 2 <= task <= config.num_tasks:
        raise ValueError(f"task must be in [2, {config.num_tasks}] (the model after task T is "
                         f"compared with the replay it learned from), got {task}")
    splits = experiment.load_splits(config, session)
    spec = data_lib.classes_in_use(splits.spec, config.num_classes)
    method = methods.get_method(config, spec)
    if not isinstance(method, SyntheticReplay):
        raise ValueError(f"method {config.method!r} replays no generator; the diagnostics "
                         "compare synthetic with real data (use abd, deepinversion or "
                         "lwf_synthetic)")
    plan = RunPlan.create(config, splits.spec.num_classes, splits.train_labels,
                          splits.test_labels, repeat)
    model = method.classifier(spec.num_classes)
    rt = Runtime(config=config, plan=plan, model=model,
                 mesh=experiment.make_mesh(config.num_devices), image_shape=spec.image_shape,
                 steps_per_call=1, method_key=plan.method_key, session=session)
    learner = new_learner(rt, method, plan.init_key, train.learner_optimizer(
        session, config.lr, config.momentum, method.weight_decay(config)))
    template = {"state": learner, "method": method.init_state(rt, learner)}
    checkpointer = ckpt_lib.RunCheckpointer(workdir / "checkpoints" / f"repeat_{repeat}")
    try:
        model_tree, _ = checkpointer.restore_at(task, 0, template)
        replay_tree, _ = checkpointer.restore_at(task - 1, 0, template)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}. Rerun with --config.keep_task_checkpoints=True to "
                                "keep every finished task's checkpoint") from None
    finally:
        checkpointer.close()
    trained = freeze(model_tree["state"])
    images = splits.test_images if split == "test" else splits.train_images
    labels = plan.test_labels if split == "test" else plan.train_labels
    rand = np.random.RandomState(seed)

    def real(t: int) -> np.ndarray:
        lo, hi = plan.bounds[t]
        idx = np.flatnonzero((labels >= lo) & (labels < hi))
        if len(idx) > max_per_set:
            idx = np.sort(rand.choice(idx, max_per_set, replace=False))
        return np.asarray(augment.normalize(images[idx], spec.mean, spec.std))

    real_first, real_current = real(0), real(task - 1)
    synthetic, _ = method.synthesizer(rt).labelled_samples(
        replay_tree["method"].generator, replay_tree["method"].teacher, plan.bounds[task - 2][1],
        rng.key(seed), len(real_first))
    features = jax.jit(lambda x: frozen_apply(model, trained, x)[1])

    def featurize(x: np.ndarray, batch: int = 500) -> np.ndarray:
        return np.concatenate([np.asarray(features(x[i:i + batch]), np.float32)
                               for i in range(0, len(x), batch)])

    return FeatureSets(config.method, task, featurize(real_first), featurize(real_current),
                       featurize(synthetic))
