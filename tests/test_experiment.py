"""End to end: the task loop on the real digits TFDS dataset, results, resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from abd_jax import experiment
from abd_jax import metrics as metrics_lib
from helpers import tiny_config, xla_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["base", "lwf", "abd", "deepinversion"])
def test_digits_runs_all_tasks_and_writes_results(digits_data_dir, tmp_path, method):
    # ABD's whole loop (learner, generator, evaluation) data-parallel over the 4 simulated
    # devices; the others on one (tests/test_train.py compares 1 and 4 devices step by step).
    results = experiment.run(tiny_config(digits_data_dir, method=method,
                                         num_devices=0 if method == "abd" else 1), tmp_path)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["num_tasks"] == 5
    rep = stored["repeats"][0]
    R = np.array(rep["R_global"], dtype=float)
    assert R.shape == (5, 5) and not np.isnan(np.tril(R)).any()
    assert np.isnan(np.triu(R, 1)[np.triu_indices(5, 1)]).all()
    assert 0 <= rep["final_accuracy"] <= 100
    # Two epochs of plain CE on 2 digit classes reach > 80%; the newest task is learned
    # (well above the 10% chance of 10 classes; ABD down-weights it to w = 1 - 8/10).
    assert R[0, 0] > 80 and R[4, 4] > 50
    assert rep["train_seconds_per_batch"] > 0 and len(rep["task_wall_seconds"]) == 5
    assert results["aggregate"]["final_accuracy"]["mean"] == pytest.approx(
        rep["final_accuracy"])
    assert "Final accuracy A_N" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in line for line in lines)
    board = tmp_path / "tensorboard" / "repeat_0"
    assert list((board / "task_1" / "train").glob("events.out.tfevents.*"))
    assert list((board / "eval").glob("events.out.tfevents.*"))
    if method == "lwf":
        assert any("kd" in line for line in lines)
    if method in ("abd", "deepinversion"):
        generator_lines = [line for line in lines if line.get("phase") == "generator"]
        assert {"content", "diversity", "stat_alignment", "smoothness"} <= set(
            generator_lines[0])
        assert len({line["task"] for line in generator_lines}) == 4  # after tasks 1..4
        for t in range(1, 5):
            png = tmp_path / f"samples_repeat0_task{t}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repeats_and_omega(digits_data_dir, tmp_path):
    upper = experiment.run(tiny_config(digits_data_dir, method="upper_bound", epochs=1,
                                       num_tasks=2, repeats=2), tmp_path / "ub")
    assert upper["aggregate"]["final_accuracy"]["n"] == 2
    orders = [tuple(r["class_order"]) for r in upper["repeats"]]
    assert orders[0] != orders[1]  # one class order per seed
    base = experiment.run(tiny_config(digits_data_dir, epochs=1, num_tasks=2,
                                      upper_bound_results=str(tmp_path / "ub" / "results.json")),
                          tmp_path / "base")
    a, a_ub = np.array(base["repeats"][0]["A_global"]), np.array(upper["A_mean"])
    assert base["repeats"][0]["omega"] == pytest.approx(np.mean(a / a_ub))
    assert "Omega" in (tmp_path / "base" / "summary.md").read_text()


def test_each_jitted_function_compiles_once_per_run(digits_data_dir, tmp_path):
    """A recompilation between tasks or chunks (a changed input type, shape or sharding)
    would cost seconds each time and pollute the timings; every task must reuse the
    learner's and the generator's compiled chunks. With compile_ahead, what the background
    threads compiled must be what the run then calls (else the caches would hold two)."""
    import logging

    from abd_jax import metrics, programs
    programs.clear()  # (an earlier test in this process may have compiled the same programs)
    config = tiny_config(digits_data_dir, method="abd", epochs=1, compile_ahead=True)
    splits = experiment.load_splits(config)
    lowered = []  # (thread, program) of every lowering JAX logs: once per distinct signature
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lowered.append(
        (record.threadName, record.getMessage().split()[1]))
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        with metrics.MetricWriter(tmp_path / "metrics.jsonl") as writer:
            runner = experiment.RepeatRunner(config, tmp_path, splits, experiment.make_mesh(),
                                             writer, 0)
            runner.run()
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(handler)
    runner.checkpointer.close()
    learner_chunks = list(runner._chunk_fns.values())  # task 1's CE, then ABD's loss
    generator_chunk = runner.method.synthesizer(runner.rt).fused_step
    assert len(learner_chunks) == 2
    assert [fn._cache_size() for fn in [*learner_chunks, generator_chunk, runner.predict]] == [
        1, 1, 1, 1]
    assert sorted(runner.compiled_ahead) == ["evaluation", "generator step",
                                             "learner chunk of task 2", "plotting fonts"]
    assert all(v.startswith("ready") for v in runner.compiled_ahead.values()), \
        runner.compiled_ahead
    # The run itself lowered only task 1's chunk; the rest was lowered ahead, in other threads.
    in_main = [name for thread, name in lowered if thread == "MainThread"]
    assert in_main.count("jit(train_chunk)") == 1, lowered
    assert "jit(predict)" not in in_main and "jit(single)" not in in_main, lowered
    assert {name for thread, name in lowered if thread.startswith("ahead:")} == {
        "jit(train_chunk)", "jit(predict)", "jit(single)"}, lowered


def _matrices(results):
    return [(r["R_global"], r["R_local"]) for r in results["repeats"]]


@pytest.mark.parametrize("method", ["lwf", "abd"])
def test_interrupt_and_resume_gives_identical_results(digits_data_dir, tmp_path, monkeypatch,
                                                      method):
    config = tiny_config(digits_data_dir, method=method, num_tasks=2, epochs=3,
                         checkpoint_every_steps=8)
    reference = experiment.run(config, tmp_path / "straight")

    # Interrupt in the middle of task 2 (as Ctrl-C / SIGTERM would), then rerun.
    real = experiment.RepeatRunner._log
    calls = {"n": 0}

    def interrupting_log(self, t, *args):
        real(self, t, *args)
        calls["n"] += 1
        if t == 1 and calls["n"] > 24:
            raise KeyboardInterrupt

    monkeypatch.setattr(experiment.RepeatRunner, "_log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "results.json").exists()
    monkeypatch.setattr(experiment.RepeatRunner, "_log", real)
    resumed = experiment.run(config, tmp_path / "resumed")
    assert _matrices(resumed) == _matrices(reference)


def test_killed_process_resumes_from_periodic_checkpoint(digits_data_dir, tmp_path):
    """SIGKILL (no chance to save) mid-run; the rerun resumes from the last periodic
    checkpoint and matches an uninterrupted run of the same command."""
    args = [sys.executable, "-m", "abd_jax.main", "--config=configs/digits.py",
            f"--workdir={tmp_path / 'killed'}", f"--config.data_dir={digits_data_dir}",
            "--config.num_tasks=2", "--config.epochs=2", "--config.checkpoint_every_steps=8",
            "--config.log_every_steps=4", "--config.num_devices=1", "--config.method=lwf"]
    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / "killed" / "checkpoints" / "repeat_0"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpt_dir.glob("*") if p.name.isdigit()] if ckpt_dir.exists() else []
        if any(0 < int(p.name) < 1000 for p in done):  # a periodic checkpoint in task 1
            break
        time.sleep(0.2)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "results.json").exists()
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming repeat 0" in rerun.stderr
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    # The reference runs in the same environment (one host device, as above): XLA:CPU's
    # matrix products may sum in a different order with another thread/device layout.
    straight = [a.replace(str(tmp_path / "killed"), str(tmp_path / "reference")) for a in args]
    done = subprocess.run(straight, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = json.loads((tmp_path / "reference" / "results.json").read_text())
    assert _matrices(resumed) == _matrices(reference)


def test_workdir_with_another_config_is_refused(digits_data_dir, tmp_path):
    experiment.run(tiny_config(digits_data_dir, epochs=1, num_tasks=2), tmp_path)
    with pytest.raises(ValueError, match="different configuration.*epochs"):
        experiment.run(tiny_config(digits_data_dir, epochs=2, num_tasks=2), tmp_path)


def test_nan_loss_stops_with_the_step(digits_data_dir, tmp_path):
    with pytest.raises(FloatingPointError, match=r"task 1 step \d+"):
        experiment.run(tiny_config(digits_data_dir, lr=1e30), tmp_path)


@pytest.mark.parametrize("overrides,message", [
    ({"method": "nope"}, "choose one of"),
    ({"dataset": "mnist"}, "known datasets"),
    ({"num_tasks": 3}, "valid task counts"),
    ({"model": "resnet7"}, "6n\\+2"),
    ({"batch_size": 30, "num_devices": 0}, "divisible by the 4 devices"),
    ({"class_order": "1,2"}, "permutation"),
])
def test_bad_configs_name_the_fix(digits_data_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        experiment.run(tiny_config(digits_data_dir, **overrides), tmp_path)


def test_missing_prepared_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="abd_jax.prepare_data --dataset=cifar10"):
        experiment.run(tiny_config(str(tmp_path / "empty"), dataset="cifar10", download=False,
                                   model="resnet8"), tmp_path / "run")


def test_task_accuracies_global_local_and_top5_by_hand():
    bounds = [(0, 2), (2, 4), (4, 6)]
    # 3 test images of task 1 (labels 0, 1, 1) and 1 of task 2 (label 3), after task 2
    # (K_new = 4: logit columns 4-5 must be ignored even where they are largest).
    logits = np.array([[5, 1, 0, 0, 9, 9],    # label 0: global hit
                       [5, 1, 0, 0, 9, 9],    # label 1: global miss, local miss, top-5 hit
                       [0, 1, 2, 0, 9, 9],    # label 1: global miss (2), local hit
                       [0, 0, 4, 3, 9, 9]],   # label 3: global miss (2), local miss
                      np.float32)
    labels = np.array([0, 1, 1, 3])
    (g1, l1, t1), (g2, l2, t2) = experiment.task_accuracies(logits, labels, bounds, 1)
    assert (g1, l1, t1) == pytest.approx((100 / 3, 200 / 3, 100.0))
    assert (g2, l2, t2) == (0.0, 0.0, 100.0)
    # 7 valid classes, top-5 excludes the two smallest logits
    bounds7 = [(0, 7)]
    z = np.array([[6, 5, 4, 3, 2, 1, 0], [6, 5, 4, 3, 2, 1, 0]], np.float32)
    assert experiment.task_accuracies(z, np.array([4, 5]), bounds7, 0)[0][2] == 50.0


def test_a_run_on_the_first_classes_of_the_order(digits_data_dir, tmp_path):
    config = tiny_config(digits_data_dir, method="lwf", num_tasks=3, num_classes=6,
                         epochs=1)
    results = experiment.run(config, tmp_path)
    rep = results["repeats"][0]
    assert len(rep["R_global"]) == 3 and len(rep["class_order"]) == 10
    splits = experiment.load_splits(config)
    with metrics_lib.MetricWriter(tmp_path / "probe.jsonl") as writer:
        runner = experiment.RepeatRunner(config, tmp_path / "probe", splits,
                                         experiment.make_mesh(1), writer, 0)
        runner.checkpointer.close()
    assert runner.bounds == [(0, 2), (2, 4), (4, 6)]
    assert runner.model.num_classes == 6
    used = set(rep["class_order"][:6])
    assert all(splits.train_labels[i] in used
               for t in range(3) for i in runner.rt.task_indices(t))
    for bad, message in ((11, "between 1 and"), (7, "valid task counts")):
        config = tiny_config(digits_data_dir, num_tasks=3, num_classes=bad)
        with pytest.raises(ValueError, match=message):
            experiment.validate_config(config, 1)
