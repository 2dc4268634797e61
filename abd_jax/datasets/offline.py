"""The datasets abd-jax prepares from their official archives, without TensorFlow."""
import contextlib
import os
import pathlib
import urllib.request

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from abd_jax.datasets.cifar import OfflineCifar10, OfflineCifar100
from abd_jax.datasets.digits import SklearnDigits
from abd_jax.datasets.imagenet import Imagenet2012
from abd_jax.datasets.prepared import preparing
from abd_jax.datasets.tiny_imagenet import TinyImagenet

OFFLINE_BUILDERS = {"cifar10": OfflineCifar10, "cifar100": OfflineCifar100,
                    "sklearn_digits": SklearnDigits, "tiny_imagenet": TinyImagenet,
                    "imagenet2012": Imagenet2012}


def fetch_archive(name: str, folder) -> epath.Path:
    """Downloads the official archive of `name` (cifar10 | cifar100 | tiny_imagenet) into `folder`
    (skipped when already there) with plain urllib: TFDS's own downloader needs TF."""
    builder_cls = OFFLINE_BUILDERS[name]
    folder = epath.Path(folder).expanduser()
    target = folder / builder_cls.ARCHIVE
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        url = builder_cls.URL
        logging.info("downloading %s to %s", url, target)
        partial = folder / (builder_cls.ARCHIVE + ".part")  # renamed only once complete
        urllib.request.urlretrieve(url, os.fspath(partial))
        partial.rename(target)
    return folder


def download_and_prepare(name: str, data_dir=None, manual_dir=None,
                         download: bool = False) -> tfds.core.DatasetBuilder:
    """Prepares `name` (a key of OFFLINE_BUILDERS) as array_record in `data_dir`.

    The archive (CIFAR, Tiny-ImageNet; ImageNet's two tars) is read from `manual_dir`; with
    `download` and no manual dir, it is first fetched into `<data_dir>/downloads/manual`
    (not ImageNet, which needs a registration). A no-op when already prepared; one process
    at a time prepares (`preparing`). Returns the builder; its `info.splits` give the sizes.
    """
    if name not in OFFLINE_BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(OFFLINE_BUILDERS)}")
    if data_dir is not None:
        data_dir = epath.Path(data_dir).expanduser()
    if manual_dir is not None:
        manual_dir = epath.Path(manual_dir).expanduser()
    make = lambda: OFFLINE_BUILDERS[name](data_dir=data_dir, file_format="array_record")
    builder = make()
    folder = pathlib.Path(builder.data_dir).parent
    with contextlib.nullcontext() if builder.is_prepared() else preparing(folder):
        builder = make()  # a process waited for may have prepared it
        if (download and manual_dir is None and getattr(builder, "URL", None)
                and not builder.is_prepared()):
            manual_dir = fetch_archive(
                name, epath.Path(builder.data_dir_root) / "downloads" / "manual")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, try_download_gcs=False))
    return builder
