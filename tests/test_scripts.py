"""The experiment scripts run as a user would run them (tiny settings)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import xla_flags

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"}
# The benchmark runs a step or two of each program: LLVM -O0 compiles them sooner (the three
# benchmark runs below: 45 -> 27 CPU-s, run one at a time).
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


def test_run_table_writes_one_row_per_method_and_a_column_per_task_count(digits_data_dir,
                                                                         tmp_path):
    out = _run(["experiments/run_table.py", "--config=configs/digits.py",
                f"--workdir={tmp_path}", "--rows=base,abd_no_ft_ce,bic", "--config.epochs=1",
                "--config.synthesis.iterations=4", f"--config.data_dir={digits_data_dir}",
                "--tasks=2,1"])
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("| row | A_N (%), 2 tasks | A_N (%), 1 tasks | memory (M values)")
    assert "| base |" in table and "| abd_no_ft_ce |" in table and table in out
    assert "| bic |" in table and "..." not in table
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


def test_table_layout_cells_omega_and_pending():
    agg = lambda a, o=None: {"final_accuracy": {"mean": a, "std": 1.0, "n": 3},
                             "train_seconds_per_batch": {"mean": 0.5},
                             "memory": {"values": 2e6}, **({"omega": {"mean": o, "std": 0.01}}
                                                           if o is not None else {})}
    cells = {("upper_bound", 5): agg(70.0), ("abd", 5): agg(40.0, 0.62),
             ("upper_bound", 10): agg(65.0)}
    md, csv = _run_table_module().format_table(["upper_bound", "abd"], [5, 10], cells)
    lines = md.splitlines()
    assert lines[0] == ("| row | A_N (%), 5 tasks | Omega, 5 tasks | A_N (%), 10 tasks | "
                        "Omega, 10 tasks | memory (M values) | s / batch |")
    assert lines[2] == "| upper_bound | 70.00 +- 1.00 | n/a | 65.00 +- 1.00 | n/a | 2.00 | 0.5000 |"
    assert lines[3] == "| abd | 40.00 +- 1.00 | 0.62 +- 0.01 | ... | ... | 2.00 | 0.5000 |"
    assert csv.splitlines()[1:] == ["upper_bound,5,70.0,1.0,,,2000000.0,0.5,3",
                                    "upper_bound,10,65.0,1.0,,,2000000.0,0.5,3",
                                    "abd,5,40.0,1.0,0.62,0.01,2000000.0,0.5,3"]
