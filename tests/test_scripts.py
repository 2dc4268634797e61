"""The experiment scripts run as a user would run them (tiny settings)."""
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


def test_run_table_writes_one_row_per_method(tmp_path):
    out = _run(["experiments/run_table.py", "--config=configs/digits.py",
                f"--workdir={tmp_path}", "--rows=base,abd_no_ft_ce", "--config.epochs=1",
                "--config.synthesis.iterations=4", f"--config.data_dir={tmp_path / 'tfds'}"])
    table = (tmp_path / "table.md").read_text()
    assert "| base |" in table and "| abd_no_ft_ce |" in table and table in out
    assert (tmp_path / "abd_no_ft_ce" / "results.json").exists()
