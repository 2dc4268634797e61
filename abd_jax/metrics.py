"""Class-incremental metrics and result reporting (SPEC section 7).

Accuracies are percentages in [0, 100]. ``R[i][j]`` is the accuracy on task j's test set
after learning task i (0-based here), so only the lower triangle ``j <= i`` is meaningful;
entries not (yet) measured are NaN in arrays and ``None`` in JSON.

    A_i   = mean_{j<=i} R[i][j]
    A_N   = A at the last task
    Omega = (1/N) sum_i A_i / A_UB_i      (A_UB: the upper bound's A)

Pure numpy/stdlib; matplotlib is imported only when a plot is written.
"""
from __future__ import annotations

import io
import json
import math
import os
import pathlib
import tempfile
from typing import Any

import numpy as np


def _as_matrix(R) -> np.ndarray:
    """Square float array [N, N] from an array or list of lists (``None`` -> NaN)."""
    R = np.array(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"accuracy matrix must be square [N, N], got shape {R.shape}")
    return R


def _json_safe(x: Any) -> Any:
    """Recursively convert numpy types to Python and non-finite floats to ``None``."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in x]
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
        return {"R_global": _json_safe(self.global_acc), "R_local": _json_safe(self.local_acc),
                "R_global_top5": _json_safe(self.top5_acc)}

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
    (int or None) and optionally ``memory`` (see :func:`memory_totals`). ``upper_bound`` is
    any dict with ``A_mean`` [N] (e.g. an earlier output of this function); if given, Omega
    is computed per repeat against it.

    Returns ``{"num_tasks", "num_repeats", "repeats": [...], "aggregate": {...}, "A_mean": [N]}``
    where each repeat adds ``A_global``, ``A_local``, ``final_accuracy``,
    ``final_local_accuracy`` (and ``omega``), and ``aggregate`` holds mean/std over repeats.
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
    if "memory" in repeats[0]:
        aggregate["memory"] = repeats[0]["memory"]  # the same for every repeat
    if A_ub is not None:
        aggregate["omega"] = summarize_repeats([r["omega"] for r in repeats])
    return _json_safe({
        "num_tasks": len(A_g[0]),
        "num_repeats": len(repeats),
        "repeats": repeats,
        "aggregate": aggregate,
        "A_mean": per_task_g["mean"],
    })


def memory_totals(footprint: dict) -> dict:
    """What a method keeps between tasks, in total (the paper's memory comparison):
    `values`, the release's count (parameters + stored pixel values), and `bytes`, with
    float32 parameters (classifier, generator) at 4 bytes and uint8 pixel values at 1."""
    params = footprint.get("classifier_parameters", 0) + footprint.get("generator_parameters", 0)
    pixels = int(footprint.get("stored_image_bytes", 0))
    return {"values": int(params) + pixels, "bytes": 4 * int(params) + pixels}


def _memory_line(memory: dict) -> str:
    parts = [f"{memory['classifier_parameters']:,} classifier parameters"]
    if memory.get("generator_parameters"):
        parts.append(f"{memory['generator_parameters']:,} generator parameters")
    if memory.get("stored_images"):
        parts.append(f"{memory['stored_images']:,} stored images")
    return (f"- memory kept between tasks: {memory['values'] / 1e6:.2f} M values, "
            f"{memory['bytes'] / 2**20:.2f} MiB ({' + '.join(parts)})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to a temp file in ``path``'s folder, then ``os.replace`` it into place,
    readable as the umask allows (not mkstemp's private 0600: results are shared)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pm(summary: dict, digits: int = 2) -> str:
    return f"{_fmt(summary['mean'], digits)} ± {_fmt(summary['std'], digits)}"


def _summary_markdown(results: dict, config_dict: dict, title: str) -> str:
    """Human-readable Markdown summary of a :func:`build_results` dict."""
    agg, reps = results["aggregate"], results["repeats"]
    lines = [f"# {title}", ""]
    for key in ("method", "dataset", "num_tasks"):
        if key in config_dict:
            lines.append(f"- {key}: {config_dict[key]}")
    lines.append(f"- repeats: {results['num_repeats']} (seeds {[r['seed'] for r in reps]}; "
                 f"mean ± population std)")
    lines += ["", f"**Final accuracy A_N: {_pm(agg['final_accuracy'])} %**", ""]
    if "omega" in agg:
        lines.append(f"- Omega: {_pm(agg['omega'], 4)}")
    lines.append(f"- final local (task-incremental) accuracy: {_pm(agg['final_local_accuracy'])} %")
    if "final_top5_accuracy" in agg:
        lines.append(f"- final top-5 accuracy: {_pm(agg['final_top5_accuracy'])} %")
    lines.append(f"- seconds per training batch: {_pm(agg['train_seconds_per_batch'], 4)}")
    peak = agg["peak_memory_bytes"]
    lines.append(f"- peak memory: {'n/a' if peak is None else f'{peak / 2**20:.1f} MiB'}")
    if "memory" in agg:
        lines.append(_memory_line(agg["memory"]))

    lines += ["", "## Per-task results", "",
              "| tasks learned | A_i global (%) | A_i local (%) | wall time (s) |",
              "|---|---|---|---|"]
    g, l, w = agg["A_global"], agg["A_local"], agg["task_wall_seconds"]
    for i in range(results["num_tasks"]):
        lines.append(f"| {i + 1} | {_fmt(g['mean'][i])} ± {_fmt(g['std'][i])} "
                     f"| {_fmt(l['mean'][i])} ± {_fmt(l['std'][i])} "
                     f"| {_fmt(w['mean'][i], 1)} ± {_fmt(w['std'][i], 1)} |")

    R = reps[-1]["R_global"]
    header = " | ".join(str(j + 1) for j in range(len(R)))
    lines += ["", f"## Global accuracy matrix R[i][j] (%), last repeat (seed {reps[-1]['seed']})",
              "", f"| after task \\ on task | {header} |", "|---" * (len(R) + 1) + "|"]
    for i, row in enumerate(R):
        cells = ("" if v is None else f"{v:.2f}" for v in row)
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _floats(seq) -> np.ndarray:
    """JSON list (``None`` = missing) -> float array with NaN."""
    return np.array([np.nan if v is None else v for v in seq], dtype=float)


def accuracy_figure(results: dict, title: str):
    """Matplotlib Figure: mean A_i vs tasks learned on a fixed 0-100 axis (a drop looks as
    large as it is), one faint line per repeat and, with several repeats, a ±std band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(1, results["num_tasks"] + 1)
    repeats = results["repeats"]
    mean = _floats(results["aggregate"]["A_global"]["mean"])
    if len(repeats) > 1:
        for rep in repeats:
            ax.plot(x, _floats(rep["A_global"]), color="C0", alpha=0.25, linewidth=1)
        std = _floats(results["aggregate"]["A_global"]["std"])
        ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.2, linewidth=0)
        label = f"mean ± std over {len(repeats)} repeats"
    else:
        label = "1 repeat"
    ax.plot(x, mean, color="C0", marker="o", linewidth=2, label=label)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(x)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _accuracy_png(results: dict, title: str) -> bytes:
    buf = io.BytesIO()
    accuracy_figure(results, title).savefig(buf, format="png")
    return buf.getvalue()


def write_results(workdir, results: dict, config_dict: dict, title: str) -> None:
    """Atomically write ``results.json`` (results plus ``title`` and ``config``),
    ``summary.md`` and ``accuracy.png`` into ``workdir``."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    payload = _json_safe({"title": title, "config": config_dict, **results})
    text = json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n"
    _atomic_write_bytes(workdir / "results.json", text.encode())
    _atomic_write_bytes(workdir / "summary.md",
                        _summary_markdown(results, config_dict, title).encode())
    _atomic_write_bytes(workdir / "accuracy.png", _accuracy_png(results, title))


def load_plotting() -> None:
    """Import matplotlib and load its font cache (built on a machine's first use: 13 s on a
    fresh GPU machine), so that a later first plot does not pay for it."""
    from matplotlib import font_manager
    font_manager.findfont("DejaVu Sans")


def save_sample_grid(path, images: np.ndarray, labels: np.ndarray, mean, std,
                     title: str = "") -> None:
    """PNG grid of normalised images `[N, H, W, C]` (denormalised: x * std + mean, clipped to
    [0, 1]) with `labels[i]` written under image i."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = np.clip(images * np.asarray(std) + np.asarray(mean), 0.0, 1.0)
    n = len(images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(1.1 * cols, 1.25 * rows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = images[i]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image,
                  cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(str(int(labels[i])), fontsize=8, labelpad=1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_write_bytes(pathlib.Path(path), buf.getvalue())


def tensorboard_run(tags: dict) -> pathlib.PurePath:
    """The TensorBoard run (sub-folder) of a metrics line: `repeat_<r>/eval` for the accuracy
    after each task, else `repeat_<r>/task_<t>/<phase>` (`train` for the learner), so that
    every run has one step axis."""
    run = pathlib.PurePath(f"repeat_{tags.get('repeat', 0)}")
    if "task" not in tags:
        return run / "eval"
    return run / f"task_{tags['task']}" / str(tags.get("phase", "train"))


class MetricWriter:
    """Append-only JSON-lines scalar log: one ``{"step", **tags, **scalars}`` object per line,
    and the same scalars as TensorBoard event files under `tensorboard_dir` (one run per
    `tensorboard_run`; written with tensorboardX, no TensorFlow).

    Scalars are converted with ``float``; non-finite values are written as ``null`` so every
    line is strict JSON. Opened in append mode so resumed runs keep earlier lines; a checkpoint
    records `tell()` and a resume `truncate`s back to it, so no line appears twice. In
    TensorBoard the same is done by opening each run with `purge_step` = its first step
    written by this process: TensorBoard drops that run's older events from that step on.
    """

    def __init__(self, path, tensorboard_dir=None):
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")
        self._tb_dir = None if tensorboard_dir is None else pathlib.Path(tensorboard_dir)
        self._tb: dict = {}  # run -> tensorboardX.SummaryWriter

    def write(self, step: int, scalars: dict, **tags) -> None:
        record = {"step": int(step), **tags, **{k: float(v) for k, v in scalars.items()}}
        self._f.write(json.dumps(_json_safe(record), allow_nan=False, default=str) + "\n")
        self._f.flush()
        if self._tb_dir is not None:
            self._write_tensorboard(int(step), scalars, tags)

    def _write_tensorboard(self, step: int, scalars: dict, tags: dict) -> None:
        run = tensorboard_run(tags)
        writer = self._tb.get(run)
        if writer is None:
            from tensorboardX import SummaryWriter
            for other in [r for r in self._tb if r.parent != run.parent and r.name != "eval"]:
                self._tb.pop(other).close()  # a finished task's runs (one thread each)
            writer = self._tb[run] = SummaryWriter(str(self._tb_dir / run), purge_step=step,
                                                   flush_secs=10)
        for name, value in scalars.items():
            if np.isfinite(float(value)):
                writer.add_scalar(name, float(value), step)

    def tell(self) -> int:
        """Bytes written so far (the file's length)."""
        return self._f.tell()

    def truncate(self, size: int) -> None:
        """Drop everything after the first `size` bytes (no-op if the file is shorter)."""
        if size < self.tell():
            self._f.truncate(size)
            self._f.seek(0, 2)  # the append position follows the new end

    def close(self) -> None:
        self._f.close()
        for writer in self._tb.values():
            writer.close()
        self._tb.clear()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
