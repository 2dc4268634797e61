"""Prepares a dataset offline into a TFDS data_dir and prints its split sizes.

    python -m abd_jax.prepare_data --dataset=cifar10 --manual_dir=../shared/data \
        [--data_dir=~/tensorflow_datasets]
"""
from absl import app, flags

from abd_jax import data, datasets, logs

_DATASET = flags.DEFINE_enum("dataset", None, sorted(datasets.OFFLINE_BUILDERS),
                             "Dataset to prepare.", required=True)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Folder holding cifar-10-binary.tar.gz / cifar-100-binary.tar.gz.")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir to write.")


def prepare(dataset: str, data_dir, manual_dir=None) -> dict[str, int]:
    """Prepares `dataset` (cifar10 | cifar100 | sklearn_digits); returns {split: size}."""
    builder = datasets.download_and_prepare(
        dataset, str(data.expand_path(data_dir)),
        str(data.expand_path(manual_dir)) if manual_dir else None)
    return {str(name): split.num_examples for name, split in builder.info.splits.items()}


def main(argv):
    del argv
    logs.quiet_library_logs()
    for split, size in prepare(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value).items():
        print(f"{_DATASET.value} {split}: {size} examples")


if __name__ == "__main__":
    app.run(main)
