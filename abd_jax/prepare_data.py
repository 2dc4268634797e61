"""Prepares a dataset offline into a TFDS data_dir and prints its split sizes.

    python -m abd_jax.prepare_data --dataset=cifar10 --manual_dir=../shared/data \
        [--data_dir=~/tensorflow_datasets]
    python -m abd_jax.prepare_data --dataset=imagenet2012 --manual_dir=<folder with
        ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar> [--data_dir=...]
        (--dataset=imagenet100 prepares the same: ImageNet-100 reads 100 of its classes)
    python -m abd_jax.prepare_data --dataset=folder:/path/to/root [--image_size=64]

(A folder dataset is also prepared on its first use by a run.) A problem with the files is one
line, `error: <what and the fix>`, and exit status 1; an interrupted preparation leaves nothing
that a later one or a run would take for finished.
"""
import sys

import tensorflow_datasets as tfds
from absl import app, flags

from abd_jax import data, datasets, logs

_DATASET = flags.DEFINE_string(
    "dataset", None, f"One of {sorted(datasets.OFFLINE_BUILDERS)} (imagenet100: "
    "imagenet2012), or folder:<root> for root/{train,test}/<class>/* images.", required=True)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "folder: resize to N x N (0 = keep).")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Folder holding the official archive: cifar-10-binary.tar.gz / "
    "cifar-100-binary.tar.gz / tiny-imagenet-200.zip / ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar.")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir to write.")


def prepare(dataset: str, data_dir, manual_dir=None, image_size: int = 0) -> dict[str, int]:
    """Prepares `dataset` (a key of `datasets.OFFLINE_BUILDERS`, e.g. cifar100, tiny_imagenet,
    imagenet2012, or folder:<root>; a dataset of some classes of one of those prepares it);
    returns {split: size}."""
    if data.DATASETS.get(dataset) and data.DATASETS[dataset].class_subset:
        dataset = data.DATASETS[dataset].tfds_name
    if dataset.startswith("folder:"):
        version_dir = datasets.prepare_folder(data.expand_path(dataset[len("folder:"):]),
                                              str(data.expand_path(data_dir)), image_size)
        builder = tfds.builder_from_directory(str(version_dir))
    elif dataset in datasets.OFFLINE_BUILDERS:
        builder = datasets.download_and_prepare(
            dataset, str(data.expand_path(data_dir)),
            str(data.expand_path(manual_dir)) if manual_dir else None)
    else:
        raise app.UsageError(f"--dataset={dataset}: choose one of "
                             f"{sorted(datasets.OFFLINE_BUILDERS)} or folder:<root>")
    return {str(name): split.num_examples for name, split in builder.info.splits.items()}


def main(argv):
    del argv
    logs.quiet_library_logs()
    try:
        sizes = prepare(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value, _IMAGE_SIZE.value)
    except KeyboardInterrupt:
        print("stopped; nothing half-prepared was kept: rerun the same command", file=sys.stderr)
        raise SystemExit(130)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    for split, size in sizes.items():
        print(f"{_DATASET.value} {split}: {size} examples")


if __name__ == "__main__":
    app.run(main)
