"""Several processes as one run (`abd_jax.hosts`): two CPU processes on localhost, one device
each, give one process's numbers on two devices; only process 0 writes; a stop request to
one process stops both at the same chunk, and both resume to the same numbers (reading
their own rows of every batch on the stream path)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from abd_jax import checkpoint as ckpt_lib
from abd_jax import hosts
from helpers import xla_flags

pytestmark = pytest.mark.slow  # the full tier: whole runs in processes of their own

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"method": "abd", "num_tasks": 2, "epochs": 1, "num_devices": 0,  # all devices
            "log_every_steps": 4, "checkpoint_every_steps": 10_000,  # (stops save anyway)
            "synthesis.iterations": 20, "synthesis.log_every": 10,
            "synthesis.checkpoint_every": 10_000, "synthesis.sample_grid_size": 4}


def test_one_process_is_the_plain_operation():
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))
    batch = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    placed = hosts.to_global({"x": batch}, NamedSharding(mesh, P("data")))["x"]
    assert placed.sharding == NamedSharding(mesh, P("data"))
    assert np.array_equal(hosts.fetch({"x": placed})["x"], batch)
    assert hosts.is_main() and hosts.agree(True) and not hosts.agree(False)


@pytest.mark.parametrize("environ,several", [
    ({}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False),  # a batch script outside srun
    ({"SLURM_STEP_NUM_TASKS": "1"}, False),
    ({"SLURM_STEP_NUM_TASKS": "2"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
])
def test_only_a_launch_of_several_processes_initialises(environ, several):
    assert hosts.launched_as_several(environ) == several


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, data_dir, processes: int, pipeline: str = "device"):
    """`python -m abd_jax.main` on a tiny 2-task ABD run with 2 CPU devices in all: one
    process with both, or 2 processes with one each; returns the processes."""
    args = [sys.executable, "-m", "abd_jax.main", "--config=configs/digits.py",
            f"--workdir={workdir}", f"--config.data_dir={data_dir}",
            *(f"--config.{k}={v}" for k, v in SETTINGS.items()),
            f"--config.input_pipeline={pipeline}"]
    # Every compilation cached: the second launch reuses the first's programs.
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "XLA_FLAGS": xla_flags(devices=2 // processes)}
    if processes == 1:
        return [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)]
    args += [f"--coordinator_address=localhost:{_free_port()}", f"--num_processes={processes}"]
    return [subprocess.Popen([*args, f"--process_id={i}"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]


def _finish(procs, timeout=300):
    """[(returncode, stderr)] of both; kills both if either hangs (a deadlock fails here)."""
    deadline = time.time() + timeout
    try:
        errs = [p.communicate(timeout=max(deadline - time.time(), 1))[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _log_lines(workdir):
    """metrics.jsonl without the wall-clock field."""
    lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "images_per_second"} for line in lines]


def test_two_processes_match_one_and_stop_together(digits_data_dir, tmp_path):
    # The reference: one process with 2 devices, the same global batch (run meanwhile; in
    # this process the XLA:CPU thread layout of 4 devices would sum in another order).
    one = _launch(tmp_path / "one", digits_data_dir, processes=1)

    try:
        # A stop request to process 1 only, in task 1's training.
        workdir = tmp_path / "two"
        procs = _launch(workdir, digits_data_dir, processes=2)
        log, deadline = workdir / "metrics.jsonl", time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if log.exists() and '"task": 1' in log.read_text():
                break
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        (rc0, err0), (rc1, err1) = _finish(procs)
        assert (rc0, rc1) == (130, 130), err0[-3000:] + err1[-3000:]
        # Wherever the signal landed (training, the generator, an evaluation), both processes
        # stopped at the same call, saving there when the phase had progress since its last
        # checkpoint.
        saved = [re.findall(r"saving a checkpoint at (task \d+ \w+) step (\d+)", err)
                 for err in (err0, err1)]
        assert saved[0] == saved[1] and len(saved[0]) <= 1, saved
        assert not (workdir / "results.json").exists()
        checkpointer = ckpt_lib.RunCheckpointer(workdir / "checkpoints" / "repeat_0")
        position = ckpt_lib.describe_position(*checkpointer.latest())
        checkpointer.close()

        # Resumed on the stream path (the same batches, each process reading its own rows):
        # both input paths run on two processes in one test.
        (rc0, err0), (rc1, err1) = _finish(_launch(workdir, digits_data_dir, processes=2,
                                                   pipeline="stream"))
        [(rc, err)] = _finish(one)
    finally:
        for p in one:  # (when something above failed)
            if p.poll() is None:
                p.kill()
    assert rc == 0, err[-3000:]
    reference = json.loads((tmp_path / "one" / "results.json").read_text())
    assert (rc0, rc1) == (0, 0), err0[-3000:] + err1[-3000:]
    assert f"resuming repeat 0 at {position}" in err0 and "streaming" in err0
    two = json.loads((workdir / "results.json").read_text())
    for key in ("R_global", "R_local"):
        np.testing.assert_allclose(np.array(two["repeats"][0][key], float),
                                   np.array(reference["repeats"][0][key], float), rtol=1e-4)
    # Process 0 alone logs (one line each, no duplicates) and reports at INFO; process 1
    # only warns.
    assert _log_lines(workdir) == _log_lines(tmp_path / "one")
    assert not [line for line in err1.splitlines() if line.startswith("I")
                and "distributed.py" not in line]
    assert sorted(p.name for p in workdir.glob("samples_*.png")) == ["samples_repeat0_task1.png"]
