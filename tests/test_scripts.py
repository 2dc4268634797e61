"""The experiment scripts run as a user would run them (tiny settings)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import xla_flags

pytestmark = pytest.mark.slow  # the full tier: the scripts in processes of their own

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"}
# The benchmark runs a step or two of each program (the GPU session's try-out, a few): LLVM -O0
# compiles them sooner (the three step-table runs below: 45 -> 27 CPU-s, run one at a time).
BENCHMARK_ENV = {**ENV, "XLA_FLAGS": xla_flags(llvm_opt_level=0)}


TINY_BENCHMARK = ["experiments/benchmark.py", "--model=resnet8", "--image_size=8",
                  "--batch_size=8", "--steps=1", "--num_classes=10"]


def _run(args, env=ENV, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_benchmark_prints_every_step_kind():
    out = _run([*TINY_BENCHMARK, "--repeats=1"], BENCHMARK_ENV)
    assert "backend cpu" in out
    for name in ("task 1 (CE)", "LwF", "ABD task 2", "DeepInversion", "generator iteration",
                 "projected 10-task"):
        assert name in out, out


def test_benchmark_ladder_profile_and_vmapped_repeats(tmp_path):
    out = _run([*TINY_BENCHMARK, "--repeats=2", "--steps_per_call=2", "--ladder=ce",
                "--cases=ce", "--conv_impls=im2col", "--vmap_repeats=2",
                f"--profile_dir={tmp_path / 'prof'}", f"--json_out={tmp_path / 'b.json'}"],
               BENCHMARK_ENV)
    for rung in ("forward only", "input gradient", "forward + backward", "optimiser update",
                 "batch sampling", "augmentation", "fused lax.scan (2 steps/call)",
                 "2 vmapped repeats: ce", "top host ops"):
        assert rung in out, out
    assert "RECOMPILED" not in out and "vmapped repeats: abd" not in out, out  # (--cases=ce)
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {r["conv_impl"] for r in rows} == {"im2col"}
    assert all(len(r["ms"]) == 2 and r["ms_min"] <= r["ms_median"] <= r["ms_max"] for r in rows)


def test_benchmark_reports_a_recompilation_while_timed(tmp_path):
    """An uncommitted initial state makes the second call compile again inside the first
    measurement; the benchmark must say so."""
    out = _run([*TINY_BENCHMARK, "--repeats=1", "--cases=ce", "--put_state=False",
                "--conv_impls=xla", f"--json_out={tmp_path / 'b.json'}"], BENCHMARK_ENV)
    assert "RECOMPILED while timed" in out, out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["conv_impl"], r["recompiled"]) for r in rows] == [("xla", True)]


def test_benchmark_stream_mode_times_each_worker_count(digits_data_dir):
    out = _run(["experiments/benchmark.py", "--mode=stream", "--config=configs/digits.py",
                f"--config.data_dir={digits_data_dir}", "--stream_workers=0", "--steps=2",
                "--repeats=2", "--batch_size=32"])
    assert "dataset digits: 1442 training images (8, 8, 1), batch 32" in out, out
    assert out.splitlines()[-1].split()[0] == "0", out  # the row of 0 workers


def test_benchmark_analytic_mode_times_host_and_device():
    out = _run(["experiments/benchmark.py", "--mode=analytic", "--expansion=16",
                "--analytic_batch=8", "--num_classes=4", "--repeats=2"], BENCHMARK_ENV)
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [(r[0], r[1]) for r in rows] == [("ACIL", "host"), ("ACIL", "device"),
                                            ("DS-AL", "host"), ("DS-AL", "device")], out
    assert all(float(r[-3]) <= float(r[-2]) <= float(r[-1]) for r in rows), out


def test_gpu_session_tried_on_the_cpu_times_a_full_run_and_goes_on_where_it_stopped(tmp_path):
    """`TINY=1`: the full-run part on a digits-shaped random run; the release part skipped
    (no release); the next call skips the finished part."""
    script = REPO / "experiments" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = {**BENCHMARK_ENV, "TINY": "1", "PARTS": "full_run,release", "PYTHON": sys.executable,
           "STATE": str(tmp_path / "state"), "RELEASE": str(tmp_path / "no_release")}

    def session(out):
        proc = subprocess.run(["bash", script, "300", tmp_path / out], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return (tmp_path / out / "session.log").read_text()

    log = session("out1")
    assert "method abd, 2 tasks, 1 epochs/task, 4 generator iterations/task" in log, log
    assert "segment 1: " in log and ", finished" in log, log
    assert f"release: skipped, {tmp_path / 'no_release'} holds no release" in log, log
    listed = subprocess.run(["tar", "-tf", tmp_path / "out1" / "results.tar"],
                            capture_output=True, text=True).stdout.split()
    assert {"results/full_run.done", "results/full_run_segments.txt",
            "results/full_run_results.json", "results/release.log"} <= set(listed), listed
    log = session("out2")
    assert "full_run: done in an earlier call" in log and "segment 2" not in log, log


def test_release_bench_asks_for_the_release_on_pythonpath():
    proc = subprocess.run([sys.executable, "experiments/release_bench.py", "--device=cpu"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "PYTHONPATH=<checkout of GT-RIPL/AlwaysBeDreaming-DFCIL>" in proc.stderr, proc.stderr


def test_run_table_writes_one_row_per_method_and_a_column_per_task_count(digits_data_dir,
                                                                         tmp_path):
    out = _run(["experiments/run_table.py", "--config=configs/digits.py",
                f"--workdir={tmp_path}", "--rows=base,abd_no_ft_ce,bic", "--config.epochs=1",
                "--config.synthesis.iterations=4", f"--config.data_dir={digits_data_dir}",
                "--tasks=2,1"])
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("| row | A_N (%), 2 tasks | A_inc (%), 2 tasks | F (%), 2 tasks | "
                            "A_N (%), 1 tasks | A_inc (%), 1 tasks | F (%), 1 tasks | "
                            "memory (M values)")
    assert "| base |" in table and "| abd_no_ft_ce |" in table and table in out
    assert "| bic |" in table and "..." not in table and "published" not in table  # (digits)
    png = (tmp_path / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert (tmp_path / "tasks_2" / "abd_no_ft_ce" / "results.json").exists()
    csv = (tmp_path / "table.csv").read_text().splitlines()
    assert len(csv) == 1 + 3 * 2 and csv[1].startswith("base,2,")


def _run_table_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_table", REPO / "experiments" /
                                                  "run_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_layout_cells_forgetting_omega_published_and_pending():
    agg = lambda a, o=None: {"final_accuracy": {"mean": a, "std": 1.0, "n": 3},
                             "average_incremental_accuracy": {"mean": a + 5, "std": 0.5},
                             "forgetting": {"mean": 80.0 - a, "std": 2.0, "n": 3},
                             "train_seconds_per_batch": {"mean": 0.5},
                             "memory": {"values": 2e6}, **({"omega": {"mean": o, "std": 0.01}}
                                                           if o is not None else {})}
    cells = {("upper_bound", 5): agg(70.0), ("abd", 5): agg(40.0, 0.62),
             ("upper_bound", 10): agg(65.0)}
    module = _run_table_module()
    from abd_jax import methods
    md, csv = module.format_table(["upper_bound", "abd", "rdfcil"], [5, 10], cells,
                                  {"abd": {5: (43.9, 0.9, "ABD")}}, 0, {"ABD": "the paper"})
    lines = md.splitlines()
    assert lines[0] == ("| row | A_N (%), 5 tasks | A_inc (%), 5 tasks | F (%), 5 tasks | "
                        "Omega, 5 tasks | published A_N (%), 5 tasks | A_N (%), 10 tasks | "
                        "A_inc (%), 10 tasks | F (%), 10 tasks | Omega, 10 tasks | "
                        "memory (M values) | s / batch |")
    assert lines[2] == ("| upper_bound | 70.00 +- 1.00 | 75.00 +- 0.50 | 10.00 +- 2.00 | n/a |  | "
                        "65.00 +- 1.00 | 70.00 +- 0.50 | 15.00 +- 2.00 | n/a | 2.00 | 0.5000 |")
    assert lines[3] == ("| abd | 40.00 +- 1.00 | 45.00 +- 0.50 | 40.00 +- 2.00 | 0.62 +- 0.01 | "
                        "43.9 +- 0.9 [ABD] | ... | ... | ... | ... | 2.00 | 0.5000 |")
    assert lines[4] == ("| rdfcil | ... | ... | ... | ... |  | ... | ... | ... | ... | n/a "
                        "| ... |")
    assert lines[6] == "[ABD] the paper."
    assert lines[7] == methods._CLASSES["rdfcil"].published_note
    assert csv.splitlines()[1:] == [
        "upper_bound,5,0,70.0,1.0,75.0,0.5,10.0,2.0,,,,,2000000.0,0.5,3",
        "upper_bound,10,0,65.0,1.0,70.0,0.5,15.0,2.0,,,,,2000000.0,0.5,3",
        "abd,5,0,40.0,1.0,45.0,0.5,40.0,2.0,0.62,0.01,43.9,0.9,2000000.0,0.5,3"]
    # warm start: both names of the protocol in the header, B in the CSV
    md, csv = module.format_table(["abd"], [6], {("abd", 6): agg(40.0)}, None, 50)
    assert md.splitlines()[0].startswith("| row | A_N (%), 6 tasks (B50 + 5) | A_inc (%), 6 ")
    assert csv.splitlines()[1].startswith("abd,6,50,40.0,")
    md, _ = module.format_table(["abd"], [5], cells)  # no published figures: no column
    assert "published" not in md and "[ABD]" not in md
    untimed = {("abd", 5): {**agg(40.0), "train_seconds_per_batch": {"mean": None}}}
    assert module.format_table(["abd"], [5], untimed)[0].splitlines()[2].endswith("| n/a |")


def test_the_methods_give_the_tables_rows_and_published_figures():
    """run_table's rows, tables and published column come from the methods: a method is a
    row of the tables it lists, in `rank` order, with its variants after it; every figure it
    lists names a known source."""
    from abd_jax import methods
    module = _run_table_module()
    assert module.TABLES["coreset"] == ["upper_bound", "naive_rehearsal", "lwf_coreset", "e2e",
                                        "bic"]
    assert module.TABLES["ablations"][:2] == ["abd", "abd_no_task_balancing"]
    assert module.ROWS["abd_no_ft_ce"] == {"method": "abd", "abd.ft_ce": False}
    assert set(methods.METHODS) <= set(module.ROWS)
    figures, sources = methods.published("cifar100", 0)
    assert figures["abd"][10] == (33.7, 1.2, "ABD", "A_N") and "lwf_synthetic" not in figures
    warm, _ = methods.published("cifar100", 50)
    assert "abd" not in warm and warm["fecam"][6][3] == "A_inc"  # ABD's figures: cold start
    for row, by_tasks in [*figures.items(), *warm.items()]:
        assert row in module.ROWS
        assert all(source in sources and metric in ("A_N", "A_inc")
                   for _, _, source, metric in by_tasks.values())


def test_comparison_plot_has_a_panel_per_task_count_and_a_line_per_row(tmp_path):
    from abd_jax import reporting
    cells = {(row, n): {"A_global": {"mean": [90.0 - k * 10] * n, "std": [1.0] * n}}
             for k, row in enumerate(("abd", "rdfcil")) for n in (2, 3)}
    panels = _run_table_module().comparison_panels(["abd", "rdfcil"], [2, 3], cells)
    fig = reporting.comparison_figure(panels, "t")
    assert [ax.get_title() for ax in fig.axes] == ["2 tasks", "3 tasks"]
    for ax, n in zip(fig.axes, (2, 3)):
        assert [line.get_label() for line in ax.get_lines()] == ["abd", "rdfcil"]
        assert list(ax.get_lines()[1].get_ydata()) == [80.0] * n
        assert ax.get_ylim() == (0, 100)
