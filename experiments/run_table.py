"""Run several methods (or ABD's Table 3 ablations) with one base config; write the table.

    python experiments/run_table.py --config=configs/cifar100.py --workdir=runs/table \
        --table=methods --tasks=5,10,20
    python experiments/run_table.py --config=configs/cifar100.py --workdir=runs/ablations \
        --table=ablations
    python experiments/run_table.py ... --rows=base,abd,abd_no_ft_ce

Each cell (row, task count) runs `abd_jax.experiment.run` in `<workdir>/<row>`, or
`<workdir>/tasks_<n>/<row>` with `--tasks`, so an interrupted table resumes cell by cell;
`upper_bound`, when listed, runs first for each task count and provides Omega for the others.
The table, rows = methods, columns per task count: final accuracy A_N, average incremental
accuracy A_inc (the mean of A_i over every task, the first included) and average forgetting
F (mean +- std over repeats), Omega when there is an upper bound, and on CIFAR-100 the
published A_N (labelled with its source); then the memory a method keeps between tasks and
seconds per batch (of the last task count). It is printed and written to
`<workdir>/table.md`, every number to `<workdir>/table.csv`, and the A_i curves of every row
to `<workdir>/comparison.png` (one panel per task count). Tables: `methods` (all rows of
the paper's Tables 1/2), `data_free` (Table 1 and R-DFCIL), `coreset`, `ablations` (Table 3).

`--parallel=N` runs N at once, each in a process of its own with an even share of each
accelerator's memory (`abd_jax.parallel`): the repeats of a cell (repeat r of a cell of
several in `<cell>/repeat_<r>/`, merged into the cell's results.json with the numbers of a
run in one process) and the cells, the upper bounds first. Their logs go to
`<workdir>/logs/`; a stop stops them all, each with a checkpoint, and the same command
resumes them.
"""
from __future__ import annotations

import json
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from abd_jax import data as data_lib
from abd_jax import errors, experiment, files, first_task, logs, parallel, reporting
from abd_jax import methods as methods_lib
from abd_jax.session import Session

# row name -> config overrides (dotted keys for nested fields), and the named tables: from
# the methods (`abd_jax.methods`: each method's `tables`, `rank` and `variants`)
ROWS = methods_lib.table_rows()
TABLES = methods_lib.tables()

FLAGS = flags.FLAGS


def _pm(stat) -> str:
    return "n/a" if stat is None or stat.get("mean") is None else \
        f"{stat['mean']:.2f} +- {stat['std']:.2f}"


def tasks_label(num_tasks: int, first_task_classes: int = 0) -> str:
    """"10 tasks", or under warm start "6 tasks (B50 + 5)": a first task of B classes and the
    steps after it, as the exemplar-free papers name their protocols."""
    if not first_task_classes:
        return f"{num_tasks} tasks"
    return f"{num_tasks} tasks (B{first_task_classes} + {num_tasks - 1})"


def format_table(rows: list[str], task_counts: list[int], cells: dict,
                 published: dict | None = None, first_task_classes: int = 0,
                 sources: dict | None = None, backbones: dict | None = None) -> tuple[str, str]:
    """(Markdown, CSV) of `cells[(row, num_tasks)]` = a results.json `aggregate`; a missing
    cell (still to run) shows as `...`. Omega columns appear when any cell has Omega,
    published columns when `published` ({row: {num_tasks: (mean, std, source key[, metric])}})
    has a figure for a listed row and task count, with the `sources` ({key: text}) and the
    rows' notes below the table. Columns are labelled both ways under warm start
    (`tasks_label`); a backbone column appears when the rows' `backbones` ({row: model})
    differ."""
    published, sources_text = published or {}, sources or {}
    with_omega = any(c.get("omega") for c in cells.values())
    with_published = {n for n in task_counts for r in rows if n in published.get(r, {})}
    backbones = backbones or {}
    with_backbone = len(set(backbones.values())) > 1
    head = ["row"] + (["backbone"] if with_backbone else [])
    for n in task_counts:
        label = tasks_label(n, first_task_classes)
        head += [f"A_N (%), {label}", f"A_inc (%), {label}", f"F (%), {label}"]
        head += [f"Omega, {label}"] if with_omega else []
        metrics = {f[3] if len(f) > 3 else "A_N" for r in rows
                   for f in [published.get(r, {}).get(n)] if f}
        named = metrics.pop() + " " if len(metrics) == 1 else ""
        head += [f"published {named}(%), {label}"] if n in with_published else []
    head += ["memory (M values)", "s / batch"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    csv = ["row,num_tasks,first_task_classes,A_N_mean,A_N_std,A_inc_mean,A_inc_std,F_mean,"
           "F_std,omega_mean,omega_std,published_A_N_mean,published_A_N_std,memory_values,"
           "seconds_per_batch,repeats"]
    sources = set()
    for row in rows:
        line, last = [row] + ([backbones.get(row, "")] if with_backbone else []), None
        for n in task_counts:
            agg, figure = cells.get((row, n)), published.get(row, {}).get(n)
            if figure:
                sources.add(figure[2])
            shown = f"{figure[0]:.1f} +- {figure[1]:.1f} [{figure[2]}]" if figure else ""
            if figure and len(figure) > 3 and figure[3] != "A_N":  # (A_inc: named in the cell)
                shown = f"{figure[0]:.1f} {figure[3]} [{figure[2]}]"
            if agg is None:
                line += ["...", "...", "..."] + (["..."] if with_omega else [])
                line += [shown] if n in with_published else []
                continue
            last = agg
            forgetting = agg.get("forgetting") or {}
            a_inc = agg.get("average_incremental_accuracy") or {}  # (results older than it)
            line += [_pm(agg["final_accuracy"]), _pm(a_inc or None), _pm(forgetting or None)]
            line += [_pm(agg.get("omega"))] if with_omega else []
            line += [shown] if n in with_published else []
            acc, omega = agg["final_accuracy"], agg.get("omega") or {}
            csv.append(",".join("" if v is None else str(v) for v in (
                row, n, first_task_classes, acc["mean"], acc["std"], a_inc.get("mean"),
                a_inc.get("std"),
                forgetting.get("mean"), forgetting.get("std"),
                omega.get("mean"), omega.get("std"), figure[0] if figure else None,
                figure[1] if figure else None, agg.get("memory", {}).get("values"),
                agg["train_seconds_per_batch"]["mean"], acc["n"])))
        memory = None if last is None else last.get("memory", {}).get("values")
        line.append("n/a" if memory is None else f"{memory / 1e6:.2f}")
        seconds = None if last is None else last["train_seconds_per_batch"]["mean"]
        line.append("..." if last is None else "n/a" if seconds is None else f"{seconds:.4f}")
        md.append("| " + " | ".join(line) + " |")
    notes = [f"[{key}] {sources_text[key]}." for key in sorted(sources)]
    if with_published:
        notes += [methods_lib._CLASSES[ROWS[row]["method"]].published_note for row in rows
                  if methods_lib._CLASSES[ROWS[row]["method"]].published_note]
    text = "\n".join(md) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")
    return text, "\n".join(csv) + "\n"


def comparison_panels(rows: list[str], task_counts: list[int], cells: dict,
                      first_task_classes: int = 0) -> dict:
    """{`tasks_label`: {row: (mean A_i, std A_i)}} of the cells done, for the comparison
    plot."""
    return {tasks_label(n, first_task_classes): {
        row: (cells[(row, n)]["A_global"]["mean"], cells[(row, n)]["A_global"]["std"])
        for row in rows if (row, n) in cells} for n in task_counts}


def main(argv):
    del argv
    logs.quiet_library_logs()
    rows = FLAGS.rows or TABLES[FLAGS.table]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise app.UsageError(f"unknown rows {unknown}; known: {sorted(ROWS)}")
    if FLAGS.parallel < 1:
        raise app.UsageError(f"--parallel={FLAGS.parallel}: pass 1 or more")
    task_counts = [int(n) for n in FLAGS.tasks] if FLAGS.tasks else [FLAGS.config.num_tasks]
    workdir = pathlib.Path(FLAGS.workdir)
    rows = sorted(rows, key=lambda r: r != "upper_bound")  # upper bound first, for Omega
    try:
        if FLAGS.parallel > 1:
            table = run_cells_in_processes(rows, task_counts, workdir, FLAGS.parallel,
                                           tuple(FLAGS.allow_changed))
        else:
            with Session() as session:  # the table's runs compile each program once
                session.stop.install()
                table = run_cells(rows, task_counts, workdir, session,
                                  tuple(FLAGS.allow_changed))
    except KeyboardInterrupt:
        logging.warning("stopped; rerun the same command to resume the table")
        raise SystemExit(130)
    except parallel.JobFailed as err:
        raise SystemExit(f"error: {err}") from None
    except Exception as err:  # noqa: BLE001 (a failure the user can fix is one line)
        message = errors.one_line(err)
        if message is None:
            raise
        raise SystemExit(message) from None
    config_line = json.dumps({k: FLAGS.config[k] for k in ("dataset", "model", "epochs",
                                                           "repeats")})
    print(f"\n{config_line}\n{table}")


def cell_runs(rows: list[str], task_counts: list[int], workdir: pathlib.Path,
              share_first_tasks: bool = True) -> list:
    """`((row, num_tasks), config, cell workdir)` of every cell, in the order a table runs
    them: per task count, the upper bound first (its results.json gives the others Omega).
    With `share_first_tasks`, a row whose method keeps its first task starts from the first
    such row's of its column that trained the same first task (`first_task.fingerprint`)."""
    cells = []
    for n in task_counts:
        folder = workdir / f"tasks_{n}" if FLAGS.tasks else workdir
        trained = {}  # first-task fingerprint -> the cell that trains it
        for row in rows:
            overrides = {"num_tasks": n, **ROWS[row]}
            if row != "upper_bound" and "upper_bound" in rows:
                overrides["upper_bound_results"] = str(folder / "upper_bound" / "results.json")
            config = experiment.config_with(FLAGS.config, overrides)
            method = methods_lib._CLASSES[config.method]
            if share_first_tasks and method.keeps_first_task:
                spec = data_lib.spec_of(config)
                key = json.dumps(first_task.fingerprint(
                    config, methods_lib.get_method(config, spec), spec), sort_keys=True)
                if key in trained:
                    config = experiment.config_with(config, {"first_task_from": trained[key]})
                else:
                    trained[key] = str(folder / row)
            cells.append(((row, n), config, folder / row))
    return cells


def write_table(workdir: pathlib.Path, rows: list[str], task_counts: list[int],
                cells: dict) -> str:
    """table.md, table.csv and comparison.png of the cells done; returns the Markdown."""
    first = FLAGS.config.first_task_classes
    published, sources = methods_lib.published(FLAGS.config.dataset, first)
    backbones = {row: ROWS[row].get("model", FLAGS.config.model) for row in rows}
    table, csv = format_table(rows, task_counts, cells, published, first, sources, backbones)
    workdir.mkdir(parents=True, exist_ok=True)
    files.write_file(workdir / "table.md", table)
    files.write_file(workdir / "table.csv", csv)
    reporting.write_comparison(
        workdir / "comparison.png", comparison_panels(rows, task_counts, cells, first),
        f"{FLAGS.config.dataset}: A_i per row (mean ± std over repeats)")
    return table


def run_cells(rows: list[str], task_counts: list[int], workdir: pathlib.Path,
              session: Session, allow_changed: tuple = ()) -> str:
    """Run (or resume) every cell in this process, one after another, rewriting the table
    after each; returns the Markdown table. `allow_changed`: as `experiment.run`'s."""
    cells = {}
    for key, config, cell in cell_runs(rows, task_counts, workdir):
        logging.info("row %s, %d tasks: %s", *key, cell)
        cells[key] = experiment.run(config, cell, session=session,
                                    allow_changed=allow_changed)["aggregate"]
        table = write_table(workdir, rows, task_counts, cells)
    return table


def run_cells_in_processes(rows: list[str], task_counts: list[int], workdir: pathlib.Path,
                           processes: int, allow_changed: tuple = ()) -> str:
    """Run (or resume) every cell's repeats, `processes` at a time, each in a process of its
    own (`abd_jax.parallel`; a cell of R > 1 repeats keeps repeat r in `<cell>/repeat_<r>/`),
    the upper bounds first; the table is rewritten as each cell completes. Returns it."""
    cells, table = {}, ""
    plan = cell_runs(rows, task_counts, workdir, share_first_tasks=False)  # (run at once)
    for wave in ([c for c in plan if c[0][0] == "upper_bound"],
                 [c for c in plan if c[0][0] != "upper_bound"]):
        jobs, cell_of, left = [], {}, {}
        for key, config, cell in wave:
            if parallel.finished(config, cell):  # (also a cell run in one process)
                cells[key] = json.loads((cell / "results.json").read_text())["aggregate"]
                continue
            cell_jobs = parallel.repeat_jobs(f"{key[0]} {key[1]} tasks", config, cell,
                                             workdir / "logs", allow_changed)
            jobs += cell_jobs
            left[key] = len(cell_jobs)
            cell_of.update({job.name: (key, config, cell) for job in cell_jobs})

        def on_done(job, job_ran):
            nonlocal table
            key, config, cell = cell_of[job.name]
            logging.info("%s: %s", job.name, "done" if job_ran else "finished before")
            left[key] -= 1
            if not left[key]:
                cells[key] = parallel.merge_repeats(config, cell)["aggregate"]
                table = write_table(workdir, rows, task_counts, cells)

        if jobs:
            logging.info("running %d jobs, %d at a time; their logs: %s", len(jobs),
                         processes, workdir / "logs")
            parallel.run_jobs(jobs, processes, on_done)
    return table or write_table(workdir, rows, task_counts, cells)


def define_flags() -> None:
    """The command line (defined only when run as a script, so tests can import it)."""
    config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Folder for the rows' workdirs and table.md.")
    flags.DEFINE_enum("table", "methods", sorted(TABLES), "Which predefined list of rows.")
    flags.DEFINE_list("rows", None, f"Explicit rows instead of --table; known: {sorted(ROWS)}")
    flags.DEFINE_integer("parallel", 1, "Runs at once, each in a process of its own with an "
                         "even share of each accelerator's memory: the repeats of a cell "
                         "(repeat r in <cell>/repeat_<r>/) and the cells; 1: one after "
                         "another in this process.")
    flags.DEFINE_list("allow_changed", [], "Result fields the rows' resumed runs may change, "
                      "logged in each row's config_changes.jsonl (e.g. lr after a divergence; "
                      "as abd_jax.main's flag).")
    flags.DEFINE_list("tasks", None, "Task counts, one column each (e.g. 5,10,20; default: the "
                      "config's num_tasks).")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
