"""Stop requests (SIGTERM, Ctrl-C): honoured between jitted calls in every phase, saved, and
resumed to the uninterrupted numbers and metrics log."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abd_jax import checkpoint as ckpt_lib
from abd_jax import evaluation, experiment, preemption, runner, services
from abd_jax.methods import synthetic_replay
from abd_jax.session import Session
from helpers import tiny_config, xla_flags

# One worker runs this file: its module-wide fixtures are built once (`--dist loadgroup`).
pytestmark = [pytest.mark.xdist_group("preemption"), pytest.mark.slow]


REPO = Path(__file__).resolve().parents[1]


def _request_stop_on_call(monkeypatch, stop, owner, name, at_call=1,
                          when=lambda *a, **k: True):
    """Wrap owner.name so that its `at_call`-th matching call first records a stop request in
    `stop` (a session's), as a SIGTERM arriving during that call would."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at_call:
                stop.request()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return real


def _log_lines(workdir):
    """metrics.jsonl without the wall-clock field."""
    lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "images_per_second"} for line in lines]


def _newest_position(workdir):
    checkpointer = ckpt_lib.RunCheckpointer(workdir / "checkpoints" / "repeat_0")
    try:
        return checkpointer.latest()
    finally:
        checkpointer.close()


def _abd_config(data_dir):
    return tiny_config(data_dir, method="abd", num_tasks=2)


@pytest.fixture(scope="module")
def reference(digits_data_dir, tmp_path_factory, session):
    """One uninterrupted ABD run (its results and metrics log)."""
    workdir = tmp_path_factory.mktemp("straight")
    results = experiment.run(_abd_config(digits_data_dir), workdir, session=session)
    return results, _log_lines(workdir)


RG, RS = runner.RepeatRunner, services.RepeatServices
_GENERATOR_LOG = lambda self, step, scalars, **tags: tags.get("phase") == "generator"
_TRAINING_LOG = lambda self, step, scalars, **tags: tags.get("task") and "phase" not in tags
PHASES = {  # phase: (owner, name, at_call, when, where the newest checkpoint must be)
    "first learner call": (RG, "_train", 2, None, lambda s: s < ckpt_lib.END_TASK),
    "mid learner": (RS, "log", 7, _TRAINING_LOG, lambda s: 0 < s < ckpt_lib.END_TASK),
    "first generator call": (synthetic_replay.Inversion, "program", 1, None,
                             lambda s: s == ckpt_lib.stage_step(0, 0)),
    "mid generator": (RS, "log", 1, _GENERATOR_LOG,
                      lambda s: s == ckpt_lib.stage_step(0, 10)),
    "evaluation": (evaluation, "predict_all", 2, None, lambda s: s == ckpt_lib.EVALUATE),
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_stop_request_saves_and_resumes_identically(digits_data_dir, tmp_path, monkeypatch,
                                                    reference, phase, session):
    owner, name, at_call, when, saved_at = PHASES[phase]
    # Compiling ahead (background threads, joined also when stopped) changes no number.
    config = _abd_config(digits_data_dir)
    config.compile_ahead = True
    with Session() as stopped:
        real = _request_stop_on_call(monkeypatch, stopped.stop, owner, name, at_call,
                                     when or (lambda *a, **k: True))
        with pytest.raises(preemption.Preempted):
            experiment.run(config, tmp_path, session=stopped)
    assert not (tmp_path / "results.json").exists()
    _, step = _newest_position(tmp_path)
    assert saved_at(step), ckpt_lib.id_to_position(step)
    monkeypatch.setattr(owner, name, real)
    resumed = experiment.run(config, tmp_path, session=session)
    results, lines = reference
    assert [r["R_global"] for r in resumed["repeats"]] == [
        r["R_global"] for r in results["repeats"]]
    assert _log_lines(tmp_path) == lines  # nothing logged twice, nothing missing


def test_stop_in_a_training_stage_of_an_end_of_task_hook(digits_data_dir, tmp_path,
                                                          monkeypatch, session):
    config = tiny_config(digits_data_dir, method="e2e", epochs=1, num_tasks=2)
    reference = experiment.run(config, tmp_path / "straight", session=session)
    with Session() as stopped:
        real = _request_stop_on_call(
            monkeypatch, stopped.stop, RS, "log",
            when=lambda self, step, scalars, **tags: tags.get("phase") == "balanced_finetuning")
        with pytest.raises(preemption.Preempted):
            experiment.run(config, tmp_path / "resumed", session=stopped)
    monkeypatch.setattr(RS, "log", real)
    resumed = experiment.run(config, tmp_path / "resumed", session=session)
    assert [r["R_global"] for r in resumed["repeats"]] == [
        r["R_global"] for r in reference["repeats"]]


def _launch(workdir, data_dir, *extra):
    args = [sys.executable, "-m", "abd_jax.main", "--config=configs/digits.py",
            f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.epochs=1",
            "--config.num_tasks=2",
            "--config.method=abd", "--config.synthesis.iterations=3000",
            "--config.synthesis.log_every=5", "--config.synthesis.checkpoint_every=100000",
            "--config.num_devices=1", *extra]
    return subprocess.Popen(args, cwd=REPO, env={**os.environ, "XLA_FLAGS": xla_flags()},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_generator(proc, workdir, timeout=300):
    deadline = time.time() + timeout
    log = workdir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and '"phase": "generator"' in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"no generator phase (rc {proc.poll()})")


def test_sigterm_during_synthesis_saves_the_generator_and_exits_130_quickly(digits_data_dir,
                                                                            tmp_path):
    proc = _launch(tmp_path, digits_data_dir)
    _wait_for_generator(proc, tmp_path)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert time.time() - sent < 20, "took longer than a scheduler's grace period"
    assert "Segmentation fault" not in stderr and "Exception ignored" not in stderr
    task, step = _newest_position(tmp_path)
    assert (task, ckpt_lib.END_TASK) < (task, step) < (task, ckpt_lib.EVALUATE), step


def test_the_handler_only_records_and_a_second_signal_exits_at_once(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stop = preemption.StopRequests()
    stop._on_signal(signal.SIGTERM, None)  # the handler: no exception, no exit
    assert stop.requested() and not exits
    with pytest.raises(preemption.Preempted, match="signal 15"):
        stop.check()
    stop._on_signal(signal.SIGINT, None)
    assert exits == [130] and "again: exiting now" in capsys.readouterr().err


def test_a_stop_between_two_log_lines_leaves_the_log_of_an_uninterrupted_run(
        digits_data_dir, tmp_path, monkeypatch, reference, session):
    """The stop lands after step 6 of task 1, inside the interval of steps 5-8 (a log line
    every 4 steps): the checkpoint keeps steps 5-6's metrics, and the resumed run logs step 8
    with the mean over 5-8, as the uninterrupted run does."""
    import dataclasses
    config = _abd_config(digits_data_dir)
    real, calls = RS.sgd_loop, {"n": 0}

    def sgd_loop(self, *args, **kwargs):
        loop = real(self, *args, **kwargs)

        def chunk(*chunk_args):
            calls["n"] += 1
            if calls["n"] == 6:  # (one step per call on CPU)
                self.session.stop.request()
            return loop.chunk(*chunk_args)

        return dataclasses.replace(loop, chunk=chunk)

    monkeypatch.setattr(RS, "sgd_loop", sgd_loop)
    with Session() as stopped, pytest.raises(preemption.Preempted):
        experiment.run(config, tmp_path, session=stopped)
    monkeypatch.setattr(RS, "sgd_loop", real)
    assert _newest_position(tmp_path) == (0, 6)
    resumed = experiment.run(config, tmp_path, session=session)
    results, lines = reference
    assert [r["R_global"] for r in resumed["repeats"]] == [
        r["R_global"] for r in results["repeats"]]
    assert _log_lines(tmp_path) == lines
