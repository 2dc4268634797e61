"""A run's settings: checked once, before anything is written, and compared with the run a
workdir already holds.

Settings are an `ml_collections.ConfigDict` (`configs/*.py`): run-wide fields at the top and
one subtree per method family (`abd`, `lwf`, `deepinversion`, `coreset`, `e2e`, `bic`,
`dgr`, `rdfcil`, `synthesis`). A workdir's `config.json` fingerprints its run: a rerun with other
result fields is refused (naming them), except the fields `--allow_changed` names, which a
resumed run may change, logged. Fields that cannot change the numbers (`NON_RESULT`) and the
subtrees of methods other than the run's are not compared.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import time
from typing import Optional

from absl import logging

from abd_jax import data as data_lib
from abd_jax import files, first_task, input_pipeline, models
from abd_jax import methods as methods_lib

# Flat names of earlier versions -> their place now (an old name gives a one-line error).
RENAMED = {"lwf_mu": "lwf.mu", "lwf_synthetic_mu": "lwf_synthetic.mu",
           "deepinversion_mu": "deepinversion.mu", "memory": "coreset.memory",
           "synthesis_log_every": "synthesis.log_every",
           "synthesis_checkpoint_every": "synthesis.checkpoint_every",
           "sample_grid_size": "synthesis.sample_grid_size"}

# Fields that do not change the numbers a run produces; they may differ on resume.
NON_RESULT = ("log_every_steps", "checkpoint_every_steps", "data_dir", "download",
              "eval_batch_size", "upper_bound_results", "keep_task_checkpoints",
              "tensorboard", "compile_ahead", "synthesis.log_every",
              "synthesis.checkpoint_every", "synthesis.sample_grid_size",
              # The input path: both read the same batches (`input_pipeline`).
              "input_pipeline", "stream_above_gb", "stream_workers", "stream_prefetch",
              # A first task trained with the same settings (`first_task.check_source`).
              "first_task_from")

# Result fields a resumed run may change with --allow_changed (e.g. after a divergence).
CHANGEABLE = ("lr", "synthesis.lr", "lr_decay", "lr_milestones", "momentum", "weight_decay")

# Result fields added after runs were made, with the value that reproduces those runs.
ADDED = {"image_size": 0, "num_classes": 0, "synthesis.generator_dtype": "float32",
         "first_repeat": 0, "first_task_classes": 0, "coreset.distinct_memory": True,
         "e2e.balanced_bn": "eval", "e2e.new_class_kd": "before", "bic.stage2_bn": "eval",
         "rdfcil.head": "shared", "head": "linear", "augment.policy": "abd"}

METHOD_SECTIONS = methods_lib.config_sections()  # every method's config subtrees


def renamed_message(field: str) -> Optional[str]:
    """'error: ...' for a setting that moved, else None."""
    top = field.split(".")[0]
    if top in RENAMED:
        return (f"error: --config.{top} was renamed: use --config.{RENAMED[top]} (settings of "
                "one method live in its own subtree)")
    return None


def unknown_setting_message(error: str, argv: list[str]) -> str:
    """'error: unknown setting --config.<path> ...' from ml_collections' KeyError text."""
    field = re.search(r"[\w.]+", error.replace("\\'", "'"))
    field = field.group(0) if field else error
    given = [arg.split("=")[0] for arg in argv
             if arg.startswith("--config.") and arg.split("=")[0].endswith(field)]
    name = given[0][len("--config."):] if given else field
    moved = renamed_message(name) or renamed_message(field)
    if moved:
        return moved
    hint = re.search(r'Did you mean "([\w.]+)"', error)
    fix = (f"did you mean {hint.group(1)!r}?" if hint else
           "python -m abd_jax.main --config=<file> --show_config lists them")
    return (f"error: unknown setting {given[0] if given else '--config.' + field}: the "
            f"config has no field {field!r}; {fix}")


def check_method_name(config) -> None:
    """The method exists (checked before anything else needs the workdir or the data)."""
    if config.method not in methods_lib.METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose one of "
                         f"{', '.join(methods_lib.METHODS)} (--config.method=...)")


def repeat_indices(config) -> range:
    """The repeats a run makes: `first_repeat` .. `first_repeat + repeats - 1` (repeat r:
    seed `seed + r`, the r-th class order)."""
    return range(config.first_repeat, config.first_repeat + config.repeats)


def validate(config, num_devices: int,
             spec: Optional[data_lib.DatasetSpec] = None) -> methods_lib.Method:
    """Raise ValueError naming the fix for any setting the run cannot honour; returns the
    run's method (built once). `spec`: the data's, when the caller supplies splits."""
    check_method_name(config)
    spec = spec or data_lib.spec_of(config)
    if config.first_repeat < 0:
        raise ValueError(f"first_repeat {config.first_repeat} must be 0 or more "
                         "(--config.first_repeat)")
    for repeat in repeat_indices(config):
        data_lib.class_order(spec.num_classes, config.class_order, config.seed + repeat, repeat,
                             config.dataset)
    spec = data_lib.classes_in_use(spec, config.num_classes)
    data_lib.task_boundaries(spec.num_classes, config.num_tasks, config.first_task_classes)
    models.create_classifier(config.model, spec.num_classes, config.dtype, config.conv_impl,
                             head=config.head)
    if config.input_pipeline not in input_pipeline.PIPELINES:
        raise ValueError(f"input_pipeline={config.input_pipeline!r}: use one of "
                         f"{input_pipeline.PIPELINES} (--config.input_pipeline)")
    for name in ("batch_size", "eval_batch_size", "repeats", "epochs", "log_every_steps",
                 "checkpoint_every_steps"):
        if config[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {config[name]}; set "
                             f"--config.{name}")
    if config.batch_size % num_devices:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                         f"{num_devices} devices; set --config.batch_size to a multiple")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr}; set --config.lr")
    if list(config.lr_milestones) != sorted(config.lr_milestones):
        raise ValueError(f"lr_milestones must be increasing, got {config.lr_milestones}")
    method = methods_lib.get_method(config, spec)
    if config.head not in method.heads:
        raise ValueError(f"--config.head={config.head}: {config.method} supports "
                         f"{', '.join(method.heads)}")
    first_task.check_source(config, method, spec)
    return method


def describe(config) -> str:
    """Every setting of `config` (resolved) and the methods, for --show_config."""
    lines = [f"# methods (--config.method): {', '.join(methods_lib.METHODS)}",
             "# settings (--config.<name>=value; nested: --config.abd.mu=0.2):"]
    for key, value in sorted(_flatten(json.loads(config.to_json())).items()):
        lines.append(f"{key} = {value!r}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- fingerprint
def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def result_fields(config_dict: dict) -> dict:
    """{dotted name: value} of the fields that decide a run's numbers: old names moved to
    their places, added fields at the value older runs had, `""` generator dtype resolved to
    `dtype`, other methods' subtrees and `NON_RESULT` fields dropped."""
    flat = _flatten(config_dict)
    for old, new in RENAMED.items():
        if old in flat:
            flat.setdefault(new, flat.pop(old))
    flat = {**ADDED, **flat}
    flat["synthesis.generator_dtype"] = flat["synthesis.generator_dtype"] or flat.get("dtype")
    method = methods_lib._CLASSES.get(flat.get("method"))
    own = set(getattr(method, "sections", ()))
    return {k: v for k, v in flat.items()
            if k not in NON_RESULT and not (k.split(".")[0] in METHOD_SECTIONS
                                           and k.split(".")[0] not in own)}


def check_or_write_fingerprint(workdir: os.PathLike, config_dict: dict, write: bool = True,
                               allowed: tuple = ()) -> None:
    """Refuse to resume into a workdir that holds a run with a different configuration, except
    in the fields `allowed` (`CHANGEABLE` ones), whose change is logged and recorded in
    `config_changes.jsonl`. `config_dict` must be JSON-serialisable. Unless `write` is False,
    the configuration is then (re)written to `workdir/config.json`."""
    bad = [f for f in allowed if f not in CHANGEABLE]
    if bad:
        raise ValueError(f"--allow_changed={','.join(bad)}: a resumed run may change only "
                         f"{', '.join(CHANGEABLE)}")
    path = pathlib.Path(workdir) / "config.json"
    current = json.loads(json.dumps(config_dict))
    changes = {}
    if path.exists():
        stored = json.loads(path.read_text())
        old, new = result_fields(stored), result_fields(current)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        refused = [k for k in diff if k not in allowed]
        if refused:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in refused)
            raise ValueError(
                f"workdir {workdir} holds a run with a different configuration ({details}). "
                "Refusing to overwrite it: pass a new --workdir, delete the old one to start "
                f"again, or (only for {', '.join(CHANGEABLE)}) resume with "
                "--allow_changed=<field>.")
        changes = {k: [old.get(k), new.get(k)] for k in diff}
    if not write:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if changes:
        logging.warning("resuming %s with changed settings (--allow_changed): %s", workdir,
                        "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        with open(path.with_name("config_changes.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "changes": changes}) + "\n")
    files.write_file(path, json.dumps(current, indent=2, sort_keys=True))
