"""Hyperparameter search as in the paper's Appendix D: a grid over config fields, each point
scored by k-fold cross-validation on the *training* data of the first half of the tasks.

    python experiments/sweep.py --config=configs/cifar100.py --workdir=runs/sweep \
        --grid=abd.mu=0.03,0.1,0.3 --grid=synthesis.w_stat=10,50 [--folds=3]

The classes of the first `num_tasks // 2` tasks (in the run's class order, `--config.seed`)
are kept; their training images are split into `--folds` class-stratified folds; for each
grid point and fold, `abd_jax.experiment.run` learns those tasks on the other folds and is
evaluated on the held-out fold. The test split is never loaded. Each (point, fold) has its
own workdir, `<workdir>/<point>/fold_<k>`, so an interrupted sweep resumes where it stopped.
Writes `sweep.md` and `sweep.json` (A_N per fold, mean +- std per point, the best point).
"""
from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import pathlib
import re

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from abd_jax import data as data_lib
from abd_jax import experiment, logs
from abd_jax.session import Session

FLAGS = flags.FLAGS


def parse_grid(specs: list[str], config) -> list[dict]:
    """`["a.b=1,2", "c=x"]` -> every combination as `{"a.b": 1, "c": "x"}`; each field must
    exist in the config (values are Python literals, else strings)."""
    axes = []
    for spec in specs:
        field, sep, values = spec.partition("=")
        if not sep or not values:
            raise app.UsageError(f"--grid={spec!r}: write field=value1,value2,...")
        node = config
        for part in field.split("."):
            if part not in node:
                raise app.UsageError(f"--grid field {field!r}: the config has no {part!r}")
            node = node[part]

        def literal(v):
            try:
                return ast.literal_eval(v)
            except (ValueError, SyntaxError):
                return v
        axes.append([(field, literal(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def point_name(point: dict) -> str:
    return re.sub(r"[^\w.=,+-]+", "_", ",".join(f"{k}={v}" for k, v in point.items()))


def cv_splits(spec: data_lib.DatasetSpec, images: np.ndarray, labels: np.ndarray,
              classes: np.ndarray, folds: int, seed: int) -> list[experiment.Splits]:
    """For each fold k, `Splits` of the training images of `classes` (relabelled 0..len-1 in
    that order): fold k held out as the "test" split, the other folds as training. Folds are
    class-stratified (each class's images shuffled with `seed`, dealt round-robin)."""
    relabel = np.full(spec.num_classes, -1, np.int64)
    relabel[classes] = np.arange(len(classes))
    keep = np.flatnonzero(relabel[labels] >= 0)
    new_labels = relabel[labels[keep]].astype(np.int32)
    fold_of = np.empty(len(keep), np.int64)
    rng = np.random.RandomState(seed)
    for c in range(len(classes)):
        members = np.flatnonzero(new_labels == c)
        fold_of[rng.permutation(members)] = np.arange(len(members)) % folds
    half_spec = dataclasses.replace(spec, num_classes=len(classes))
    out = []
    for k in range(folds):
        train, held = keep[fold_of != k], keep[fold_of == k]
        out.append(experiment.Splits(half_spec, images[train], new_labels[fold_of != k],
                                     images[held], new_labels[fold_of == k]))
    return out


def sweep(config, workdir: pathlib.Path, points: list[dict], folds: int,
          session: Session) -> dict:
    """Run every (point, fold), sharing `session`'s programs; returns the report (also written
    as sweep.json / sweep.md)."""
    if folds < 2:
        raise ValueError(f"--folds must be >= 2, got {folds}")
    if config.num_tasks < 2:
        raise ValueError("the search uses the first half of the tasks: num_tasks must be >= 2")
    spec = data_lib.spec_of(config)
    data_dir = str(data_lib.expand_path(config.data_dir)) if config.data_dir else None
    images, labels = data_lib.load_split(spec, "train", data_dir, config.download)
    tasks = config.num_tasks // 2
    used = data_lib.task_boundaries(spec.num_classes, config.num_tasks,
                                    config.first_task_classes)[tasks - 1][1]
    order = data_lib.class_order(spec.num_classes, config.class_order, config.seed,
                                 dataset=config.dataset)
    splits = cv_splits(spec, images, labels, order[:used], folds, config.seed)
    report = {"folds": folds, "tasks": tasks, "classes": [int(c) for c in order[:used]],
              "points": []}
    for point in points:
        fold_config = experiment.config_with(config, {**point, "num_tasks": tasks,
                                                         "class_order": "identity", "repeats": 1})
        scores = []
        for k, split in enumerate(splits):
            logging.info("point %s, fold %d/%d", point_name(point), k + 1, folds)
            result = experiment.run(fold_config, workdir / point_name(point) / f"fold_{k}",
                                    split, session)
            scores.append(result["repeats"][0]["final_accuracy"])
        report["points"].append({"point": point, "A_N": scores, "mean": float(np.mean(scores)),
                                 "std": float(np.std(scores))})
        write_report(workdir, report)
    return report


def write_report(workdir: pathlib.Path, report: dict) -> None:
    best = max(report["points"], key=lambda p: p["mean"])
    report["best"] = best["point"]
    lines = [f"{report['folds']}-fold cross-validation on the training data of the first "
             f"{report['tasks']} tasks; A_N (%) per fold", "",
             "| point | A_N mean +- std | per fold |", "|---|---|---|"]
    for p in report["points"]:
        mark = " **best**" if p is best else ""
        lines.append(f"| {point_name(p['point'])}{mark} | {p['mean']:.2f} +- {p['std']:.2f} | "
                     + ", ".join(f"{a:.2f}" for a in p["A_N"]) + " |")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sweep.md").write_text("\n".join(lines) + "\n")
    (workdir / "sweep.json").write_text(json.dumps(report, indent=2))


def main(argv):
    del argv
    logs.quiet_library_logs()
    points = parse_grid(FLAGS.grid, FLAGS.config)
    workdir = pathlib.Path(FLAGS.workdir).expanduser()
    with Session() as session:
        session.stop.install()
        try:
            report = sweep(FLAGS.config, workdir, points, FLAGS.folds, session)
        except KeyboardInterrupt:
            raise SystemExit(130)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"error: {err}")
    print((workdir / "sweep.md").read_text())
    print(f"best: {point_name(report['best'])}")


def define_flags() -> None:
    """The command line (defined only when run as a script, so tests can import it)."""
    config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Folder for every (point, fold) run and the report.")
    flags.DEFINE_multi_string("grid", None, "field=v1,v2,... (dotted for nested fields); "
                              "repeat for a product grid.")
    flags.DEFINE_integer("folds", 3, "Cross-validation folds (k).")
    flags.mark_flags_as_required(["config", "workdir", "grid"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
