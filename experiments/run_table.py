"""Run several methods (or ABD's Table 3 ablations) with one base config; write the table.

    python experiments/run_table.py --config=configs/cifar100.py --workdir=runs/table \
        --table=methods --tasks=5,10,20
    python experiments/run_table.py --config=configs/cifar100.py --workdir=runs/ablations \
        --table=ablations
    python experiments/run_table.py ... --rows=base,abd,abd_no_ft_ce

Each cell (row, task count) runs `abd_jax.experiment.run` in `<workdir>/<row>`, or
`<workdir>/tasks_<n>/<row>` with `--tasks`, so an interrupted table resumes cell by cell;
`upper_bound`, when listed, runs first for each task count and provides Omega for the others.
The table, rows = methods, columns = task counts (final accuracy A_N mean +- std over
repeats, and Omega when there is an upper bound), then the memory a method keeps between
tasks and seconds per batch (of the largest task count), is printed and written to
`<workdir>/table.md`, with every number in `<workdir>/table.csv`. Tables: `methods` (all rows
of the paper's Tables 1/2), `data_free`, `coreset`, `ablations` (Table 3).
"""
from __future__ import annotations

import json
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from abd_jax import experiment, logs
from abd_jax.session import Session

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


def _pm(stat) -> str:
    return "n/a" if stat is None or stat.get("mean") is None else \
        f"{stat['mean']:.2f} +- {stat['std']:.2f}"


def format_table(rows: list[str], task_counts: list[int], cells: dict) -> tuple[str, str]:
    """(Markdown, CSV) of `cells[(row, num_tasks)]` = a results.json `aggregate`; a missing
    cell (still to run) shows as `...`. Omega columns appear when any cell has Omega."""
    with_omega = any(c.get("omega") for c in cells.values())
    head = ["row"]
    for n in task_counts:
        head += [f"A_N (%), {n} tasks"] + ([f"Omega, {n} tasks"] if with_omega else [])
    head += ["memory (M values)", "s / batch"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    csv = ["row,num_tasks,A_N_mean,A_N_std,omega_mean,omega_std,memory_values,"
           "seconds_per_batch,repeats"]
    for row in rows:
        line, last = [row], None
        for n in task_counts:
            agg = cells.get((row, n))
            if agg is None:
                line += ["..."] * (2 if with_omega else 1)
                continue
            last = agg
            line.append(_pm(agg["final_accuracy"]))
            if with_omega:
                line.append(_pm(agg.get("omega")))
            acc, omega = agg["final_accuracy"], agg.get("omega") or {}
            csv.append(",".join(str(v) for v in (
                row, n, acc["mean"], acc["std"], omega.get("mean", ""), omega.get("std", ""),
                agg.get("memory", {}).get("values", ""), agg["train_seconds_per_batch"]["mean"],
                acc["n"])))
        memory = None if last is None else last.get("memory", {}).get("values")
        line.append("n/a" if memory is None else f"{memory / 1e6:.2f}")
        line.append("..." if last is None else f"{last['train_seconds_per_batch']['mean']:.4f}")
        md.append("| " + " | ".join(line) + " |")
    return "\n".join(md) + "\n", "\n".join(csv) + "\n"


def main(argv):
    del argv
    logs.quiet_library_logs()
    rows = FLAGS.rows or TABLES[FLAGS.table]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise app.UsageError(f"unknown rows {unknown}; known: {sorted(ROWS)}")
    task_counts = [int(n) for n in FLAGS.tasks] if FLAGS.tasks else [FLAGS.config.num_tasks]
    workdir = pathlib.Path(FLAGS.workdir)
    rows = sorted(rows, key=lambda r: r != "upper_bound")  # upper bound first, for Omega
    with Session() as session:  # the table's runs compile each program once
        session.stop.install()
        try:
            table = run_cells(rows, task_counts, workdir, session)
        except KeyboardInterrupt:
            raise SystemExit(130)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"error: {err}")
    config_line = json.dumps({k: FLAGS.config[k] for k in ("dataset", "model", "epochs",
                                                           "repeats")})
    print(f"\n{config_line}\n{table}")


def run_cells(rows: list[str], task_counts: list[int], workdir: pathlib.Path,
              session: Session) -> str:
    """Run (or resume) every cell, rewriting table.md / table.csv after each; returns the
    Markdown table."""
    cells = {}
    for n in task_counts:
        folder = workdir / f"tasks_{n}" if FLAGS.tasks else workdir
        upper_bound_path = ""
        for row in rows:
            overrides = {"num_tasks": n, **ROWS[row]}
            if row != "upper_bound" and upper_bound_path:
                overrides["upper_bound_results"] = upper_bound_path
            logging.info("row %s, %d tasks: %s", row, n, overrides)
            cells[(row, n)] = experiment.run(experiment.config_with(FLAGS.config, overrides),
                                             folder / row, session=session)["aggregate"]
            if row == "upper_bound":
                upper_bound_path = str(folder / row / "results.json")
            table, csv = format_table(rows, task_counts, cells)
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "table.md").write_text(table)
            (workdir / "table.csv").write_text(csv)
    return table


def define_flags() -> None:
    """The command line (defined only when run as a script, so tests can import it)."""
    config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Folder for the rows' workdirs and table.md.")
    flags.DEFINE_enum("table", "methods", sorted(TABLES), "Which predefined list of rows.")
    flags.DEFINE_list("rows", None, f"Explicit rows instead of --table; known: {sorted(ROWS)}")
    flags.DEFINE_list("tasks", None, "Task counts, one column each (e.g. 5,10,20; default: the "
                      "config's num_tasks).")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
