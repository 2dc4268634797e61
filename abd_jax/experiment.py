"""A whole experiment: every repeat of the task loop (`runner`) into one workdir.

    run(config, workdir): check the settings, lock the workdir, load the data once, run (or
    resume) each repeat with its own class order (seed = config.seed + r), then write
    results.json, summary.md and accuracy.png.

Interrupting (Ctrl-C, SIGTERM) saves a checkpoint; rerunning the same command resumes from
the newest one and reproduces the uninterrupted numbers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from abd_jax import checkpoint as ckpt_lib
from abd_jax import config as config_lib
from abd_jax import data as data_lib
from abd_jax import hosts, input_pipeline, metrics, plan, reporting, runner
from abd_jax.session import Session


@dataclasses.dataclass(frozen=True)
class Splits:
    """One dataset on the host (original labels). Images are uint8 `[N, H, W, C]` arrays, or
    `input_pipeline.SourceImages` read on demand when the run streams its data."""

    spec: data_lib.DatasetSpec
    train_images: np.ndarray | input_pipeline.SourceImages
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray | input_pipeline.SourceImages
    test_labels: np.ndarray

    @property
    def streamed(self) -> bool:
        return isinstance(self.train_images, input_pipeline.SourceImages)


def config_with(config, overrides: dict):
    """A copy of `config` with `overrides` (dotted keys for nested fields, e.g. `abd.mu`);
    an int given for a float field is converted."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = float(value) if isinstance(node[leaf], float) else value
    return config


def load_splits(config, session: Session) -> Splits:
    """The run's dataset: read whole into host memory, or (streaming) labels only; a dataset
    of some of its TFDS dataset's classes (`DatasetSpec.class_subset`) keeps their examples,
    relabelled."""
    spec = data_lib.spec_of(config)
    data_dir = str(data_lib.expand_path(config.data_dir)) if config.data_dir else None
    train_labels_source = data_lib.open_split(spec, "train", data_dir, config.download,
                                              input_pipeline.labels_only())
    if not input_pipeline.use_stream(config, spec, len(train_labels_source)):
        splits = []
        for split in ("train", "test"):
            images, labels = data_lib.load_split(spec, split, data_dir, config.download)
            if spec.class_subset:
                keep, labels = data_lib.class_subset_positions(labels, spec.class_subset)
                images = images[keep]
            splits += [images, labels]
        return Splits(spec, *splits)
    logging.info("input pipeline: streaming %s from its prepared files (grain, %d worker "
                 "processes)", spec.tfds_name, config.stream_workers)
    labels_sources = {"train": train_labels_source, "test": data_lib.open_split(
        spec, "test", data_dir, decoders=input_pipeline.labels_only())}
    transform = input_pipeline.test_transform(spec)  # herding etc.: no random crop
    splits = []
    for split in ("train", "test"):
        source = data_lib.open_split(spec, split, data_dir)
        labels = input_pipeline.split_labels(labels_sources[split], session)
        if spec.class_subset:
            keep, labels = data_lib.class_subset_positions(labels, spec.class_subset)
            source = data_lib.ClassSubset(source, keep)
        splits += [input_pipeline.SourceImages(source, spec, session, transform=transform),
                   labels]
    return Splits(spec, *splits)


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ("data",) mesh over the first `num_devices` global devices (0: all of them, on
    every process; with several processes it must be all)."""
    devices = jax.devices()
    if jax.process_count() > 1 and num_devices not in (0, len(devices)):
        raise ValueError(f"num_devices {num_devices} leaves out devices of this run's "
                         f"{jax.process_count()} processes; set --config.num_devices=0 (all "
                         f"{len(devices)})")
    devices = devices[:num_devices] if num_devices else devices
    return Mesh(np.asarray(devices), ("data",))


def run(config, workdir, splits: Optional[Splits] = None, session: Optional[Session] = None,
        allow_changed: tuple = ()) -> dict:
    """Run (or resume) every repeat of the experiment; returns the results dict.

    `splits` replaces loading `config.dataset` through TFDS (e.g. for timing runs); `session`
    shares compiled programs with other runs of the caller (a fresh one by default);
    `allow_changed`: result fields a resumed run may change (`config.CHANGEABLE`)."""
    if session is None:
        with Session() as own:
            return run(config, workdir, splits, own, allow_changed)
    workdir = data_lib.expand_path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir {workdir} is a file; pass a folder as --workdir")
    mesh = make_mesh(config.num_devices)
    method = config_lib.validate(config, mesh.size, splits.spec if splits is not None else None)
    config_dict = json.loads(config.to_json())
    config_lib.check_or_write_fingerprint(workdir, config_dict, write=False,
                                          allowed=allow_changed)
    omega_reference = None  # the upper bound's results.json, for Omega
    if config.upper_bound_results:
        path = data_lib.expand_path(config.upper_bound_results)
        if not path.exists():
            raise FileNotFoundError(f"upper_bound_results {path} does not exist; run "
                                    "--config.method=upper_bound first and pass its "
                                    "results.json")
        omega_reference = json.loads(path.read_text())
    splits = splits or load_splits(config, session)
    plan.validate_task_sizes(config, plan.RunPlan.create(
        config, splits.spec.num_classes, splits.train_labels, splits.test_labels, 0))
    with ckpt_lib.WorkdirLock(workdir):
        # written once all is checked (by process 0 of several)
        config_lib.check_or_write_fingerprint(workdir, config_dict, write=hosts.is_main(),
                                              allowed=allow_changed)
        return _run_locked(config, workdir, splits, mesh, config_dict, method, session,
                           omega_reference)


def run_title(config) -> str:
    """The title of a run's results and plots."""
    return f"{config.method} on {config.dataset}, {config.num_tasks} tasks"


def _run_locked(config, workdir: pathlib.Path, splits: Splits, mesh: Mesh, config_dict: dict,
                method, session: Session, omega_reference) -> dict:
    logging.info("devices: %s; dataset %s: %d train / %d test images", mesh.devices.tolist(),
                 config.dataset, len(splits.train_labels), len(splits.test_labels))
    logging.info("running %s: %d tasks, %d epochs each (%s, batch %d), %d repeat(s); every "
                 "setting is in %s", config.method, config.num_tasks, config.epochs,
                 config.model, config.batch_size, config.repeats, workdir / "config.json")
    title = run_title(config)
    results = {}
    tensorboard = workdir / "tensorboard" if config.tensorboard else None
    # Process 0 of several writes the logs; the others' lines go nowhere (their offsets in a
    # checkpoint's meta are not stored: orbax writes process 0's JSON items).
    log_path = workdir / "metrics.jsonl" if hosts.is_main() else pathlib.Path(os.devnull)
    with reporting.MetricWriter(log_path, tensorboard if hosts.is_main() else None) as writer:
        run_results, all_restored = [], True
        for repeat in config_lib.repeat_indices(config):
            repeat_runner = runner.RepeatRunner(config, workdir, splits, mesh, writer, repeat,
                                                method, session)
            try:
                run_results.append(repeat_runner.run())
            finally:  # saves are written in the background: finish them, also when stopped
                repeat_runner.checkpointer.close()
            all_restored = all_restored and repeat_runner.restored_result
            results = metrics.build_results(run_results, omega_reference)
            if hosts.is_main() and not all_restored:  # a finished run's files stay untouched
                reporting.write_results(workdir, results, config_dict, title)
    agg = results["aggregate"]["final_accuracy"]
    logging.info("final accuracy A_N = %.2f +- %.2f %% over %d repeat(s); results in %s",
                 agg["mean"], agg["std"], agg["n"], workdir)
    return results
