"""Prepared TFDS datasets on disk: which version folder is complete, one preparation at a
time, and the statistics."""
import contextlib
import fcntl
import json
import os
import pathlib
import re
import shutil
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from abd_jax import files

STATS_FILE = "abd_stats.json"  # beside dataset_info.json in a prepared version folder
_VERSION = re.compile(r"\d+\.\d+\.\d+")
INCOMPLETE_GLOB = "incomplete.*"  # TFDS prepares into such a folder, then renames it


def prepared_version_dir(name: str, data_dir) -> Optional[pathlib.Path]:
    """The newest prepared version folder of TFDS dataset `name` ("ds" or "ds/config") in
    data_dir, or None.

    Only a folder named as a version (1.0.0) that holds dataset_info.json counts: TFDS
    prepares into an `incomplete.*` folder and renames it to the version when done, so an
    interrupted preparation (even one killed outright) is never taken for a finished one."""
    folder = pathlib.Path(data_dir or pathlib.Path.home() / "tensorflow_datasets") / name
    versions = [d for d in folder.iterdir() if _VERSION.fullmatch(d.name)
                and (d / "dataset_info.json").is_file()] if folder.is_dir() else []
    return max(versions, key=lambda d: tuple(map(int, d.name.split("."))), default=None)


@contextlib.contextmanager
def preparing(folder: pathlib.Path):
    """Held while a dataset is prepared into `folder` (the parent of its version folders):
    an exclusive `flock` on the folder itself (no lock file is left behind), so a second
    process preparing the same dataset waits for the first, and then finds it prepared,
    instead of racing it to the version folder. Once held, the `incomplete.*` folders that a
    preparation killed outright left there are deleted: no live preparation writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.info("waiting for another process preparing into %s", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in folder.glob(INCOMPLETE_GLOB):
            logging.warning("deleting %s, left by a preparation that was killed", stale)
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_stats(cache: pathlib.Path) -> Optional[dict]:
    """The cached statistics, or None when absent or unreadable (they are then recomputed)."""
    try:
        return json.loads(cache.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logging.warning("recomputing the dataset's statistics: %s is unreadable (%s)", cache, err)
        return None


def dataset_stats(version_dir: pathlib.Path, chunk_size: int = 4096) -> dict:
    """Class count, image shape and per-channel pixel mean/std (in [0, 1]) of a prepared
    dataset's train split, cached in `<version_dir>/abd_stats.json` (when writable)."""
    cache = version_dir / STATS_FILE
    stats = _read_stats(cache)
    if stats is not None:
        return stats
    builder = tfds.builder_from_directory(str(version_dir))
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"{version_dir} has no 'image' and 'label' features; abd-jax reads "
                         "image-classification datasets only")
    shape = tuple(features["image"].shape)
    if None in shape:
        raise ValueError(f"{version_dir}: images of varying size {shape}; prepare it as a "
                         "folder dataset with --config.image_size")
    source = builder.as_data_source(split="train")
    sums, squares, count = np.zeros(shape[-1]), np.zeros(shape[-1]), 0
    for start in range(0, len(source), chunk_size):
        batch = np.stack([ex["image"] for ex in source.__getitems__(
            list(range(start, min(start + chunk_size, len(source)))))]).astype(np.float64) / 255
        sums += batch.sum(axis=(0, 1, 2))
        squares += np.square(batch).sum(axis=(0, 1, 2))
        count += batch.shape[0] * batch.shape[1] * batch.shape[2]
    mean = sums / count
    stats = {"num_classes": int(features["label"].num_classes), "image_shape": list(shape),
             "mean": mean.tolist(),
             "std": np.sqrt(np.maximum(squares / count - mean ** 2, 0)).tolist()}
    try:
        files.write_file(cache, json.dumps(stats))
    except OSError as err:
        logging.warning("could not cache the dataset's statistics in %s (%s)", cache, err)
    return stats
