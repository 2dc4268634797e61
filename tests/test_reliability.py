"""What clusters and users do to runs: two launches on one workdir, paths with `~` and
variables, settings that cannot work, results readable by colleagues."""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from abd_jax import checkpoint as ckpt_lib
from abd_jax import experiment
from helpers import tiny_config

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
    ({"lr": -0.1}, "lr must be > 0"),
    ({"train_per_class": 1}, "task 1 has 2 training images"),
])
def test_bad_settings_are_refused_before_anything_is_written(digits_data_dir, tmp_path,
                                                             overrides, message, session):
    with pytest.raises(ValueError, match=message):
        experiment.run(tiny_config(digits_data_dir, **overrides), tmp_path / "run", session=session)
    assert not (tmp_path / "run" / "config.json").exists()
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
    assert not (tmp_path / "run" / "config.json").exists()
