"""Orbax checkpoints of the task loop, resume logic and the run-config fingerprint.

A checkpoint holds one pytree (`state`: arrays only, as Flax state dicts) and one JSON item
(`meta`: position in the run, accuracy records, timings). Its id encodes the position:
`id = task * ID_STRIDE + step_in_task`; a finished task `t` is saved as `(t + 1, 0)`.
"""
from __future__ import annotations

import json
import logging as py_logging
import os
import pathlib
from typing import Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

ID_STRIDE = 10_000_000

# Config fields that do not change the numbers a run produces; they may differ on resume.
NON_RESULT_FIELDS = ("log_every_steps", "checkpoint_every_steps", "data_dir", "download",
                     "eval_batch_size", "upper_bound_results", "synthesis_log_every",
                     "sample_grid_size")


def _not_orbax_info(record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_info_logs() -> None:
    """Orbax logs every checkpoint write at INFO; keep only its warnings and errors."""
    logging.get_absl_handler().addFilter(_not_orbax_info)


def position_to_id(task: int, step: int) -> int:
    if step >= ID_STRIDE:
        raise ValueError(f"a task longer than {ID_STRIDE} steps cannot be checkpointed")
    return task * ID_STRIDE + step


def id_to_position(ckpt_id: int) -> tuple[int, int]:
    return divmod(ckpt_id, ID_STRIDE)


class RunCheckpointer:
    """Save/restore `(pytree, meta)` at positions of one repeat, keeping the newest two."""

    def __init__(self, directory: os.PathLike):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
            item_names=("state", "meta"))

    def latest(self) -> Optional[tuple[int, int]]:
        step = self._manager.latest_step()
        return None if step is None else id_to_position(step)

    def save(self, task: int, step: int, tree: dict, meta: dict) -> None:
        ckpt_id = position_to_id(task, step)
        if ckpt_id in self._manager.all_steps():
            return
        self._manager.save(ckpt_id, args=ocp.args.Composite(
            state=ocp.args.StandardSave(serialization.to_state_dict(tree)),
            meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def restore_meta(self) -> dict:
        step = self._manager.latest_step()
        return self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, template: dict) -> dict:
        """The latest pytree, shaped and placed (shardings) like `template`."""
        step = self._manager.latest_step()
        target = serialization.to_state_dict(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        return serialization.from_state_dict(template, restored)

    def close(self) -> None:
        self._manager.close()


def result_fields(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in NON_RESULT_FIELDS}


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

