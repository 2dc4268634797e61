"""Reporting a run: results.json, summary.md and plots written whole (`files`), sample grids, and
the metrics log (JSON lines and TensorBoard). The numbers come from `abd_jax.metrics`;
matplotlib is imported only when a plot is written.
"""
from __future__ import annotations

import io
import json
import pathlib

import numpy as np

from abd_jax.files import write_file
from abd_jax.metrics import DISTINCT, json_safe


def _memory_line(memory: dict) -> str:
    parts = [f"{memory['classifier_parameters']:,} classifier parameters"]
    if memory.get("generator_parameters"):
        parts.append(f"{memory['generator_parameters']:,} generator parameters")
    if memory.get("stored_images"):
        parts.append(f"{memory['stored_images']:,} stored images")
    if memory.get("statistics_values"):
        parts.append(f"{memory['statistics_values']:,} class statistics")
    return (f"- memory kept between tasks: {memory['values'] / 1e6:.2f} M values, "
            f"{memory['bytes'] / 2**20:.2f} MiB ({' + '.join(parts)})")


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
    if "average_incremental_accuracy" in agg:
        lines.append(f"- average incremental accuracy A_inc (the mean of A_i over every task, "
                     f"the first included): {_pm(agg['average_incremental_accuracy'])} %")
    if "omega" in agg:
        lines.append(f"- Omega: {_pm(agg['omega'], 4)}")
    lines.append(f"- final local (task-incremental) accuracy: {_pm(agg['final_local_accuracy'])} %")
    if agg.get("forgetting") and agg["forgetting"]["mean"] is not None:
        lines.append(f"- average forgetting F_N: {_pm(agg['forgetting'])} % (Chaudhry et al.)")
    if "final_top5_accuracy" in agg:
        lines.append(f"- final top-5 accuracy: {_pm(agg['final_top5_accuracy'])} %")
    lines.append(f"- seconds per training batch: {_pm(agg['train_seconds_per_batch'], 4)}")
    peak = agg["peak_memory_bytes"]
    lines.append(f"- peak memory: {'n/a' if peak is None else f'{peak / 2**20:.1f} MiB'}")
    if "memory" in agg:
        lines.append(_memory_line(agg["memory"]))
    if DISTINCT in agg:
        counts = ", ".join(f"{m:.0f}" if not s else f"{m:.1f} ± {s:.1f}"
                           for m, s in zip(agg[DISTINCT]["mean"], agg[DISTINCT]["std"]))
        lines.append(f"- distinct images in the memory after each task: {counts}")

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


def comparison_figure(panels: dict, title: str):
    """Matplotlib Figure: one panel per entry of `panels` ({panel title: {row: (mean A_i [N],
    std [N])}}), each with every row's mean A_i vs tasks learned and a ±std band, on the
    fixed 0-100 axis of `accuracy_figure`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(panels), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, rows) in zip(axes, panels.items()):
        for k, (row, (mean, std)) in enumerate(rows.items()):
            mean, std = _floats(mean), _floats(std)
            x = np.arange(1, len(mean) + 1)
            ax.plot(x, mean, color=f"C{k % 10}", marker="o", markersize=3, label=row)
            ax.fill_between(x, mean - std, mean + std, color=f"C{k % 10}", alpha=0.15,
                            linewidth=0)
            ax.set_xticks(x)
        ax.set_xlabel("tasks learned")
        ax.set_ylabel("accuracy on all seen classes (%)")
        ax.set_ylim(0, 100)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _accuracy_png(results: dict, title: str) -> bytes:
    return _png(accuracy_figure(results, title))


def write_comparison(path, panels: dict, title: str) -> None:
    """Atomically write `comparison_figure(panels, title)` as a PNG at `path`."""
    write_file(pathlib.Path(path), _png(comparison_figure(panels, title)))


def write_results(workdir, results: dict, config_dict: dict, title: str) -> None:
    """Atomically write ``results.json`` (results plus ``title`` and ``config``),
    ``summary.md`` and ``accuracy.png`` into ``workdir``."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    payload = json_safe({"title": title, "config": config_dict, **results})
    text = json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n"
    write_file(workdir / "results.json", text.encode())
    write_file(workdir / "summary.md",
                        _summary_markdown(results, config_dict, title).encode())
    write_file(workdir / "accuracy.png", _accuracy_png(results, title))


def load_plotting() -> None:
    """Import matplotlib and load its font cache (built on a machine's first use, which takes
    seconds), so that a later first plot does not pay for it."""
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
    write_file(pathlib.Path(path), buf.getvalue())


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
        self._f.write(json.dumps(json_safe(record), allow_nan=False, default=str) + "\n")
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
