"""Orbax checkpoints of the task loop, resume logic and the run-config fingerprint.

A checkpoint holds one pytree (`state`: arrays only, as Flax state dicts) and one JSON item
(`meta`: accuracy records, timings, the metrics-log offset). Its id encodes the position
`(task, step)`, `id = task * ID_STRIDE + step`, and so the phase of task `t`:

- `step < END_TASK`: training step `step` (`(t, total_steps)` once training is done);
- `END_TASK + k`: inside the method's end-of-task hook, which saved its progress `k`;
- `EVALUATE`: the end-of-task hook is done, the evaluation is not;
- a finished task `t` is saved as `(t + 1, 0)`.
"""
from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket
import time
from typing import Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

ID_STRIDE = 10_000_000
END_TASK = ID_STRIDE // 2
EVALUATE = ID_STRIDE - 1

# Config fields that do not change the numbers a run produces; they may differ on resume.
NON_RESULT_FIELDS = ("log_every_steps", "checkpoint_every_steps", "data_dir", "download",
                     "eval_batch_size", "upper_bound_results", "synthesis_log_every",
                     "synthesis_checkpoint_every", "sample_grid_size", "keep_task_checkpoints",
                     "tensorboard", "compile_ahead",
                     # The input path: both read the same batches (`input_pipeline`).
                     "input_pipeline", "stream_above_gb", "stream_workers", "stream_prefetch")


def position_to_id(task: int, step: int) -> int:
    if not 0 <= step < ID_STRIDE:
        raise ValueError(f"step {step} is outside a task's checkpoint range [0, {ID_STRIDE})")
    return task * ID_STRIDE + step


def id_to_position(ckpt_id: int) -> tuple[int, int]:
    return divmod(ckpt_id, ID_STRIDE)


class RunCheckpointer:
    """Save/restore `(pytree, meta)` at positions of one repeat, keeping the newest two, and
    with `keep_task_ends` also every finished task's `(t + 1, 0)` (for `abd_jax.analyze`)."""

    def __init__(self, directory: os.PathLike, keep_task_ends: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=2, create=True, keep_period=ID_STRIDE if keep_task_ends else None),
            item_names=("state", "meta"))

    def positions(self) -> list[tuple[int, int]]:
        """Every stored position, oldest first."""
        self.wait()
        return [id_to_position(step) for step in sorted(self._manager.all_steps())]

    def restore_at(self, task: int, step: int, template: dict) -> tuple[dict, dict]:
        """(pytree shaped like template, meta) of the checkpoint at `(task, step)`."""
        self.wait()
        ckpt_id = position_to_id(task, step)
        if ckpt_id not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint at task {task} step {step} in {self.directory} (stored: "
                f"{self.positions()})")
        return self._restore_tree(ckpt_id, template), self._restore_meta(ckpt_id)

    def latest(self) -> Optional[tuple[int, int]]:
        self.wait()
        step = self._manager.latest_step()
        return None if step is None else id_to_position(step)

    def restore_latest(self, template: dict) -> Optional[tuple[tuple[int, int], dict, dict]]:
        """`(position, pytree shaped like template, meta)` of the newest checkpoint that
        restores, or None if there is none. A newer one that fails to restore (truncated or
        missing files) is moved aside to `<directory>.damaged/` with a one-line warning, never
        deleted, and the one before it is tried."""
        while (step := self._manager.latest_step()) is not None:
            try:
                return id_to_position(step), self._restore_tree(step, template), \
                    self._restore_meta(step)
            except Exception as err:  # noqa: BLE001 (any failure to read it means damaged)
                self._move_aside(step, err)
        return None

    def save(self, task: int, step: int, tree: dict, meta: dict) -> None:
        """Start saving; returns once the arrays are copied off the device, and the files are
        written by a background thread while training goes on (a save waits for the one
        before it; `close` waits for the last). Until a save is committed it is invisible to
        `restore_latest`, so a process killed mid-write resumes from the one before."""
        ckpt_id = position_to_id(task, step)
        if ckpt_id in self._manager.all_steps():
            return
        meta = json.loads(json.dumps(meta))  # a snapshot: the caller keeps mutating its dicts
        self._manager.save(ckpt_id, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_host_copies(serialization.to_state_dict(tree))),
            meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def _restore_meta(self, step: int) -> dict:
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or "accuracy" not in meta:
            raise ValueError("its meta item is missing or incomplete")
        return meta

    def _restore_tree(self, step: int, template: dict) -> dict:
        """The pytree of `step`, shaped and placed (shardings) like `template`."""
        target = serialization.to_state_dict(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        return serialization.from_state_dict(template, restored)

    def _move_aside(self, step: int, err: Exception) -> None:
        source = self.directory / str(step)
        target = self.directory.with_name(self.directory.name + ".damaged") / str(step)
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.with_name(f"{step}.{suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        logging.warning("checkpoint %d (task %d step %d) in %s does not restore (%s: %s); "
                        "moved it to %s and trying the one before", step,
                        *id_to_position(step), self.directory, type(err).__name__, reason,
                        target)
        if source.exists():
            os.replace(source, target)
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()


def _host_copies(tree):
    """`tree` with its replicated arrays (all of a data-parallel run's) fetched to the host
    as numpy arrays, which process 0 writes whole. Orbax would write a replicated `jax.Array`
    in slices, one per device, cut on the devices: for a run's ~150 small arrays that is
    2-3x the cost of the save itself. Restoring gives `jax.Array`s either way (`_restore_tree`
    places them like the template), so checkpoints of both kinds resume."""
    replicated = lambda x: (isinstance(x, jax.Array) and x.is_fully_replicated
                            and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended))
    fetched = jax.device_get([x for x in jax.tree.leaves(tree) if replicated(x)])[::-1]
    return jax.tree.map(lambda x: fetched.pop() if replicated(x) else x, tree)


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir."""


class WorkdirLock:
    """One run per workdir: an exclusive `flock` on `<workdir>/.lock`, held while the run
    lasts and released by the OS when the process ends (a `kill -9` leaves no stale lock).
    The file names the holder (pid, host, start time) for the refused second launch.
    Process i > 0 of a multi-process run takes `.lock.process<i>` instead, so the processes
    of one run don't refuse each other but each refuses its twin of a second launch."""

    def __init__(self, workdir: os.PathLike):
        index = jax.process_index()
        self.path = pathlib.Path(workdir) / (f".lock.process{index}" if index else ".lock")
        self._fd: Optional[int] = None

    def __enter__(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirBusy(f"workdir {self.path.parent} is in use by another run ({holder}); "
                              "wait for it to finish, stop it, or pass another --workdir") \
                from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# Result fields added after runs were made, with the value that reproduces those runs: a
# stored config without one of them resumes as if it had that value.
ADDED_FIELDS = {"image_size": 0, "num_classes": 0}


def result_fields(config_dict: dict) -> dict:
    """The fields that decide a run's numbers, with defaults resolved: a missing
    `synthesis.generator_dtype` (runs made before it existed) is float32, "" is `dtype`."""
    fields = {**ADDED_FIELDS, **{k: v for k, v in config_dict.items()
                                 if k not in NON_RESULT_FIELDS}}
    synth = fields.get("synthesis")
    if isinstance(synth, dict):
        generator_dtype = synth.get("generator_dtype", "float32") or fields.get("dtype")
        fields["synthesis"] = {**synth, "generator_dtype": generator_dtype}
    return fields


def check_or_write_fingerprint(workdir: os.PathLike, config_dict: dict,
                               write: bool = True) -> None:
    """Refuse to resume into a workdir that holds a run with a different configuration.

    `config_dict` must be JSON-serialisable. Unless `write` is False, the configuration is
    then (re)written to `workdir/config.json`.
    """
    path = pathlib.Path(workdir) / "config.json"
    current = json.loads(json.dumps(config_dict))
    if path.exists():
        stored = json.loads(path.read_text())
        old, new = result_fields(stored), result_fields(current)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise ValueError(
                f"workdir {workdir} holds a run with a different configuration ({details}). "
                "Refusing to overwrite it: pass a new --workdir, or delete the old one to "
                "start again.")
    if not write:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
    os.replace(tmp, path)

