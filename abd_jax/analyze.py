"""The paper's diagnostics for finished runs (Section 5, Figures 2, B, C and D).

    python -m abd_jax.analyze --workdir=/tmp/di --workdir=/tmp/abd --out=/tmp/analysis

Each --workdir is a synthetic-replay run (abd, deepinversion, lwf_synthetic) made with
`--config.keep_task_checkpoints=True`. On the penultimate features of the model after
`--task` (default 2) it measures MID and unbiased MMD^2 (`abd_jax.analysis`) of real task 1
against real task T and against the synthetic task-1 images the learner replayed, and writes:

- `analysis.json`: the numbers, per run;
- `feature_gap.png`: MID and MMD^2 bars, runs side by side (Figure 2 / B);
- `tsne_<run>.png`: t-SNE of the three feature sets (Figure C);
- `cost.png`: seconds per training batch of every given run with a `results.json`, also
  runs of any method (Figure D).
"""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np
from absl import app, flags, logging

from abd_jax import analysis, logs

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "A run's output folder; repeat for side-by-side.")
flags.DEFINE_integer("task", 2, "Use the model after this task (1-based, >= 2).")
flags.DEFINE_integer("repeat", 0, "Which repeat of each run.")
flags.DEFINE_enum("split", "test", ["test", "train"], "Real images from this split.")
flags.DEFINE_integer("max_per_set", 1000, "At most this many images per feature set.")
flags.DEFINE_integer("tsne_points", 300, "Points per set in the t-SNE plots (0: no t-SNE).")
flags.DEFINE_string("out", None, "Output folder (default: <first workdir>/analysis).")
flags.mark_flags_as_required(["workdir"])

GROUPS = ("real_first", "real_current", "synthetic_first")


def group_names(task: int) -> list[str]:
    return ["real task 1", f"real task {task}", "synthetic task 1"]


def run_labels(workdirs: list[pathlib.Path], methods: list[str]) -> list[str]:
    """The method name, with the folder name where two runs share a method (and a number
    where they share that too)."""
    labels = [m if methods.count(m) == 1 else f"{m} ({w.name})" for w, m in zip(workdirs, methods)]
    return [f"{lab} #{i + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def plot_feature_gap(path: pathlib.Path, report: dict, task: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    pairs = (("real1_vs_realT", f"real 1 vs real {task}"),
             ("real1_vs_synthetic1", "real 1 vs synthetic 1"))
    width = 0.8 / len(report)
    for i, (metric, title) in enumerate((("mid", "MID"), ("mmd2", "MMD$^2$"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, (label, numbers) in enumerate(report.items()):
            xs = np.arange(len(pairs)) + (j - (len(report) - 1) / 2) * width
            ax.bar(xs, [numbers["pairs"][p][metric] for p, _ in pairs], width, label=label)
        ax.set_xticks(np.arange(len(pairs)), [name for _, name in pairs])
        ax.set_title(f"{title}, features of the model after task {task}")
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_tsne(path: pathlib.Path, sets: analysis.FeatureSets, label: str, points: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.manifold import TSNE

    rng = np.random.RandomState(0)
    chosen = []
    for attr, name in zip(GROUPS, group_names(sets.task)):
        feats = getattr(sets, attr)
        chosen.append((name, feats[rng.permutation(len(feats))[:points]]))
    stacked = np.concatenate([f for _, f in chosen])
    perplexity = float(min(30, max(2, (len(stacked) - 1) // 3)))
    embedded = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(stacked)
    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    start = 0
    for name, feats in chosen:
        e = embedded[start:start + len(feats)]
        ax.scatter(e[:, 0], e[:, 1], s=6, alpha=0.7, label=name)
        start += len(feats)
    ax.set_title(f"t-SNE of penultimate features: {label}, after task {sets.task}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_cost(path: pathlib.Path, costs: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4, 1.2 * len(costs)), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(costs)), [1e3 * c for c in costs.values()])
    ax.set_xticks(range(len(costs)), list(costs), rotation=20)
    ax.set_ylabel("ms per training batch")
    ax.set_title("Training cost per batch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def seconds_per_batch(workdir: pathlib.Path):
    path = workdir / "results.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["aggregate"]["train_seconds_per_batch"]["mean"]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet_library_logs()
    workdirs = [pathlib.Path(w).expanduser() for w in FLAGS.workdir]
    out = pathlib.Path(FLAGS.out).expanduser() if FLAGS.out else workdirs[0] / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    try:
        methods = [analysis.load_config(w, FLAGS.repeat).method for w in workdirs]
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}")
    labels = run_labels(workdirs, methods)

    report, costs = {}, {}
    for workdir, label in zip(workdirs, labels):
        cost = seconds_per_batch(workdir)
        if cost is not None:
            costs[label] = cost
        try:
            sets = analysis.feature_sets(workdir, FLAGS.task, FLAGS.repeat, FLAGS.split,
                                         FLAGS.max_per_set)
        except (ValueError, FileNotFoundError) as err:
            if len(workdirs) == 1:
                raise SystemExit(f"error: {err}")
            logging.warning("%s: no feature diagnostics (%s)", label, err)
            continue
        pairs = analysis.compare(sets.real_first, sets.real_current, sets.synthetic_first)
        report[label] = {"workdir": str(workdir), "method": sets.method, "task": sets.task,
                         "split": FLAGS.split, "pairs": pairs,
                         "counts": {a: len(getattr(sets, a)) for a in GROUPS}}
        for pair, numbers in pairs.items():
            logging.info("%s: %s MID %.3f MMD^2 %.4f", label, pair, numbers["mid"],
                         numbers["mmd2"])
        if FLAGS.tsne_points:
            name = re.sub(r"[^\w.-]+", "_", label).strip("_")
            plot_tsne(out / f"tsne_{name}.png", sets, label, FLAGS.tsne_points)

    (out / "analysis.json").write_text(json.dumps(report, indent=2))
    if report:
        plot_feature_gap(out / "feature_gap.png", report, FLAGS.task)
    if costs:
        plot_cost(out / "cost.png", costs)
    logging.info("wrote %s", ", ".join(sorted(p.name for p in out.iterdir())))


if __name__ == "__main__":
    app.run(main)
