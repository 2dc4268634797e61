"""TFDS builders that prepare datasets offline and without TensorFlow, one module each.

* `cifar`: `OfflineCifar10` / `OfflineCifar100`, the official `cifar10` / `cifar100` builders
  fed from the binary archive in the manual dir instead of the network. They write to the
  same place as the registered builders, so `tfds.data_source("cifar10", data_dir=...)` reads
  the result.
* `digits`: `SklearnDigits` (registered as `sklearn_digits`), scikit-learn's 8x8 digits.
* `tiny_imagenet`: `TinyImagenet` (registered as `tiny_imagenet`), from the official zip.
* `imagenet`: `Imagenet2012`, TFDS's `imagenet2012` from the two ILSVRC-2012 tars (splits
  `train` and `test` = the validation set; images kept as their JPEG bytes).
* `folder` / `folder_files`: `ImageFolder`, users' own `root/{train,test}/<class>/*` images
  (`--config.dataset=folder:root`), and the checks of their files.
* `offline`: `OFFLINE_BUILDERS`, `download_and_prepare`, `fetch_archive`.
* `prepared`: finished version folders on disk and their cached statistics.

Images are stored as PNG bytes (`common.png_bytes`: TFDS's numpy image encoder needs TF), or
as the original JPEG bytes (ImageNet; TFDS decodes those with PIL when reading).
"""
from abd_jax.datasets.cifar import OfflineCifar10, OfflineCifar100
from abd_jax.datasets.common import png_bytes
from abd_jax.datasets.digits import SklearnDigits
from abd_jax.datasets.folder import ImageFolder, folder_config_name, prepare_folder
from abd_jax.datasets.folder_files import IMAGE_SUFFIXES, folder_layout, read_image
from abd_jax.datasets.imagenet import (IMAGENET_LABELS_FILE, IMAGENET_VAL_LABELS_FILE,
                                       Imagenet2012, rgb_or_grey_jpeg)
from abd_jax.datasets.offline import OFFLINE_BUILDERS, download_and_prepare, fetch_archive
from abd_jax.datasets.prepared import STATS_FILE, dataset_stats, prepared_version_dir
from abd_jax.datasets.tiny_imagenet import TinyImagenet

__all__ = [
    "IMAGENET_LABELS_FILE", "IMAGENET_VAL_LABELS_FILE", "IMAGE_SUFFIXES", "OFFLINE_BUILDERS",
    "STATS_FILE", "ImageFolder", "Imagenet2012", "OfflineCifar10", "OfflineCifar100",
    "SklearnDigits", "TinyImagenet", "dataset_stats", "download_and_prepare", "fetch_archive",
    "folder_config_name", "folder_layout", "prepare_folder", "prepared_version_dir",
    "png_bytes", "read_image", "rgb_or_grey_jpeg",
]
