"""The experiment scripts run as a user would run them (tiny settings)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def _run(args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_benchmark_prints_every_step_kind():
    out = _run(["experiments/benchmark.py", "--model=resnet8", "--batch_size=8", "--steps=1",
                "--repeats=1", "--num_classes=10"])
    assert "backend cpu" in out
    for name in ("task 1 (CE)", "LwF", "ABD task 2", "DeepInversion", "generator iteration",
                 "projected 10-task"):
        assert name in out, out


def test_benchmark_ladder_profile_and_vmapped_repeats(tmp_path):
    out = _run(["experiments/benchmark.py", "--model=resnet8", "--batch_size=8", "--steps=1",
                "--repeats=2", "--num_classes=10", "--steps_per_call=2", "--ladder=ce",
                "--cases=ce", "--conv_impls=xla,im2col", "--vmap_repeats=2",
                f"--profile_dir={tmp_path / 'prof'}", f"--json_out={tmp_path / 'b.json'}"])
    for rung in ("forward only", "input gradient", "forward + backward", "optimiser update",
                 "batch sampling", "augmentation", "fused lax.scan (2 steps/call)",
                 "2 vmapped repeats: ce", "top host ops"):
        assert rung in out, out
    assert "RECOMPILED" not in out, out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {r["conv_impl"] for r in rows} == {"xla", "im2col"}
    assert all(len(r["ms"]) == 2 and r["ms_min"] <= r["ms_median"] <= r["ms_max"] for r in rows)


def test_benchmark_reports_the_recompilation_of_issue_10():
    """Issue #10's numbers: an uncommitted initial state makes the second call compile again
    inside the first measurement; the benchmark must say so."""
    out = _run(["experiments/benchmark.py", "--model=resnet8", "--batch_size=8", "--steps=1",
                "--repeats=1", "--num_classes=10", "--cases=ce", "--put_state=False"])
    assert "RECOMPILED while timed" in out, out


def test_run_table_writes_one_row_per_method(tmp_path):
    out = _run(["experiments/run_table.py", "--config=configs/digits.py",
                f"--workdir={tmp_path}", "--rows=base,abd_no_ft_ce,bic", "--config.epochs=1",
                "--config.synthesis.iterations=4", f"--config.data_dir={tmp_path / 'tfds'}"])
    table = (tmp_path / "table.md").read_text()
    assert "| base |" in table and "| abd_no_ft_ce |" in table and table in out
    assert "memory (M values)" in table and "| bic |" in table
    assert (tmp_path / "abd_no_ft_ce" / "results.json").exists()
