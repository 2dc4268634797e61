"""Datasets and class-incremental splits (class orders, task bounds). Knows nothing of models;
augmentation is `abd_jax.augment`'s."""
import dataclasses
import os
import pathlib
import random

import numpy as np



@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A TFDS image-classification dataset; mean/std are per channel in [0, 1] units."""
    tfds_name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_key: str = "label"
    prepared_dir: str = ""  # read from this prepared TFDS folder (own folders, other datasets)
    # Stored images differ in size (ImageNet): `image_shape` is the model input, and every
    # image must pass `transforms.train_transform` / `test_transform` before batching.
    variable_size: bool = False
    # A subset of the TFDS dataset's classes (stored labels), relabelled 0..K-1 in this order;
    # () = every class as stored.
    class_subset: tuple = ()


DATASETS = {
    "cifar10": DatasetSpec("cifar10", 10, (32, 32, 3),
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetSpec("cifar100", 100, (32, 32, 3),
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # Pixel mean/std of the sklearn_digits train split (1442 images) after uint8 -> [0, 1].
    "digits": DatasetSpec("sklearn_digits", 10, (8, 8, 1), (0.3052,), (0.3760,)),
    # docs/algorithm.md §1's Tiny-ImageNet statistics; our builder (`datasets.TinyImagenet`).
    "tiny_imagenet": DatasetSpec("tiny_imagenet", 200, (64, 64, 3),
                                 (0.4389, 0.4114, 0.3682), (0.2402, 0.2350, 0.2268)),
    # ILSVRC-2012 as JPEGs of varying size (`datasets.Imagenet2012`; test = the validation
    # set), cropped to the 224x224 model input on the host; the usual ImageNet mean/std.
    "imagenet2012": DatasetSpec("imagenet2012", 1000, (224, 224, 3),
                                (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                variable_size=True),
    # ImageNet-100 of PODNet and R-DFCIL, read from the prepared ILSVRC-2012: the classes of
    # PODNet's imagenet_split/val_100.txt (its labels 0-99 are the wnids n01440764 ..
    # n01855672), which are the first 100 of the sorted wnids, ILSVRC-2012 labels 0-99.
    "imagenet100": DatasetSpec("imagenet2012", 100, (224, 224, 3),
                               (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                               variable_size=True, class_subset=tuple(range(100))),
}


def expand_path(path) -> pathlib.Path:
    """A path setting with `~` and environment variables expanded (a shell leaves the `~` of
    `--config.data_dir=~/...` alone)."""
    return pathlib.Path(os.path.expandvars(os.path.expanduser(str(path))))


def get_spec(name: str, data_dir=None, image_size: int = 0) -> DatasetSpec:
    """The DatasetSpec of `name`: a registered dataset (`DATASETS`); `folder:<root>`, a folder
    of `root/{train,test}/<class>/*` images, prepared into data_dir on first use (resized to
    image_size x image_size when image_size > 0); or the name of any TFDS dataset with
    `image` and `label` features already prepared in data_dir. Class count, image shape and
    mean/std of the last two come from their training split (computed once)."""
    if name in DATASETS:
        return DATASETS[name]
    from abd_jax import datasets  # noqa: PLC0415 (keeps TFDS out of model-only uses)
    data_dir = str(expand_path(data_dir)) if data_dir else None
    if name.startswith("folder:"):
        version_dir = datasets.prepare_folder(expand_path(name[len("folder:"):]), data_dir,
                                              image_size)
    else:
        version_dir = datasets.prepared_version_dir(name, data_dir)
        if version_dir is None:
            raise ValueError(
                f"unknown dataset {name!r}; known datasets: {sorted(DATASETS)}, "
                "folder:/path/to/root (root/train/<class>/*, root/test/<class>/*), or the name "
                f"of a TFDS dataset prepared in data_dir={data_dir or '~/tensorflow_datasets'}")
    stats = datasets.dataset_stats(version_dir)
    return DatasetSpec(name, stats["num_classes"], tuple(stats["image_shape"]),
                       tuple(stats["mean"]), tuple(stats["std"]),
                       prepared_dir=str(version_dir))


def spec_of(config) -> DatasetSpec:
    """The spec of a run's `config.dataset` (with its data_dir and image_size)."""
    return get_spec(config.dataset, config.data_dir, config.get("image_size", 0))


def classes_in_use(spec: DatasetSpec, num_classes: int = 0) -> DatasetSpec:
    """`spec` for a run on the first `num_classes` classes of its class order (0: all): the
    classifier's head and the task split follow its `num_classes`, while the class order
    still permutes every class of the dataset (`class_order(dataset_spec.num_classes, ...)`).
    """
    if not num_classes or num_classes == spec.num_classes:
        return spec
    if not 1 <= num_classes <= spec.num_classes:
        raise ValueError(f"num_classes={num_classes}: the dataset has {spec.num_classes} "
                         "classes; set --config.num_classes between 1 and that (0 = all)")
    return dataclasses.replace(spec, num_classes=num_classes)


def _not_prepared_message(spec: DatasetSpec, data_dir) -> str:
    archive = {"cifar10": "cifar-10-binary.tar.gz", "cifar100": "cifar-100-binary.tar.gz",
               "tiny_imagenet": "tiny-imagenet-200.zip",
               "imagenet2012": "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
               }.get(spec.tfds_name, "the dataset files")
    subset = (f" (this dataset is {len(spec.class_subset)} of its classes)"
              if spec.class_subset else "")
    return (f"TFDS dataset {spec.tfds_name!r}{subset} is not prepared in data_dir={data_dir} "
            f"(default: ~/tensorflow_datasets); prepare it offline with python -m "
            f"abd_jax.prepare_data --dataset={spec.tfds_name} --manual_dir=<folder with "
            f"{archive}> --data_dir={data_dir or '<data_dir>'}")


def class_subset_positions(labels: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray]:
    """(positions int64 `[n]`, labels int32 `[n]`): the examples of a split whose stored label
    is in `classes`, in stored order, and their labels relabelled to positions in
    `classes`."""
    labels, classes = np.asarray(labels), np.asarray(classes)
    lookup = np.full(max(int(labels.max(initial=0)), int(classes.max())) + 1, -1, np.int32)
    lookup[classes] = np.arange(len(classes), dtype=np.int32)
    relabelled = lookup[labels]
    positions = np.flatnonzero(relabelled >= 0)
    return positions, relabelled[positions]


class ClassSubset:
    """A data source (`len`, `__getitems__`) over the examples `positions` of `source`."""

    def __init__(self, source, positions: np.ndarray):
        self.source, self.positions = source, np.asarray(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitems__(self, indices):
        return self.source.__getitems__([int(self.positions[i]) for i in indices])

    def __getitem__(self, i):
        return self.source[int(self.positions[i])]


def load_split(spec: DatasetSpec, split: str, data_dir=None, download: bool = False,
               chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole split in stored order: (images uint8 [N, H, W, C], labels int32 [N]).
    See `open_split` for preparation and errors."""
    return _read_all(open_split(spec, split, data_dir, download), spec, chunk_size)


def open_split(spec: DatasetSpec, split: str, data_dir=None, download: bool = False,
               decoders=None):
    """Random access to one split: a TFDS data source (`len`, `__getitems__(indices)` ->
    example dicts), read from its array_record files; `decoders` as in `tfds.data_source`
    (e.g. `{"image": tfds.decode.SkipDecoding()}` to read labels only).

    `sklearn_digits` is prepared into data_dir on first use (no network needed). Other
    datasets must be prepared already (or downloadable when `download`); otherwise a
    FileNotFoundError says how to prepare them offline.
    """
    import tensorflow_datasets as tfds  # noqa: PLC0415 (keeps TFDS out of model-only uses)

    from abd_jax import datasets  # noqa: PLC0415
    if spec.prepared_dir:
        return tfds.builder_from_directory(spec.prepared_dir).as_data_source(
            split=split, decoders=decoders)
    if spec.tfds_name == "sklearn_digits":
        try:
            datasets.download_and_prepare(spec.tfds_name, data_dir)
        except OSError as err:  # e.g. a read-only or misplaced data dir
            raise ValueError(f"cannot prepare {spec.tfds_name} in data_dir {data_dir} "
                             f"({type(err).__name__}: {err}); pass a writable folder as "
                             "--config.data_dir") from err
    elif download and spec.tfds_name in datasets.OFFLINE_BUILDERS:
        try:  # TFDS's own CIFAR download/preparation needs TensorFlow; ours does not.
            datasets.download_and_prepare(spec.tfds_name, data_dir, download=True)
        except OSError as err:
            raise FileNotFoundError(f"downloading {spec.tfds_name} failed ({err}).\n"
                                    + _not_prepared_message(spec, data_dir)) from err
    try:
        return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir,
                                download=download, decoders=decoders)
    except Exception as err:  # An unprepared dataset fails in various ways (or the download).
        if tfds.builder(spec.tfds_name, data_dir=data_dir).is_prepared():
            raise
        raise FileNotFoundError(_not_prepared_message(spec, data_dir)) from err


def _read_all(source, spec: DatasetSpec, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(source)
    images = np.empty((n, *spec.image_shape), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, chunk_size):
        examples = source.__getitems__(list(range(start, min(start + chunk_size, n))))
        images[start:start + len(examples)] = [ex["image"] for ex in examples]
        labels[start:start + len(examples)] = [ex[spec.label_key] for ex in examples]
    return images, labels


# The datasets the release orders with numpy's seed-1993 shuffle (trainer.py: ImageNet).
RELEASE_1993_DATASETS = ("imagenet2012", "imagenet100")
ORDER_MODES = ("release", "1993", "shuffle", "identity")


def class_order(num_classes: int, mode="shuffle", seed: int = 0, repeat: int = 0,
                dataset: str = "") -> np.ndarray:
    """Class order int32 `[C]`:

    - "release": the authors' release (`trainer.py`): Python's `random.seed(seed)` then
      `random.shuffle(list(range(C)))` (the same in every Python 3); for ImageNet
      (`RELEASE_1993_DATASETS`, by `dataset`) the "1993" order, whatever the seed;
    - "1993": numpy's `RandomState(1993)` permutation, the iCaRL / PODNet / PyCIL order
      (equal to `np.random.seed(1993); np.random.shuffle`), the same for every repeat;
    - "shuffle": numpy's `RandomState(seed).permutation(C)`;
    - "identity"; or explicit ids (a sequence, or a comma-separated string such as
      "3,0,2,1"; several orders separated by ";" give repeat r the r-th).
    """
    if isinstance(mode, str) and ";" in mode:
        orders = [m for m in mode.split(";") if m.strip()]
        if repeat >= len(orders):
            raise ValueError(f"class_order lists {len(orders)} orders (separated by ';') but "
                             f"repeat {repeat + 1} needs one: add orders or lower "
                             "--config.repeats")
        mode = orders[repeat]
    if isinstance(mode, str) and "," in mode:
        try:
            mode = [int(v) for v in mode.split(",")]
        except ValueError:
            raise ValueError(f"explicit class order {mode!r} must be comma-separated "
                             "integers") from None
    if isinstance(mode, str):
        if mode == "release" and dataset in RELEASE_1993_DATASETS:
            mode = "1993"
        if mode == "release":
            order = list(range(num_classes))
            random.Random(seed).shuffle(order)
            return np.asarray(order, np.int32)
        if mode == "1993":
            return np.random.RandomState(1993).permutation(num_classes).astype(np.int32)
        if mode == "shuffle":
            return np.random.RandomState(seed).permutation(num_classes).astype(np.int32)
        if mode == "identity":
            return np.arange(num_classes, dtype=np.int32)
        raise ValueError(f"class order mode {mode!r}: use one of {', '.join(ORDER_MODES)} or a "
                         "list of class ids (--config.class_order)")
    order = np.asarray(mode)
    if order.shape != (num_classes,) or not np.array_equal(np.sort(order),
                                                            np.arange(num_classes)):
        raise ValueError(f"explicit class order must be a permutation of range({num_classes}); "
                         f"got {list(order.ravel())}")
    return order.astype(np.int32)


def remap_labels(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Maps original class `order[i]` to new label `i`; int32, same shape as `labels`."""
    inverse = np.empty(len(order), np.int32)
    inverse[np.asarray(order)] = np.arange(len(order), dtype=np.int32)
    return inverse[labels]


def task_boundaries(num_classes: int, num_tasks: int,
                    first_task_classes: int = 0) -> list[tuple[int, int]]:
    """[(start, end)] label range of each of `num_tasks` tasks: equal tasks (cold start), or,
    with `first_task_classes` B > 0, a first task of B classes and `num_tasks - 1` equal
    steps over the rest (warm start: the field's "B50, 5 steps" is B = 50, num_tasks = 6)."""
    if first_task_classes:
        steps, rest = num_tasks - 1, num_classes - first_task_classes
        if not 0 < first_task_classes < num_classes or steps < 1 or rest % steps:
            valid = [d + 1 for d in range(1, rest + 1) if rest % d == 0] if rest > 0 else []
            raise ValueError(
                f"first_task_classes={first_task_classes}, num_tasks={num_tasks}: a first "
                f"task of {first_task_classes} of {num_classes} classes leaves "
                f"{max(rest, 0)} to split into {steps} equal steps; valid num_tasks (the "
                f"first task included) for it: {valid} (or first_task_classes=0 for equal "
                "tasks)")
        size = rest // steps
        return [(0, first_task_classes)] + [
            (first_task_classes + t * size, first_task_classes + (t + 1) * size)
            for t in range(steps)]
    if num_tasks < 1 or num_classes % num_tasks:
        valid = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
        raise ValueError(f"num_tasks={num_tasks} does not split {num_classes} classes into equal "
                         f"tasks; valid task counts: {valid}")
    size = num_classes // num_tasks
    return [(t * size, (t + 1) * size) for t in range(num_tasks)]


def class_indices(labels: np.ndarray, lo: int, hi: int, per_class_limit: int = 0) -> np.ndarray:
    """Indices (int64, increasing) of examples with (remapped) label in [lo, hi).

    With per_class_limit > 0 only the first `per_class_limit` examples of each class are kept.
    """
    keep = (labels >= lo) & (labels < hi)
    if per_class_limit > 0:
        keep = np.zeros_like(keep)
        for c in range(lo, hi):
            keep[np.flatnonzero(labels == c)[:per_class_limit]] = True
    return np.flatnonzero(keep)


def select_classes(images: np.ndarray, labels: np.ndarray, lo: int, hi: int,
                   per_class_limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of `class_indices(labels, lo, hi, per_class_limit)`."""
    keep = class_indices(labels, lo, hi, per_class_limit)
    return images[keep], labels[keep]
