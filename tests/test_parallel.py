"""`run_table.py --parallel`: repeats and cells in processes of their own give the numbers of
one process, stop together on Ctrl-C and resume; a failing job is one line naming it."""
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from abd_jax import experiment, parallel
from abd_jax.preemption import StopRequests
from configs import digits
from helpers import xla_flags

pytestmark = pytest.mark.slow  # the full tier: whole runs in processes of their own

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"}
SETTINGS = {"epochs": 2, "num_tasks": 2, "num_classes": 4, "repeats": 2, "num_devices": 1}


def _table(workdir, data_dir, *extra):
    return [sys.executable, "experiments/run_table.py", "--config=configs/digits.py",
            f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--parallel=2",
            *[f"--config.{k}={v}" for k, v in SETTINGS.items()], *extra]


def _wait_for(paths, text, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if all(p.exists() and text in p.read_text() for p in paths):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in every one of {paths} (status {proc.poll()})")


def test_a_stopped_parallel_table_resumes_to_the_numbers_of_one_process(
        digits_data_dir, tmp_path, session):
    """Two repeats of LwF, one process each: Ctrl-C as both start training stops both with a
    checkpoint (exit 130); the same command resumes them, and the merged results equal a run
    of both repeats in one process, Omega included."""
    workdir = tmp_path / "table"
    command = _table(workdir, digits_data_dir, "--rows=upper_bound,lwf")
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    logs = [workdir / "logs" / f"lwf_2_tasks_repeat{r}.log" for r in (0, 1)]
    _wait_for(logs, "task 1 training", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "rerun the same command to resume the table" in err
    saved = []
    for log in logs:
        assert "stopped; rerunning the table resumes" in log.read_text(), log.read_text()
        saved.append("stop requested: saving a checkpoint" in log.read_text())

    upper_logs = sorted((workdir / "logs").glob("upper_bound_*.log"))
    upper_text = [log.read_text() for log in upper_logs]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(upper_logs) == 2 and [log.read_text() for log in upper_logs] == upper_text, \
        "the finished upper bound ran again"
    for log, checkpointed in zip(logs, saved):  # (a stop before the first step saves none)
        assert ("resuming repeat" in log.read_text()) == checkpointed
    merged = json.loads((workdir / "lwf" / "results.json").read_text())

    config = experiment.config_with(digits.get_config(), {
        **SETTINGS, "data_dir": digits_data_dir, "method": "lwf",
        "upper_bound_results": str(workdir / "upper_bound" / "results.json")})
    alone = experiment.run(config, tmp_path / "alone", session=session)
    assert [r["R_global"] for r in merged["repeats"]] == [r["R_global"] for r in alone["repeats"]]
    assert [r["seed"] for r in merged["repeats"]] == [0, 1]
    for key in ("final_accuracy", "forgetting", "omega"):
        assert merged["aggregate"][key] == alone["aggregate"][key], key
    assert merged["config"]["repeats"] == 2 and merged["config"]["first_repeat"] == 0
    assert "| lwf |" in (workdir / "table.md").read_text()

    # Rerun once finished: no job starts and no file changes (the table's neither).
    results = sorted(p for p in workdir.rglob("*") if p.is_file())
    assert {"table.md", "table.csv", "comparison.png"} <= {p.name for p in results}
    stamps = [p.stat().st_mtime_ns for p in results]
    again = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not re.search(r"running \d+ jobs", again.stderr), again.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in results] == stamps


def test_a_failing_job_is_one_line_naming_it_and_its_log(digits_data_dir, tmp_path):
    done = subprocess.run(_table(tmp_path, digits_data_dir, "--rows=lwf",
                                 "--config.num_tasks=3"),
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: lwf 3 tasks, repeat 0: ") or last.startswith(
        "error: lwf 3 tasks, repeat 1: "), last
    assert "valid task counts" in last and "(its log: " in last, last


def test_a_job_stops_when_told_or_when_its_caller_is_gone():
    """A job's control pipe: "stop" is a stop request (once, as a signal's); the caller's end
    closing (it died) is one too."""
    for how in ("stop", "close"):
        receive, send = multiprocessing.Pipe(duplex=False)
        session = types.SimpleNamespace(stop=StopRequests())
        if how == "stop":
            send.send("stop")
        send.close()
        parallel._follow(receive, session)
        assert session.stop.signal == signal.SIGTERM, how


def test_repeats_split_into_jobs_of_one_repeat_each(tmp_path):
    config = experiment.config_with(digits.get_config(), {"repeats": 3, "first_repeat": 2})
    jobs = parallel.repeat_jobs("abd 5 tasks", config, tmp_path / "abd", tmp_path / "logs",
                                allow_changed=("lr",))
    assert [(j.config.repeats, j.config.first_repeat) for j in jobs] == [(1, 2), (1, 3), (1, 4)]
    assert [j.allow_changed for j in jobs] == [("lr",)] * 3
    assert [j.workdir.name for j in jobs] == ["repeat_2", "repeat_3", "repeat_4"]
    assert [j.log.name for j in jobs] == [f"abd_5_tasks_repeat{r}.log" for r in (2, 3, 4)]
    one = experiment.config_with(config, {"repeats": 1})
    assert [(j.workdir, j.config) for j in parallel.repeat_jobs("x", one, tmp_path, tmp_path)] \
        == [(tmp_path, one)]
