"""What clusters and users do to runs: two launches on one workdir, paths with `~` and
variables, settings that cannot work, read-only and full disks, diverged runs, results
readable by colleagues. Each failure ends in one line naming the fix."""
import contextlib
import errno
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from abd_jax import checkpoint as ckpt_lib
from abd_jax import driver, errors, experiment, files, train
from helpers import tiny_config, xla_flags

pytestmark = pytest.mark.slow  # the full tier: whole runs in processes of their own

REPO = Path(__file__).resolve().parents[1]


def test_a_second_launch_on_a_busy_workdir_is_refused_naming_the_holder(digits_data_dir,
                                                                        tmp_path, session):
    with ckpt_lib.WorkdirLock(tmp_path):
        with pytest.raises(ckpt_lib.WorkdirBusy, match=f"pid {os.getpid()} on "):
            experiment.run(tiny_config(digits_data_dir, epochs=1), tmp_path, session=session)
    assert not (tmp_path / "results.json").exists()
    # Released with its holder: the same workdir is usable again.
    experiment.run(tiny_config(digits_data_dir, epochs=1, num_tasks=2), tmp_path, session=session)
    assert (tmp_path / "results.json").exists()


def test_tilde_and_variables_in_paths_are_expanded(digits_data_dir, tmp_path, monkeypatch, session):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ABD_TEST_TFDS", digits_data_dir)
    config = tiny_config("$ABD_TEST_TFDS", epochs=1, num_tasks=2)
    experiment.run(config, "~/runs/digits", session=session)
    assert (tmp_path / "home" / "runs" / "digits" / "results.json").exists()


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"first_repeat": -1}, "first_repeat -1 must be 0 or more"),
    ({"lr": -0.1}, "lr must be > 0"),
    ({"train_per_class": 1}, "task 1 has 2 training images"),
])
def test_bad_settings_are_refused_before_anything_is_written(digits_data_dir, tmp_path,
                                                             overrides, message, session):
    with pytest.raises(ValueError, match=message):
        experiment.run(tiny_config(digits_data_dir, **overrides), tmp_path / "run", session=session)
    assert not (tmp_path / "run").exists()  # not even the lock
    # The corrected rerun is not refused as "a different configuration".
    experiment.run(tiny_config(digits_data_dir, epochs=1, num_tasks=2), tmp_path / "run", session=session)


def test_a_workdir_that_is_a_file_is_refused(digits_data_dir, tmp_path, session):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        experiment.run(tiny_config(digits_data_dir), tmp_path / "file", session=session)


def test_results_are_readable_as_the_umask_allows(digits_data_dir, tmp_path, session):
    old = os.umask(0o022)
    try:
        experiment.run(tiny_config(digits_data_dir, epochs=1, num_tasks=2), tmp_path, session=session)
    finally:
        os.umask(old)
    for name in ("results.json", "summary.md", "accuracy.png", "config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_a_file_written_again_with_the_same_bytes_is_untouched(tmp_path):
    path = tmp_path / "table.md"
    files.write_file(path, "| a |\n")
    before = path.stat()
    files.write_file(path, b"| a |\n")
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    files.write_file(path, "| b |\n")
    assert path.read_text() == "| b |\n" and path.stat().st_ino != before.st_ino
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]  # no temp file left


@pytest.mark.parametrize("args,message", [
    (["--config.foo=1"], "unknown setting --config.foo"),
    (["--config.batch_sise=2"], "did you mean 'batch_size'"),
    (["--config.abd.task_balansing=False"], "--config.abd.task_balansing"),
    (["--config=configs/nope.py"], "cannot load --config.*No such file"),
])
def test_bad_command_lines_get_one_line(tmp_path, args, message):
    command = [sys.executable, "-m", "abd_jax.main", "--config=configs/digits.py",
               f"--workdir={tmp_path / 'run'}", *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_library_info_noise_is_dropped_and_warnings_kept():
    import logging as py_logging

    from abd_jax import logs

    def record(path, level, msg):
        return py_logging.LogRecord("absl", level, path, 1, msg, None, None)

    site = "/usr/lib/python3/site-packages"
    assert not logs._keep(record(f"{site}/orbax/checkpoint/manager.py", py_logging.INFO, "saved"))
    assert not logs._keep(record(f"{site}/jax/_src/xla_bridge.py", py_logging.INFO, "no tpu"))
    assert not logs._keep(record(f"{site}/tensorflow_datasets/core/image_feature.py",
                                 py_logging.WARNING, "OpenCV is not installed. We recommend"))
    assert logs._keep(record(f"{site}/orbax/checkpoint/manager.py", py_logging.WARNING, "slow"))
    assert logs._keep(record("/work/abd_jax/experiment.py", py_logging.INFO, "task 1 step 5"))


def test_a_data_dir_that_cannot_hold_the_prepared_data_is_one_error(tmp_path, session):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot prepare sklearn_digits.*--config.data_dir"):
        experiment.run(tiny_config(str(blocker / "tfds")), tmp_path / "run", session=session)
    assert not (tmp_path / "run").exists()  # not even the lock


# ------------------------------------------------------------------------- disks and runs
def _main(tmp_path, workdir, data_dir, *extra, timeout=300):
    """`python -m abd_jax.main` on a 2-task LwF digits run (1 epoch); (returncode, stderr)."""
    command = [sys.executable, "-m", "abd_jax.main", "--config=configs/digits.py",
               f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.epochs=1",
               "--config.num_tasks=2", "--config.method=lwf", "--config.num_devices=1", *extra]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XLA_FLAGS": xla_flags()})
    return done.returncode, done.stderr


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (root only), or None where this machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_read_only_workdir_is_one_line(digits_data_dir, tmp_path, monkeypatch, session):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as mounted:
        if mounted is not None:
            rc, stderr = _main(tmp_path, mounted / "wd", digits_data_dir)
            assert rc == 1
            line = _one_error_line(stderr)
            assert "Read-only file system" in line and "writable disk" in line, line
            return
    # No mounting here: the same OSError, raised where the workdir is first written.
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OSError) as caught:
        experiment.run(tiny_config(digits_data_dir, epochs=1), tmp_path / "wd", session=session)
    assert "writable disk" in errors.os_error_message(caught.value)


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(digits_data_dir,
                                                                        tmp_path):
    """On a 3 MB disk the first checkpoint does not fit: one line, nothing half-written;
    with room again the same command runs to the end."""
    with _tmpfs(tmp_path / "full", "size=3m") as mounted:
        if mounted is None:
            pytest.skip("mounting a tmpfs is not allowed here (the next test covers a full "
                        "disk without mounting)")
        rc, stderr = _main(tmp_path, mounted / "wd", digits_data_dir)
        assert rc == 1
        line = _one_error_line(stderr)
        assert "no space left for the checkpoint" in line and "free space" in line, line
        subprocess.run(["mount", "-o", "remount,size=128m", str(mounted)], check=True)
        rc, stderr = _main(tmp_path, mounted / "wd", digits_data_dir)
        assert rc == 0, stderr[-3000:]
        assert (mounted / "wd" / "results.json").exists()


def test_a_disk_that_fills_during_the_run_keeps_its_last_checkpoint(
        digits_data_dir, reference_run, tmp_path, monkeypatch, session):
    """The disk fills after two checkpoints (as a shared disk does): the run stops with the
    one-line error; with room again it resumes from its newest checkpoint to the numbers of an
    uninterrupted run. Orbax's own failure to write is the same error."""
    config = tiny_config(digits_data_dir, method="lwf", epochs=1, num_tasks=3, num_classes=6)
    reference, _ = reference_run(config)
    real, saves = ckpt_lib.shutil.disk_usage, {"n": 0}

    def filling(path):
        saves["n"] += 1
        usage = real(path)
        return usage._replace(free=0) if saves["n"] > 2 else usage

    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", filling)
    with pytest.raises(OSError) as caught:
        experiment.run(config, tmp_path, session=session)
    assert caught.value.errno == errno.ENOSPC
    assert "rerun the same command" in errors.os_error_message(caught.value)
    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", real)
    assert ckpt_lib.RunCheckpointer(tmp_path / "checkpoints" / "repeat_0").latest() is not None
    resumed = experiment.run(config, tmp_path, session=session)
    assert resumed["repeats"][0]["R_global"] == reference["repeats"][0]["R_global"]
    with pytest.raises(OSError, match="no space left on device"):
        with ckpt_lib._disk_errors(tmp_path):
            raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device")


def test_a_diverged_run_says_how_to_recover_and_that_works(digits_data_dir, tmp_path):
    """lr=1e6 diverges in task 1, before any checkpoint: the message says so and how to
    rerun with a lower rate; following it (--allow_changed=lr) runs to the end."""
    rc, stderr = _main(tmp_path, tmp_path / "wd", digits_data_dir, "--config.lr=1e6")
    assert rc == 1
    line = _one_error_line(stderr)
    assert "non-finite" in line and "No checkpoint was saved before it" in line, line
    assert "--allow_changed=lr" in line
    rc, stderr = _main(tmp_path, tmp_path / "wd", digits_data_dir, "--config.lr=0.05")
    assert rc == 1 and "--allow_changed" in _one_error_line(stderr)
    rc, stderr = _main(tmp_path, tmp_path / "wd", digits_data_dir, "--config.lr=0.05",
                       "--allow_changed=lr")
    assert rc == 0, stderr[-3000:]
    assert "changed settings" in stderr
    stored = json.loads((tmp_path / "wd" / "config.json").read_text())
    assert stored["lr"] == 0.05 and (tmp_path / "wd" / "config_changes.jsonl").exists()


def test_a_diverged_table_row_is_one_line_whose_fix_works(digits_data_dir, tmp_path):
    """run_table.py: a row diverging (lr=1e6) ends in the run's one line, and its advice
    (a lower lr, --allow_changed=lr, the same command) runs the table to the end."""
    def table(*extra):
        command = [sys.executable, "experiments/run_table.py", "--config=configs/digits.py",
                   f"--workdir={tmp_path / 'table'}", f"--config.data_dir={digits_data_dir}",
                   "--rows=base", "--config.epochs=1", "--config.num_tasks=2",
                   "--config.num_devices=1", *extra]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "XLA_FLAGS": xla_flags()})
        return done.returncode, done.stderr

    rc, stderr = table("--config.lr=1e6")
    assert rc == 1
    line = _one_error_line(stderr)
    assert "non-finite" in line and "--allow_changed=lr" in line, line
    rc, stderr = table("--config.lr=0.05", "--allow_changed=lr")
    assert rc == 0, stderr[-3000:]
    assert "| base |" in (tmp_path / "table" / "table.md").read_text()


def test_a_divergence_after_a_checkpoint_resumes_from_it(digits_data_dir, reference_run,
                                                         tmp_path, monkeypatch, session):
    """NaN in task 2: the message names task 1's end, a checkpoint that still resumes to the
    uninterrupted numbers."""
    config = tiny_config(digits_data_dir, method="lwf", epochs=1, num_tasks=3, num_classes=6)
    reference, _ = reference_run(config)
    real, calls = train.run_steps, {"n": 0}

    def nan_in_task_2(fused, state, num_steps, *args, **kwargs):
        state, metrics = real(fused, state, num_steps, *args, **kwargs)
        calls["n"] += 1
        info = args[-1]
        if int(np.asarray(info.num_old)) == 2:  # task 2's training
            metrics["loss"] = metrics["loss"] * np.nan
        return state, metrics

    monkeypatch.setattr(driver.train, "run_steps", nan_in_task_2)
    with pytest.raises(driver.Diverged) as caught:
        experiment.run(config, tmp_path, session=session)
    message = str(caught.value)
    assert "the end of task 1" in message and "--allow_changed=lr" in message, message
    monkeypatch.setattr(driver.train, "run_steps", real)
    resumed = experiment.run(config, tmp_path, session=session)
    assert resumed["repeats"][0]["R_global"] == reference["repeats"][0]["R_global"]


def test_settings_and_methods_are_listed_without_a_workdir():
    command = [sys.executable, "-m", "abd_jax.main", "--config=configs/digits.py",
               "--config.coreset.memory=80", "--show_config"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "coreset.memory = 80" in done.stdout and "deepinversion, abd" in done.stdout
    command = [sys.executable, "-m", "abd_jax.main", "--config=configs/digits.py",
               "--config.method=nosuch"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    line = _one_error_line(done.stderr)
    assert done.returncode == 1 and "unknown method 'nosuch'; choose one of" in line, line


def test_a_finished_run_rerun_leaves_its_results_untouched(digits_data_dir, tmp_path,
                                                           session):
    config = tiny_config(digits_data_dir, epochs=1, num_tasks=2)
    experiment.run(config, tmp_path, session=session)
    before = {name: ((tmp_path / name).read_bytes(), (tmp_path / name).stat().st_mtime_ns)
              for name in ("results.json", "summary.md", "accuracy.png")}
    experiment.run(config, tmp_path, session=session)
    for name, (data, mtime) in before.items():
        assert (tmp_path / name).read_bytes() == data and (
            tmp_path / name).stat().st_mtime_ns == mtime, name
