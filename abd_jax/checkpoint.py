"""Orbax checkpoints of the task loop, resume logic and the run-config fingerprint.

A checkpoint holds one pytree (`state`: arrays only, as Flax state dicts, packed per dtype,
see `_pack`) and one JSON item (`meta`: accuracy records, timings, the metrics-log offset,
the state's layout). Its id encodes the position
`(task, step)`, `id = task * ID_STRIDE + step`, and so the phase of task `t`:

- `step < END_TASK`: training step `step` (`(t, total_steps)` once training is done);
- `END_TASK + i * STAGE_STRIDE + k`: the method's end-of-task stage `i`, `k` steps into it;
- `EVALUATE`: every end-of-task stage is done, the evaluation is not;
- a finished task `t` is saved as `(t + 1, 0)`.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import itertools
import json
import os
import pathlib
import shutil
import socket
import time
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from abd_jax import hosts

ID_STRIDE = 10_000_000
END_TASK = ID_STRIDE // 2
STAGE_STRIDE = 1_000_000  # steps a loop may take (a task's training, or one stage)
EVALUATE = ID_STRIDE - 1

def position_to_id(task: int, step: int) -> int:
    if not 0 <= step < ID_STRIDE:
        raise ValueError(f"step {step} is outside a task's checkpoint range [0, {ID_STRIDE})")
    return task * ID_STRIDE + step


def id_to_position(ckpt_id: int) -> tuple[int, int]:
    return divmod(ckpt_id, ID_STRIDE)


def stage_step(stage: int, progress: int) -> int:
    """The step of a position `progress` steps into end-of-task stage `stage`."""
    if not 0 <= progress < STAGE_STRIDE or END_TASK + (stage + 1) * STAGE_STRIDE > EVALUATE:
        raise ValueError(f"stage {stage} progress {progress} has no checkpoint position")
    return END_TASK + stage * STAGE_STRIDE + progress


def stage_of(step: int) -> tuple[int, int]:
    """(stage, progress) of an end-of-task step (`END_TASK <= step < EVALUATE`)."""
    return divmod(step - END_TASK, STAGE_STRIDE)


def describe_position(task: int, step: int) -> str:
    """A checkpoint position in words, 1-based as the log counts tasks."""
    if step == EVALUATE:
        return f"task {task + 1}, before its evaluation"
    if step >= END_TASK:
        stage, progress = stage_of(step)
        return f"task {task + 1}, end-of-task stage {stage + 1}, step {progress}"
    if step == 0 and task > 0:
        return f"the end of task {task}"
    return f"task {task + 1}, training step {step}"


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
        return self._restore(ckpt_id, template)

    def latest(self) -> Optional[tuple[int, int]]:
        self.wait()
        step = self._manager.latest_step()
        return None if step is None else id_to_position(step)

    def restore_latest(self, template: dict) -> Optional[tuple[tuple[int, int], dict, dict]]:
        """`(position, pytree shaped like template, meta)` of the newest checkpoint that
        restores, or None if there is none. A newer one that fails to restore (truncated or
        missing files) is moved aside to `<directory>.damaged/` with a one-line warning, never
        deleted, and the one before it is tried. One whose state is laid out unlike
        `template` (saved by another version of the code) is not damaged: it raises
        `LayoutMismatch`, naming the fix, and nothing is moved (the ones before it were saved
        by the same code, and restarting would overwrite the run's results)."""
        while (step := self._manager.latest_step()) is not None:
            try:
                return id_to_position(step), *self._restore(step, template)
            except LayoutMismatch as err:
                raise LayoutMismatch(
                    f"checkpoint {step} ({describe_position(*id_to_position(step))}) in "
                    f"{self.directory} was saved by another version of abd-jax: {err}. Resume "
                    "it with the version that saved it, or pass a new --workdir") from None
            except Exception as err:  # noqa: BLE001 (any other failure to read it: damaged)
                self._move_aside(step, err)
        return None

    def save(self, task: int, step: int, tree: dict, meta: dict) -> None:
        with _disk_errors(self.directory):
            self._save(task, step, tree, meta)

    def _save(self, task: int, step: int, tree: dict, meta: dict) -> None:
        """Start saving; returns once the arrays are copied off the device, and the files are
        written by a background thread while training goes on (a save waits for the one
        before it; `close` waits for the last). Until a save is committed it is invisible to
        `restore_latest`, so a process killed mid-write resumes from the one before."""
        ckpt_id = position_to_id(task, step)
        if ckpt_id in self._manager.all_steps():
            return
        packed, layout = _pack(serialization.to_state_dict(tree))
        _check_free_space(self.directory, sum(a.nbytes for a in jax.tree.leaves(packed)),
                          describe_position(task, step))
        # A snapshot: the caller keeps mutating its dicts.
        meta = json.loads(json.dumps({**meta, LAYOUT: layout}))
        self._manager.save(ckpt_id, args=ocp.args.Composite(
            state=ocp.args.StandardSave(packed), meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        """Block until every started save is on disk."""
        with _disk_errors(self.directory):
            self._manager.wait_until_finished()

    def _restore(self, step: int, template: dict) -> tuple[dict, dict]:
        """(the pytree of `step`, shaped and placed (shardings) like `template`; its meta)."""
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or "accuracy" not in meta:
            raise ValueError("its meta item is missing or incomplete")
        layout = meta.pop(LAYOUT, None)
        target = serialization.to_state_dict(template)
        if layout is None:  # saved before checkpoints were packed: one orbax array per leaf
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
            restored = self._restore_state(step, abstract)
        else:
            restored = _unpack(target, layout, functools.partial(self._restore_state, step))
        return serialization.from_state_dict(template, restored), meta

    def _restore_state(self, step: int, abstract):
        return self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]

    def _move_aside(self, step: int, err: Exception) -> None:
        source = self.directory / str(step)
        target = self.directory.with_name(self.directory.name + ".damaged") / str(step)
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.with_name(f"{step}.{suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        logging.warning("checkpoint %d (%s) in %s does not restore (%s: %s); moved it to %s "
                        "and trying the one before", step,
                        describe_position(*id_to_position(step)), self.directory,
                        type(err).__name__, reason, target)
        if source.exists():
            os.replace(source, target)
        self._manager.reload()

    def close(self) -> None:
        with _disk_errors(self.directory):
            self._manager.close()


_MARGIN = 2 ** 20  # bytes beyond the arrays: metadata, the meta item


def _check_free_space(directory: pathlib.Path, nbytes: int, where: str) -> None:
    """Raise OSError(ENOSPC) naming the need when `directory`'s disk cannot hold a checkpoint
    of `nbytes` array bytes: before orbax's background writes start, whose failure would end
    in its threads' tracebacks."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < nbytes + _MARGIN:
        raise OSError(errno.ENOSPC, f"no space left for the checkpoint at {where} "
                      f"({(nbytes + _MARGIN) / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB "
                      f"free)", str(directory))


class _disk_errors:
    """Turns orbax's failures to write (a disk filled meanwhile, a read-only or forbidden
    folder) into the OSError a user reads in one line; other errors pass unchanged."""

    CODES = (("No space left on device", errno.ENOSPC), ("Read-only file system", errno.EROFS),
             ("Permission denied", errno.EACCES))

    def __init__(self, directory: pathlib.Path):
        self.directory = directory

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or isinstance(err, (OSError, KeyboardInterrupt)):
            return False
        for text, code in self.CODES:
            if text in str(err):
                raise OSError(code, f"writing a checkpoint failed: {text.lower()}",
                              str(self.directory)) from None
        return False


LAYOUT = "state_layout"  # the meta key of a packed state's layout


class LayoutMismatch(ValueError):
    """A checkpoint's state has other arrays than the run restoring it expects."""


def _host_value(leaf) -> bool:
    """Whether `leaf` is one value every process holds whole: a host array, or a replicated
    `jax.Array` (all of a data-parallel run's state)."""
    if isinstance(leaf, jax.Array):
        return leaf.is_fully_replicated and not jax.dtypes.issubdtype(
            leaf.dtype, jax.dtypes.extended)
    return isinstance(leaf, (np.ndarray, np.generic))


def _pack(state: dict) -> tuple[dict, list]:
    """(what orbax saves, the layout to save with it). Host values (see `_host_value`) are
    fetched and concatenated per dtype into one 1-D array each, `{"packed": {dtype: [n]}}`,
    written once by process 0; any other leaf is kept as an orbax array under
    `{"arrays": {leaf index: leaf}}`. Orbax's cost is per array, and a run's state is ~150
    small ones; a replicated `jax.Array` would also be cut into per-device slices first.
    layout: `[key path, shape, dtype, packed?]` per leaf, in `jax.tree.leaves` order."""
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    host = [_host_value(leaf) for _, leaf in paths_and_leaves]
    fetched = iter(jax.device_get([leaf for (_, leaf), h in zip(paths_and_leaves, host) if h]))
    by_dtype: dict[str, list] = {}
    arrays, layout = {}, []
    for i, ((path, leaf), h) in enumerate(zip(paths_and_leaves, host)):
        dtype = np.dtype(leaf.dtype).name
        layout.append([jax.tree_util.keystr(path), list(np.shape(leaf)), dtype, h])
        if h:
            by_dtype.setdefault(dtype, []).append(np.ravel(next(fetched)))
        else:
            arrays[str(i)] = leaf
    packed = {"packed": {dtype: np.concatenate(parts) for dtype, parts in by_dtype.items()}}
    return {**packed, "arrays": arrays} if arrays else packed, layout


def _unpack(target: dict, layout: list, restore) -> dict:
    """`target`'s structure filled from a packed state (see `_pack`) with `layout`, each leaf
    placed like target's (a `jax.Array`'s sharding; a host value stays numpy).
    `restore(abstract)` reads the saved tree shaped like `abstract`."""
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    expected = [[jax.tree_util.keystr(path), list(np.shape(leaf)), np.dtype(leaf.dtype).name]
                for path, leaf in paths_and_leaves]
    saved = [entry[:3] for entry in layout]
    if saved != expected:
        was, now = next(pair for pair in itertools.zip_longest(saved, expected)
                        if pair[0] != pair[1])
        describe = lambda entry: "nothing" if entry is None else f"{entry[0]} {entry[2]}{entry[1]}"
        raise LayoutMismatch(f"its state layout differs from this run's ({len(saved)} vs "
                         f"{len(expected)} arrays): saved {describe(was)} where this run "
                         f"has {describe(now)}")
    sizes: dict[str, int] = {}  # dtype -> packed length
    spans = []  # each leaf's [start, stop) in its dtype's packed array
    for _, shape, dtype, packed in layout:
        start = sizes.get(dtype, 0)
        if packed:
            sizes[dtype] = start + int(np.prod(shape))
        spans.append((start, sizes.get(dtype, 0)))
    abstract = {"packed": {dtype: np.zeros((n,), jax.numpy.dtype(dtype))
                           for dtype, n in sizes.items()}}
    arrays = {str(i): ocp.utils.to_shape_dtype_struct(leaf)
              for i, ((_, leaf), entry) in enumerate(zip(paths_and_leaves, layout))
              if not entry[3]}
    saved_tree = restore({**abstract, "arrays": arrays} if arrays else abstract)
    leaves = []
    for i, ((_, leaf), (_, shape, dtype, packed), (start, stop)) in enumerate(
            zip(paths_and_leaves, layout, spans)):
        if not packed:
            leaves.append(saved_tree["arrays"][str(i)])
            continue
        value = np.asarray(saved_tree["packed"][dtype][start:stop]).reshape(shape)
        leaves.append(hosts.to_global(value, leaf.sharding)
                      if isinstance(leaf, jax.Array) else value)
    return jax.tree_util.tree_unflatten(treedef, leaves)


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
