"""Run several methods (or ABD's Table 3 ablations) with one base config; print a table.

    python experiments/run_table.py --config=configs/cifar100.py --workdir=runs/table \
        --table=methods [--config.num_tasks=5 ...]
    python experiments/run_table.py --config=configs/cifar100.py --workdir=runs/ablations \
        --table=ablations
    python experiments/run_table.py ... --rows=base,abd,abd_no_ft_ce

Each row runs `abd_jax.experiment.run` in `<workdir>/<row>` (so an interrupted table resumes
row by row); `upper_bound`, when listed, runs first and provides Omega for the others. The
table (final accuracy A_N mean +- std over repeats, Omega, the memory a method keeps between
tasks, seconds per batch) is printed and written to `<workdir>/table.md`. Tables: `methods`
(all rows of the paper's Table 1/2), `data_free`, `coreset`, `ablations` (Table 3).
"""
from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from abd_jax import experiment, logs  # noqa: E402

# row name -> config overrides (dotted keys for nested fields)
ROWS = {
    "upper_bound": {"method": "upper_bound"},
    "base": {"method": "base"},
    "lwf": {"method": "lwf"},
    "lwf_mc": {"method": "lwf_mc"},
    "lwf_synthetic": {"method": "lwf_synthetic"},
    "deepinversion": {"method": "deepinversion"},
    "abd": {"method": "abd"},
    "naive_rehearsal": {"method": "naive_rehearsal"},
    "lwf_coreset": {"method": "lwf_coreset"},
    "e2e": {"method": "e2e"},
    "bic": {"method": "bic"},
    "dgr": {"method": "dgr"},
    "abd_no_task_balancing": {"method": "abd", "abd.task_balancing": False},
    "abd_standard_ce": {"method": "abd", "abd.local_ce": False},
    "abd_feature_kd_synthetic_only": {"method": "abd", "abd.kd_on_real": False},
    "abd_feature_kd_real_only": {"method": "abd", "abd.kd_on_synthetic": False},
    "abd_no_ft_ce": {"method": "abd", "abd.ft_ce": False},
}
TABLES = {
    "methods": ["upper_bound", "base", "lwf", "lwf_mc", "lwf_synthetic", "deepinversion",
                "abd", "dgr", "naive_rehearsal", "lwf_coreset", "e2e", "bic"],
    "data_free": ["upper_bound", "base", "lwf", "lwf_mc", "lwf_synthetic", "deepinversion",
                  "abd", "dgr"],
    "coreset": ["upper_bound", "naive_rehearsal", "lwf_coreset", "e2e", "bic"],
    "ablations": ["abd", "abd_no_task_balancing", "abd_standard_ce",
                  "abd_feature_kd_synthetic_only", "abd_feature_kd_real_only", "abd_no_ft_ce"],
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for the rows' workdirs and table.md.")
flags.DEFINE_enum("table", "methods", sorted(TABLES), "Which predefined list of rows.")
flags.DEFINE_list("rows", None, f"Explicit rows instead of --table; known: {sorted(ROWS)}")
flags.mark_flags_as_required(["config", "workdir"])


def row_config(base, overrides: dict):
    config = base.copy_and_resolve_references()
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
    return config


def _pm(stat) -> str:
    return "n/a" if stat is None or stat.get("mean") is None else \
        f"{stat['mean']:.2f} +- {stat['std']:.2f}"


def main(argv):
    del argv
    logs.quiet_library_logs()
    rows = FLAGS.rows or TABLES[FLAGS.table]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise app.UsageError(f"unknown rows {unknown}; known: {sorted(ROWS)}")
    workdir = pathlib.Path(FLAGS.workdir)
    rows = sorted(rows, key=lambda r: r != "upper_bound")  # upper bound first, for Omega
    lines = ["| row | final accuracy A_N (%) | Omega | memory (M values) | s / batch |",
             "|---|---|---|---|---|"]
    upper_bound_path = ""
    for row in rows:
        overrides = dict(ROWS[row])
        if row != "upper_bound" and upper_bound_path:
            overrides["upper_bound_results"] = upper_bound_path
        logging.info("row %s: %s", row, overrides)
        results = experiment.run(row_config(FLAGS.config, overrides), workdir / row)
        if row == "upper_bound":
            upper_bound_path = str(workdir / row / "results.json")
        agg = results["aggregate"]
        memory = agg.get("memory", {}).get("values")
        memory = "n/a" if memory is None else f"{memory / 1e6:.2f}"
        lines.append(f"| {row} | {_pm(agg['final_accuracy'])} | {_pm(agg.get('omega'))} | "
                     f"{memory} | {agg['train_seconds_per_batch']['mean']:.4f} |")
        table = "\n".join(lines) + "\n"
        (workdir / "table.md").write_text(table)
    config_line = json.dumps({k: FLAGS.config[k] for k in ("dataset", "num_tasks", "model",
                                                           "epochs", "repeats")})
    print(f"\n{config_line}\n{table}")


if __name__ == "__main__":
    app.run(main)
