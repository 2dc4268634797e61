"""Class-incremental metrics and result reporting (docs/algorithm.md §7).

Accuracies are percentages in [0, 100]. ``R[i][j]`` is the accuracy on task j's test set
after learning task i (0-based here), so only the lower triangle ``j <= i`` is meaningful;
entries not (yet) measured are NaN in arrays and ``None`` in JSON.

    A_i   = mean_{j<=i} R[i][j]
    A_N   = A at the last task                (last accuracy)
    A_inc = (1/N) sum_i A_i, i = 1..N        (average incremental accuracy, task 1 included)
    Omega = (1/N) sum_i A_i / A_UB_i      (A_UB: the upper bound's A)
    F_N   = mean_{j<N-1} (max_{j<=l<N-1} R[l][j] - R[N-1][j])   (Chaudhry et al. 2018)

Pure numpy; reporting (files, plots, logs) is `abd_jax.reporting`'s.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def _as_matrix(R) -> np.ndarray:
    """Square float array [N, N] from an array or list of lists (``None`` -> NaN)."""
    R = np.array(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"accuracy matrix must be square [N, N], got shape {R.shape}")
    return R


def json_safe(x: Any) -> Any:
    """Recursively convert numpy types to Python and non-finite floats to ``None``."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def average_accuracy(R) -> np.ndarray:
    """Per-task average accuracy A [N] from R [N, N]: ``A_i = mean_{j<=i} R[i][j]``.

    Entries above the diagonal are ignored; a row with an unmeasured (NaN) entry on or
    below the diagonal gives ``A_i = NaN``.
    """
    R = _as_matrix(R)
    n = R.shape[0]
    lower = np.tril(np.ones((n, n), dtype=bool))
    return np.where(lower, R, 0.0).sum(axis=1) / np.arange(1, n + 1)


def final_accuracy(R) -> float:
    """Final accuracy ``A_N`` (last entry of :func:`average_accuracy`)."""
    return float(average_accuracy(R)[-1])


def average_incremental_accuracy(R) -> float:
    """``A_inc = mean_i A_i`` over every task, the first included (iCaRL's "average
    incremental accuracy"; the exemplar-free papers' headline)."""
    return float(np.mean(average_accuracy(R)))


def average_forgetting(R) -> float:
    """Chaudhry et al.'s average forgetting after the last task, F_N = mean over the tasks
    j < N - 1 of (the best accuracy on j after any earlier task l >= j) - (the accuracy on
    j now); NaN with a single task."""
    R = _as_matrix(R)
    n = R.shape[0]
    if n < 2:
        return float("nan")
    drops = [np.max(R[j:n - 1, j]) - R[n - 1, j] for j in range(n - 1)]
    return float(np.mean(drops))


def omega(A, A_upper) -> float:
    """``Omega = (1/N) sum_i A_i / A_UB_i`` for A, A_upper of equal length N."""
    A = np.asarray(A, dtype=float)
    A_upper = np.asarray(A_upper, dtype=float)
    if A.ndim != 1 or A.shape != A_upper.shape:
        raise ValueError(f"omega needs two 1-D sequences of equal length, "
                         f"got shapes {A.shape} and {A_upper.shape}")
    return float(np.mean(A / A_upper))


class AccuracyMatrix:
    """Global (class-incremental), local (task-incremental) and global top-5 accuracy
    matrices.

    ``global_acc``, ``local_acc`` and ``top5_acc`` are float arrays [N, N], NaN where not
    yet measured.
    """

    def __init__(self, num_tasks: int):
        self.global_acc = np.full((num_tasks, num_tasks), np.nan)
        self.local_acc = np.full((num_tasks, num_tasks), np.nan)
        self.top5_acc = np.full((num_tasks, num_tasks), np.nan)

    @property
    def num_tasks(self) -> int:
        return self.global_acc.shape[0]

    def record(self, task_i: int, task_j: int, global_acc: float, local_acc: float,
               top5_acc: float = np.nan) -> None:
        """Store the accuracies on task ``task_j`` after learning task ``task_i`` (0-based)."""
        if not 0 <= task_j <= task_i < self.num_tasks:
            raise ValueError(f"need 0 <= task_j <= task_i < {self.num_tasks}, "
                             f"got task_i={task_i}, task_j={task_j}")
        self.global_acc[task_i, task_j] = float(global_acc)
        self.local_acc[task_i, task_j] = float(local_acc)
        self.top5_acc[task_i, task_j] = float(top5_acc)

    def to_dict(self) -> dict:
        """JSON-safe ``{"R_global", "R_local", "R_global_top5": [[...]]}``, NaN -> None."""
        return {"R_global": json_safe(self.global_acc), "R_local": json_safe(self.local_acc),
                "R_global_top5": json_safe(self.top5_acc)}

    @classmethod
    def from_dict(cls, d: dict) -> "AccuracyMatrix":
        """Inverse of :meth:`to_dict` (top-5 NaN when absent: runs older than it)."""
        g, l = _as_matrix(d["R_global"]), _as_matrix(d["R_local"])
        if g.shape != l.shape:
            raise ValueError(f"R_global {g.shape} and R_local {l.shape} differ in shape")
        m = cls(g.shape[0])
        m.global_acc, m.local_acc = g, l
        if d.get("R_global_top5") is not None:
            m.top5_acc = _as_matrix(d["R_global_top5"])
        return m


def summarize_repeats(values) -> dict:
    """``{"mean", "std", "n"}`` over repeats; std is the population std (numpy ddof=0),
    so a single repeat has std 0."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("summarize_repeats needs a non-empty 1-D list of values")
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def _summarize_per_task(rows) -> dict:
    """``{"mean": [N], "std": [N]}`` over repeats of per-task values [repeats, N] (ddof=0)."""
    a = np.asarray(rows, dtype=float)
    return {"mean": a.mean(axis=0).tolist(), "std": a.std(axis=0).tolist()}


def build_results(run_results: list[dict], upper_bound: dict | None = None) -> dict:
    """Machine-readable results over repeats.

    Each run result has ``seed``, ``class_order``, ``R_global``/``R_local`` [N][N] (None =
    unmeasured), ``train_seconds_per_batch``, ``task_wall_seconds`` [N], ``peak_memory_bytes``
    (int or None) and optionally ``memory`` (see :func:`memory_totals`; with a memory,
    ``distinct_stored_images`` [N]). ``upper_bound`` is
    any dict with ``A_mean`` [N] (e.g. an earlier output of this function); if given, Omega
    is computed per repeat against it.

    Returns ``{"num_tasks", "num_repeats", "repeats": [...], "aggregate": {...}, "A_mean": [N]}``
    where each repeat adds ``A_global``, ``A_local``, ``final_accuracy``,
    ``final_local_accuracy``, ``average_incremental_accuracy``, ``forgetting`` (F_N of the global accuracies; None with one
    task) (and ``omega``), and ``aggregate`` holds mean/std over repeats.
    """
    if not run_results:
        raise ValueError("build_results needs at least one run result")
    A_ub = None if upper_bound is None else np.asarray(upper_bound["A_mean"], dtype=float)

    repeats, A_g, A_l, walls = [], [], [], []
    for run in run_results:
        Rg, Rl = _as_matrix(run["R_global"]), _as_matrix(run["R_local"])
        if A_g and Rg.shape[0] != len(A_g[0]):
            raise ValueError(f"repeats disagree on the number of tasks: "
                             f"{Rg.shape[0]} vs {len(A_g[0])}")
        a_g, a_l = average_accuracy(Rg), average_accuracy(Rl)
        top5 = run.get("R_global_top5")
        rep = {
            "seed": run["seed"],
            "class_order": list(run["class_order"]),
            "R_global": Rg, "R_local": Rl,
            "A_global": a_g, "A_local": a_l,
            "final_accuracy": a_g[-1], "final_local_accuracy": a_l[-1],
            "average_incremental_accuracy": float(np.mean(a_g)),
            "forgetting": average_forgetting(Rg),
            "train_seconds_per_batch": run["train_seconds_per_batch"],
            "task_wall_seconds": list(run["task_wall_seconds"]),
            "peak_memory_bytes": run.get("peak_memory_bytes"),
        }
        if top5 is not None:
            a_5 = average_accuracy(_as_matrix(top5))
            rep.update(R_global_top5=_as_matrix(top5), A_global_top5=a_5,
                       final_top5_accuracy=a_5[-1])
        if run.get("memory") is not None:
            rep["memory"] = dict(run["memory"])
        if A_ub is not None:
            rep["omega"] = omega(a_g, A_ub)
        repeats.append(rep)
        A_g.append(a_g)
        A_l.append(a_l)
        walls.append(run["task_wall_seconds"])

    per_task_g = _summarize_per_task(A_g)
    peaks = [r["peak_memory_bytes"] for r in repeats if r["peak_memory_bytes"] is not None]
    aggregate = {
        "final_accuracy": summarize_repeats([r["final_accuracy"] for r in repeats]),
        "final_local_accuracy": summarize_repeats([r["final_local_accuracy"] for r in repeats]),
        "average_incremental_accuracy": summarize_repeats(
            [r["average_incremental_accuracy"] for r in repeats]),
        "forgetting": summarize_repeats([r["forgetting"] for r in repeats]),
        "A_global": per_task_g,
        "A_local": _summarize_per_task(A_l),
        "train_seconds_per_batch": summarize_repeats(
            [r["train_seconds_per_batch"] for r in repeats]),
        "task_wall_seconds": _summarize_per_task(walls),
        "peak_memory_bytes": max(peaks) if peaks else None,
    }
    if all("final_top5_accuracy" in r for r in repeats):
        aggregate["final_top5_accuracy"] = summarize_repeats(
            [r["final_top5_accuracy"] for r in repeats])
    if "memory" in repeats[0]:  # the same for every repeat, except the distinct images
        aggregate["memory"] = {k: v for k, v in repeats[0]["memory"].items()
                               if k != DISTINCT}
        if DISTINCT in repeats[0]["memory"]:
            aggregate[DISTINCT] = _summarize_per_task([r["memory"][DISTINCT] for r in repeats])
    if A_ub is not None:
        aggregate["omega"] = summarize_repeats([r["omega"] for r in repeats])
    return json_safe({
        "num_tasks": len(A_g[0]),
        "num_repeats": len(repeats),
        "repeats": repeats,
        "aggregate": aggregate,
        "A_mean": per_task_g["mean"],
    })


# A memory method's footprint key: `[N]` distinct training images its memory held after each
# task (the release's random memory loses distinct images when it is redrawn).
DISTINCT = "distinct_stored_images"


def memory_totals(footprint: dict) -> dict:
    """What a method keeps between tasks, in total (the paper's memory comparison):
    `values`, the release's count (parameters + stored pixel values + class statistics), and
    `bytes`, with float32 parameters (classifier, generator) and statistics (class means,
    covariances) at 4 bytes and uint8 pixel values at 1."""
    params = (footprint.get("classifier_parameters", 0) + footprint.get("generator_parameters", 0)
              + footprint.get("statistics_values", 0))
    pixels = int(footprint.get("stored_image_bytes", 0))
    return {"values": int(params) + pixels, "bytes": 4 * int(params) + pixels}
