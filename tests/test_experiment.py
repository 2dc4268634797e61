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

from abd_jax import config as config_lib
from abd_jax import driver, evaluation, experiment, plan, reporting, runner, services, train
from abd_jax.session import Session
from helpers import tiny_config, xla_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_seconds_per_batch_is_unknown_when_no_step_was_timed(digits_data_dir, tmp_path,
                                                              session):
    """Each loop in one call (log interval past its end): that call's time includes the
    compilation and is not counted, so there is no time per batch, rather than 0."""
    results = experiment.run(tiny_config(digits_data_dir, method="base", epochs=1,
                                         num_tasks=2, log_every_steps=10_000),
                             tmp_path, session=session)
    assert results["repeats"][0]["train_seconds_per_batch"] is None
    assert results["aggregate"]["train_seconds_per_batch"]["mean"] is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["base", "lwf", "abd", "deepinversion"])
def test_digits_runs_all_tasks_and_writes_results(digits_data_dir, tmp_path, method, session):
    # ABD's whole loop (learner, generator, evaluation) data-parallel over the 4 simulated
    # devices; the others on one (tests/test_train.py compares 1 and 4 devices step by step).
    results = experiment.run(tiny_config(digits_data_dir, method=method,
                                         num_devices=0 if method == "abd" else 1), tmp_path, session=session)
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


@pytest.mark.slow
def test_repeats_and_omega(digits_data_dir, tmp_path, session):
    upper = experiment.run(tiny_config(digits_data_dir, method="upper_bound", epochs=1,
                                       num_tasks=2, repeats=2), tmp_path / "ub", session=session)
    assert upper["aggregate"]["final_accuracy"]["n"] == 2
    orders = [tuple(r["class_order"]) for r in upper["repeats"]]
    assert orders[0] != orders[1]  # one class order per seed
    base = experiment.run(tiny_config(digits_data_dir, epochs=1, num_tasks=2,
                                      upper_bound_results=str(tmp_path / "ub" / "results.json")),
                          tmp_path / "base", session=session)
    a, a_ub = np.array(base["repeats"][0]["A_global"]), np.array(upper["A_mean"])
    assert base["repeats"][0]["omega"] == pytest.approx(np.mean(a / a_ub))
    assert "Omega" in (tmp_path / "base" / "summary.md").read_text()


@pytest.mark.slow
def test_each_jitted_function_compiles_once_per_run(digits_data_dir, tmp_path):
    """A recompilation between tasks or chunks (a changed input type, shape or sharding)
    would cost seconds each time and pollute the timings; every task must reuse the
    learner's and the generator's compiled chunks. With compile_ahead, what the background
    threads compiled must be what the run then calls (else the caches would hold two)."""
    import logging
    config = tiny_config(digits_data_dir, method="abd", epochs=1, compile_ahead=True)
    lowered = []  # (thread, program) of every lowering JAX logs: once per distinct signature
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lowered.append(
        (record.threadName, record.getMessage().split()[1]))
    logger = logging.getLogger("jax._src.interpreters.pxla")
    with Session() as session:  # its own: nothing compiled by an earlier test
        splits = experiment.load_splits(config, session)
        mesh = experiment.make_mesh(config.num_devices)
        method = config_lib.validate(config, mesh.size)
        logger.addHandler(handler)
        jax.config.update("jax_log_compiles", True)
        try:
            with reporting.MetricWriter(tmp_path / "metrics.jsonl") as writer:
                repeat = runner.RepeatRunner(config, tmp_path, splits, mesh, writer, 0, method,
                                             session)
                repeat.run()
        finally:
            jax.config.update("jax_log_compiles", False)
            logger.removeHandler(handler)
        repeat.checkpointer.close()
        s = repeat.services
        learner_chunks = [train.train_chunk(session, s.model, method.loss_fn(s.plan.task(t)),
                                            s.step_config, mesh, s.steps_per_call)
                          for t in (0, 1)]  # task 1's CE, then ABD's loss
        generator_chunk = method.synthesizer(s.rt).fused_step
        assert [fn._cache_size() for fn in [*learner_chunks, generator_chunk,
                                            s.predict]] == [1, 1, 1, 1]
    assert sorted(repeat.compiled_ahead) == ["evaluation", "generator step",
                                             "learner chunk of task 2", "plotting fonts"]
    assert all(v.startswith("ready") for v in repeat.compiled_ahead.values()), \
        repeat.compiled_ahead
    # The run itself lowered only task 1's chunk; the rest was lowered ahead, in other threads.
    in_main = [name for thread, name in lowered if thread == "MainThread"]
    assert in_main.count("jit(train_chunk)") == 1, lowered
    assert "jit(predict)" not in in_main and "jit(single)" not in in_main, lowered
    assert {"jit(train_chunk)", "jit(predict)", "jit(single)"} <= {
        name for thread, name in lowered if thread.startswith("ahead:")}, lowered


def _matrices(results):
    return [(r["R_global"], r["R_local"]) for r in results["repeats"]]


@pytest.mark.parametrize("method", ["lwf", pytest.param("abd", marks=pytest.mark.slow)])
def test_interrupt_and_resume_gives_identical_results(digits_data_dir, tmp_path, monkeypatch,
                                                      method, session):
    config = tiny_config(digits_data_dir, method=method, num_tasks=2, epochs=3,
                         checkpoint_every_steps=8)
    reference = experiment.run(config, tmp_path / "straight", session=session)

    # Interrupt in the middle of task 2 (as Ctrl-C / SIGTERM would), then rerun.
    real = services.RepeatServices.log
    calls = {"n": 0}

    def interrupting_log(self, step, scalars, **tags):
        real(self, step, scalars, **tags)
        calls["n"] += 1
        if tags.get("task") == 2 and "phase" not in tags and calls["n"] > 24:
            raise KeyboardInterrupt

    monkeypatch.setattr(services.RepeatServices, "log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, tmp_path / "resumed", session=session)
    assert not (tmp_path / "resumed" / "results.json").exists()
    monkeypatch.setattr(services.RepeatServices, "log", real)
    resumed = experiment.run(config, tmp_path / "resumed", session=session)
    assert _matrices(resumed) == _matrices(reference)
    # the log (and TensorBoard) has A_i and the running A_inc after each task, once
    lines = [json.loads(s) for s in (tmp_path / "resumed" / "metrics.jsonl").read_text()
             .splitlines()]
    evals = [(x["A"], x["A_inc"]) for x in lines if x.get("eval")]
    a = resumed["repeats"][0]["A_global"]
    assert evals == [pytest.approx((a[0], a[0])), pytest.approx((a[1], (a[0] + a[1]) / 2))]


@pytest.mark.slow
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


@pytest.mark.slow
def test_workdir_with_another_config_is_refused(digits_data_dir, tmp_path, session):
    experiment.run(tiny_config(digits_data_dir, epochs=1, num_tasks=2), tmp_path, session=session)
    with pytest.raises(ValueError, match="different configuration.*epochs"):
        experiment.run(tiny_config(digits_data_dir, epochs=2, num_tasks=2), tmp_path, session=session)


def test_nan_loss_stops_with_the_step(digits_data_dir, tmp_path, session):
    with pytest.raises(driver.Diverged, match=r"task 1 training became non-finite at step \d+"):
        experiment.run(tiny_config(digits_data_dir, lr=1e30), tmp_path, session=session)


@pytest.mark.parametrize("overrides,message", [
    ({"method": "nope"}, "choose one of"),
    ({"dataset": "mnist"}, "known datasets"),
    ({"num_tasks": 3}, "valid task counts"),
    ({"model": "resnet7"}, "6n\\+2"),
    ({"batch_size": 30, "num_devices": 0}, "divisible by the 4 devices"),
    ({"class_order": "1,2"}, "permutation"),
    ({"first_task_classes": 3, "num_tasks": 5}, r"valid num_tasks .*: \[2, 8\]"),
    ({"head": "arc"}, "unknown head 'arc': use one of linear, cosine"),
    ({"head": "cosine", "method": "abd"}, "--config.head=cosine: abd supports linear"),
])
def test_bad_configs_name_the_fix(digits_data_dir, tmp_path, overrides, message, session):
    with pytest.raises(ValueError, match=message):
        experiment.run(tiny_config(digits_data_dir, **overrides), tmp_path, session=session)


def test_missing_prepared_dataset_says_how_to_prepare(tmp_path, session):
    with pytest.raises(FileNotFoundError, match="abd_jax.prepare_data --dataset=cifar10"):
        experiment.run(tiny_config(str(tmp_path / "empty"), dataset="cifar10", download=False,
                                   model="resnet8"), tmp_path / "run", session=session)


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
    (g1, l1, t1), (g2, l2, t2) = evaluation.task_accuracies(logits, labels, bounds, 1)
    assert (g1, l1, t1) == pytest.approx((100 / 3, 200 / 3, 100.0))
    assert (g2, l2, t2) == (0.0, 0.0, 100.0)
    # 7 valid classes, top-5 excludes the two smallest logits
    bounds7 = [(0, 7)]
    z = np.array([[6, 5, 4, 3, 2, 1, 0], [6, 5, 4, 3, 2, 1, 0]], np.float32)
    assert evaluation.task_accuracies(z, np.array([4, 5]), bounds7, 0)[0][2] == 50.0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["e2e", "bic", "rdfcil"])
def test_a_warm_start_run_has_a_large_first_task_then_equal_steps(digits_data_dir, tmp_path,
                                                                  method, session):
    """first_task_classes=4, num_tasks=4 on digits: tasks of 4, 2, 2, 2 classes; the methods
    that treat tasks one by one (E2E's per-task KD, BiC's per-task corrections, R-DFCIL's
    task weights) run on unequal tasks, and every task's test images are scored."""
    config = tiny_config(digits_data_dir, method=method, num_tasks=4, first_task_classes=4,
                         epochs=1, **{"bic": {**tiny_config(digits_data_dir).bic.to_dict(),
                                              "val_fraction": 0.6}})
    results = experiment.run(config, tmp_path, session=session)
    rep = results["repeats"][0]
    R = np.array(rep["R_global"], dtype=float)
    assert R.shape == (4, 4) and np.isfinite(np.tril(R)).all()
    assert rep["average_incremental_accuracy"] == pytest.approx(np.mean(rep["A_global"]))
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = {x["task"] for x in lines if "loss" in x and "phase" not in x}
    assert trained == {1, 2, 3, 4}


@pytest.mark.slow
def test_a_run_on_the_first_classes_of_the_order(digits_data_dir, tmp_path, session):
    config = tiny_config(digits_data_dir, method="lwf", num_tasks=3, num_classes=6,
                         epochs=1)
    results = experiment.run(config, tmp_path, session=session)
    rep = results["repeats"][0]
    assert len(rep["R_global"]) == 3 and len(rep["class_order"]) == 10
    splits = experiment.load_splits(config, session)
    repeat = plan.RunPlan.create(config, 10, splits.train_labels, splits.test_labels, 0)
    assert repeat.bounds == ((0, 2), (2, 4), (4, 6))
    used = set(rep["class_order"][:6])
    assert all(splits.train_labels[i] in used
               for t in range(3) for i in repeat.task_indices(t))
    for bad, message in ((11, "between 1 and"), (7, "valid task counts")):
        config = tiny_config(digits_data_dir, num_tasks=3, num_classes=bad)
        with pytest.raises(ValueError, match=message):
            config_lib.validate(config, 1)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["abd", "bic", "dgr", "rdfcil"])
def test_a_run_moves_data_between_host_and_device_only_explicitly(digits_data_dir, tmp_path,
                                                                  method, session):
    """Under `jax.transfer_guard("disallow")` every implicit transfer (a Python number sent
    to a jitted call, `int(array)` in a host loop) raises: the run places its inputs with
    device_put and fetches with device_get, and its loops count steps on the host. ABD covers
    the learner and the generator loops, BiC, DGR and R-DFCIL the stages on other
    TrainStates."""
    config = tiny_config(digits_data_dir, method=method, epochs=1, num_tasks=2)
    config.bic.val_fraction = 0.6  # (60 images: BiC's stage 2 takes steps)
    with jax.transfer_guard("disallow"):
        results = experiment.run(config, tmp_path, session=session)
    assert len(results["repeats"][0]["R_global"]) == 2
