"""TFDS builders that prepare datasets offline and without TensorFlow.

* `OfflineCifar10` / `OfflineCifar100`: the official `cifar10` / `cifar100` builders, fed from
  the binary archive in the manual dir instead of the network. They write to the same place
  as the registered builders, so `tfds.data_source("cifar10", data_dir=...)` reads the result.
* `SklearnDigits` (registered as `sklearn_digits`): scikit-learn's 8x8 digits, for quick runs.
* `TinyImagenet` (registered as `tiny_imagenet`): from the official `tiny-imagenet-200.zip`.
* `Imagenet2012`: TFDS's `imagenet2012` from `ILSVRC2012_img_train.tar` / `ILSVRC2012_img_val.tar`
  (splits `train` and `test` = the validation set; images kept as their JPEG bytes).
* `ImageFolder`: users' own `root/{train,test}/<class>/*` images (`--config.dataset=folder:root`).

Images are yielded as PNG bytes (`_png_bytes`; TFDS's numpy image encoder needs TF), or
as the original JPEG bytes (ImageNet; TFDS decodes those with PIL when reading).
"""
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import struct
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder
from tensorflow_datasets.image_classification import cifar

_CIFAR_PIXELS = 3 * 32 * 32


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 image [H, W, C] with C in {1, 3} (greyscale or RGB, 8 bits).

    Every row is stored with PNG's "Up" filter (the difference to the row above, mod 256) and
    deflated at zlib's default level; PIL tries several filters per row. Preparing CIFAR-10
    takes 11.5 s of CPU instead of 14.7 s with PIL's encoder, for files about 7% larger. Any
    PNG decoder (TFDS reads them with PIL) returns `image` exactly."""
    height, width, channels = image.shape
    rows = np.asarray(image, np.uint8).reshape(height, width * channels)
    filtered = np.empty((height, 1 + width * channels), np.uint8)
    filtered[:, 0] = 2  # the "Up" filter; the first row's "above" is zeros
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # wraps mod 256 (uint8)
    header = struct.pack(">IIBBBBB", width, height, 8, {1: 0, 3: 2}[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(filtered.tobytes()))
            + _png_chunk(b"IEND", b""))


class _LocalArchive:
    """Stands in for the download manager: every URL 'downloads' to an extracted folder."""

    def __init__(self, folder: str):
        self._folder = folder

    def download_and_extract(self, url: str) -> str:
        del url
        return self._folder


class _OfflineCifarMixin:
    """Offline `_split_generators` / `_generate_examples` shared by CIFAR-10 and CIFAR-100."""

    ARCHIVE: str  # file name expected in the manual dir
    # Nothing is downloaded, so no checksums; TFDS's lookup of them (via `code_path`) would
    # import `importlib_resources`, which is not a dependency.
    url_infos = None

    TITLE: str  # "CIFAR-10" / "CIFAR-100"

    @property
    def _redo_hint(self) -> str:
        return (f"copy the official {self.TITLE} binary archive ({self.ARCHIVE}, "
                "https://www.cs.toronto.edu/~kriz/cifar.html) into the manual dir and rerun "
                f"`python -m abd_jax.prepare_data --dataset={self.name} --manual_dir=<that dir>`.")

    def _download_and_prepare(self, dl_manager, download_config):
        # The generators are consumed inside the parent's call, so the extracted files must
        # live until it returns; the temporary folder is removed afterwards, even on error.
        with tempfile.TemporaryDirectory(prefix=f"abd_{self.name}_") as tmp:
            self._extract_dir = tmp
            super()._download_and_prepare(dl_manager, download_config)

    def _split_generators(self, dl_manager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError as err:
            raise FileNotFoundError(str(err)) from None
        self._archive = os.path.join(manual_dir, self.ARCHIVE)
        if not os.path.isfile(self._archive):
            raise FileNotFoundError(f"{self._archive} not found; {self._redo_hint}")
        try:
            with tarfile.open(self._archive, "r:gz") as tar:
                tar.extractall(self._extract_dir, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise ValueError(f"{self._archive} is corrupt or truncated ({err}); re-"
                             f"{self._redo_hint}") from None
        info = self._cifar_info
        for name in info.train_files + info.test_files + info.label_files:
            if not os.path.isfile(os.path.join(self._extract_dir, info.prefix, name)):
                raise ValueError(f"{self._archive} has no {info.prefix}{name}; it is not the "
                                 f"binary-version archive; re-{self._redo_hint}")
        return super()._split_generators(_LocalArchive(self._extract_dir))

    def _generate_examples(self, split_prefix, filepaths):
        """Yields (index, {"id", *label_keys, "image": PNG bytes of [32, 32, 3]})."""
        label_keys = self._cifar_info.label_keys
        record_size = len(label_keys) + _CIFAR_PIXELS
        index = 0
        for path in filepaths:
            data = np.fromfile(path, dtype=np.uint8)
            if data.size % record_size:
                raise ValueError(
                    f"{os.path.basename(path)} in {self._archive} has {data.size} bytes, not a "
                    f"multiple of the {record_size}-byte record; re-{self._redo_hint}")
            records = data.reshape(-1, record_size)
            images = records[:, len(label_keys):].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for labels, image in zip(records[:, :len(label_keys)], images):
                record = dict(zip(label_keys, labels.tolist()))
                record["id"] = f"{split_prefix}{index:05d}"
                record["image"] = _png_bytes(image)
                yield index, record
                index += 1


class OfflineCifar10(_OfflineCifarMixin, cifar.Cifar10, skip_registration=True):
    """`cifar10` prepared from `<manual_dir>/cifar-10-binary.tar.gz`."""

    name = "cifar10"
    TITLE = "CIFAR-10"
    ARCHIVE = "cifar-10-binary.tar.gz"
    URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place {ARCHIVE} (CIFAR-10 binary version) in the manual dir."


class OfflineCifar100(_OfflineCifarMixin, cifar.Cifar100, skip_registration=True):
    """`cifar100` prepared from `<manual_dir>/cifar-100-binary.tar.gz`."""

    name = "cifar100"
    TITLE = "CIFAR-100"
    ARCHIVE = "cifar-100-binary.tar.gz"
    URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place {ARCHIVE} (CIFAR-100 binary version) in the manual dir."


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 1797 8x8 digits; every 5th image of each class goes to `test`."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # no downloads; see _OfflineCifarMixin

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="sklearn.datasets.load_digits(), pixels 0..16 scaled to 0..255.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        from sklearn.datasets import load_digits  # (scikit-learn takes ~2 s to import)
        digits = load_digits()
        images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
        labels = digits.target
        is_test = np.zeros(len(labels), bool)
        for c in range(10):
            is_test[np.flatnonzero(labels == c)[4::5]] = True
        return {
            "train": self._generate_examples(images, labels, np.flatnonzero(~is_test)),
            "test": self._generate_examples(images, labels, np.flatnonzero(is_test)),
        }

    def _generate_examples(self, images, labels, indices):
        """Yields (original index, {"image": PNG bytes of [8, 8, 1], "label"})."""
        for i in indices:
            yield int(i), {"image": _png_bytes(images[i]), "label": int(labels[i])}


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny-ImageNet (200 classes, 64x64) from `<manual_dir>/tiny-imagenet-200.zip`, read in
    place: `train` = the 500 labelled training images per class, `test` = the labelled `val`
    set (labels from `val/val_annotations.txt`; the official `test` images have none).
    Classes are the sorted wnids; grey images are converted to RGB."""

    name = "tiny_imagenet"
    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # no downloads through TFDS; see _OfflineCifarMixin
    ARCHIVE = "tiny-imagenet-200.zip"
    URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place {ARCHIVE} (the official zip) in the manual dir."

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description="Tiny-ImageNet 200 (CS231n), labelled train and val.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(64, 64, 3)),
                "label": tfds.features.ClassLabel(num_classes=200)}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError as err:
            raise FileNotFoundError(str(err)) from None
        archive = os.path.join(manual_dir, self.ARCHIVE)
        if not os.path.isfile(archive):
            raise FileNotFoundError(f"{archive} not found; copy the official {self.ARCHIVE} "
                                    f"({self.URL}) into the manual dir")
        try:
            names = zipfile.ZipFile(archive).namelist()
        except zipfile.BadZipFile as err:
            raise ValueError(f"{archive} is corrupt or truncated ({err})") from None
        prefix = "tiny-imagenet-200/"
        wnids = sorted({n[len(prefix) + 6:].split("/")[0] for n in names
                        if n.startswith(prefix + "train/") and n.lower().endswith(".jpeg")})
        if len(wnids) != 200:
            raise ValueError(f"{archive} has {len(wnids)} training classes, not 200; it is not "
                             "the official tiny-imagenet-200.zip")
        label = {w: i for i, w in enumerate(wnids)}
        with zipfile.ZipFile(archive) as zf:
            annotations = zf.read(prefix + "val/val_annotations.txt").decode().splitlines()
        train = [(n, label[n[len(prefix) + 6:].split("/")[0]]) for n in sorted(names)
                 if n.startswith(prefix + "train/") and n.lower().endswith(".jpeg")]
        test = [(f"{prefix}val/images/{fields[0]}", label[fields[1]])
                for fields in (line.split("\t") for line in annotations if line.strip())]
        return {"train": self._generate_examples(archive, train),
                "test": self._generate_examples(archive, test)}

    def _generate_examples(self, archive, members):
        """Yields (member name, {"image": PNG bytes of [64, 64, 3], "label"})."""
        with zipfile.ZipFile(archive) as zf:
            for member, label in members:
                with Image.open(io.BytesIO(zf.read(member))) as image:
                    pixels = np.asarray(image.convert("RGB"), np.uint8)
                if pixels.shape != (64, 64, 3):
                    raise ValueError(f"{member} in {archive} is {pixels.shape}, not 64x64")
                yield member, {"image": _png_bytes(pixels), "label": label}


# TFDS's class list (1000 wnids, sorted: line i is class i) and the wnid of each validation
# image (line i: ILSVRC2012_val_<i>.JPEG), shipped with tensorflow_datasets.
IMAGENET_LABELS_FILE = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
IMAGENET_VAL_LABELS_FILE = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")


def rgb_or_grey_jpeg(data: bytes, name: str = "image") -> bytes:
    """`data` itself when it is a JPEG in RGB or greyscale (TFDS's numpy decoder gives both
    as uint8 [h, w, 3]); anything else (ImageNet's CMYK JPEGs, its one PNG named .JPEG) is
    converted to RGB and re-encoded as JPEG at quality 100 (as TFDS's own builder does)."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                return data
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="JPEG", quality=100)
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for unreadable images
        raise ValueError(f"{name} is not a readable image ({err})") from None
    return buf.getvalue()


class Imagenet2012(imagenet2012_dataset_builder.Builder, skip_registration=True):
    """ILSVRC-2012 from `<manual_dir>/ILSVRC2012_img_train.tar` (a tar of per-class tars
    `<wnid>.tar` of JPEGs) and `ILSVRC2012_img_val.tar` (50,000 flat JPEGs), written where TFDS's
    own `imagenet2012` builder writes (same version and features: `image` JPEG bytes, `label`,
    `file_name`), so `tfds.data_source("imagenet2012", ...)` reads it and decodes each image
    to uint8 [h, w, 3] with PIL. Splits: `train`, and `test` = the labelled validation set
    (labels from TFDS's `validation_labels.txt`, line i for ILSVRC2012_val_<i>.JPEG).
    Classes: the 1000 wnids of TFDS's `labels.txt` (sorted); a train tar holding a subset of
    them is accepted. JPEG bytes are stored as they are, except CMYK / non-JPEG files, which
    are re-encoded as RGB JPEGs (`rgb_or_grey_jpeg`)."""

    name = "imagenet2012"
    url_infos = None  # no downloads; see _OfflineCifarMixin
    URL = None  # ImageNet needs a registration: no automatic download
    TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
    VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place {TRAIN_ARCHIVE} and {VAL_ARCHIVE} (ILSVRC-2012, from "
        "https://image-net.org/download-images after registering) in the manual dir.")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description="ILSVRC-2012; test = the labelled validation set.",
            features=tfds.features.FeaturesDict({  # as TFDS's imagenet2012, for its reader
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names_file=IMAGENET_LABELS_FILE),
                "file_name": tfds.features.Text()}),
            supervised_keys=("image", "label"), homepage="https://image-net.org/")

    def download_and_prepare(self, *args, **kwargs):
        super().download_and_prepare(*args, **kwargs)
        if "test" not in self.info.splits or "validation" in self.info.splits:
            raise ValueError(
                f"{self.data_dir} holds an imagenet2012 with splits {sorted(self.info.splits)} "
                "(TFDS's own preparation: its 'test' split has no labels); abd-jax needs 'train' "
                "and 'test' = the validation images: prepare it into another data_dir with "
                "python -m abd_jax.prepare_data --dataset=imagenet2012 --manual_dir=<folder "
                f"with {self.TRAIN_ARCHIVE} and {self.VAL_ARCHIVE}> --data_dir=<new folder>")

    def _split_generators(self, dl_manager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError as err:
            raise FileNotFoundError(str(err)) from None
        paths = {name: os.path.join(manual_dir, name)
                 for name in (self.TRAIN_ARCHIVE, self.VAL_ARCHIVE)}
        missing = [path for path in paths.values() if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"{' and '.join(missing)} not found; "
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        val_labels = IMAGENET_VAL_LABELS_FILE.read_text().split()
        return {"train": self._generate_examples(paths[self.TRAIN_ARCHIVE], "train"),
                "test": self._generate_examples(paths[self.VAL_ARCHIVE], "test", val_labels)}

    def _generate_examples(self, archive, split, val_labels=None):
        """Yields (file name, {"image": JPEG bytes, "label", "file_name"}), reading the tar
        as a stream (one pass, a class tar at a time in memory)."""
        examples = (self._train_examples(archive) if split == "train"
                    else self._val_examples(archive, val_labels))
        count = 0
        try:
            for name, data, label in examples:
                yield name, {"image": rgb_or_grey_jpeg(data, f"{name} in {archive}"),
                             "label": label, "file_name": name}
                count += 1
        except (tarfile.TarError, EOFError) as err:
            raise ValueError(f"{archive} is corrupt or truncated ({err})") from None
        if not count:
            raise ValueError(f"{archive} holds no images; it is not the official "
                             f"{os.path.basename(archive)}")

    def _train_examples(self, archive):
        """(file name, JPEG bytes, wnid) of every image in the per-class tars of `archive`."""
        wnids = set(self.info.features["label"].names)
        with tarfile.open(archive, "r|") as outer:
            for member in outer:
                if not member.isfile():
                    continue
                wnid = os.path.basename(member.name)[:-len(".tar")]
                if not member.name.endswith(".tar") or wnid not in wnids:
                    raise ValueError(
                        f"{archive} holds {member.name}, not a <wnid>.tar of one of the 1000 "
                        f"ILSVRC-2012 classes; it is not the official {self.TRAIN_ARCHIVE}")
                class_tar = io.BytesIO(outer.extractfile(member).read())
                with tarfile.open(fileobj=class_tar, mode="r|") as inner:
                    for image in inner:
                        if image.isfile():
                            yield (os.path.basename(image.name),
                                   inner.extractfile(image).read(), wnid)

    def _val_examples(self, archive, val_labels):
        """(file name, JPEG bytes, wnid) of every image in `archive`; the wnid of
        ILSVRC2012_val_<i>.JPEG is line i of `val_labels`."""
        with tarfile.open(archive, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = os.path.basename(member.name)
                match = re.fullmatch(r"ILSVRC2012_val_(\d{8})\.JPEG", name)
                if not match or not 1 <= int(match.group(1)) <= len(val_labels):
                    raise ValueError(
                        f"{archive} holds {member.name}, not an ILSVRC2012_val_<00000001.."
                        f"{len(val_labels):08d}>.JPEG; it is not the official "
                        f"{self.VAL_ARCHIVE}")
                yield name, tar.extractfile(member).read(), val_labels[int(match.group(1)) - 1]


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
        partial = folder / (builder_cls.ARCHIVE + ".part")
        urllib.request.urlretrieve(url, os.fspath(partial))
        partial.rename(target)
    return folder


def download_and_prepare(name: str, data_dir=None, manual_dir=None,
                         download: bool = False) -> tfds.core.DatasetBuilder:
    """Prepares `name` (a key of OFFLINE_BUILDERS) as array_record in `data_dir`.

    The archive (CIFAR, Tiny-ImageNet; ImageNet's two tars) is read from `manual_dir`; with
    `download` and no manual dir, it is first fetched into `<data_dir>/downloads/manual`
    (not ImageNet, which needs a registration). A no-op when already prepared. Returns
    the builder; its `info.splits` give the sizes.
    """
    if name not in OFFLINE_BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(OFFLINE_BUILDERS)}")
    if data_dir is not None:
        data_dir = epath.Path(data_dir).expanduser()
    if manual_dir is not None:
        manual_dir = epath.Path(manual_dir).expanduser()
    builder = OFFLINE_BUILDERS[name](data_dir=data_dir, file_format="array_record")
    if (download and manual_dir is None and getattr(builder, "URL", None)
            and not builder.is_prepared()):
        manual_dir = fetch_archive(name, epath.Path(builder.data_dir_root) / "downloads" / "manual")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False))
    return builder


# ---------------------------------------------------------------- users' own image folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
STATS_FILE = "abd_stats.json"


def folder_layout(root: pathlib.Path) -> tuple[list[str], dict[str, list]]:
    """(class names sorted, {split: [(image path, label), ...]}) of `root/{train,test}/<class>/*`;
    errors say what is missing."""
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"{root / split} is not a folder; a folder dataset needs root/train/<class>/* "
                "and root/test/<class>/* (class = sub-folder name, images PNG/JPEG/...)")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root / 'train'} has no class sub-folders")
    extra = sorted(d.name for d in (root / "test").iterdir()
                   if d.is_dir() and d.name not in classes)
    if extra:
        raise ValueError(f"{root / 'test'} has classes that train lacks: {extra[:5]}")
    files = {}
    for split in ("train", "test"):
        files[split] = [(p, label) for label, name in enumerate(classes)
                        if (root / split / name).is_dir()
                        for p in sorted((root / split / name).iterdir())
                        if p.suffix.lower() in IMAGE_SUFFIXES]
        counts = np.bincount([label for _, label in files[split]], minlength=len(classes))
        if split == "train" and (counts == 0).any():
            empty = [classes[i] for i in np.flatnonzero(counts == 0)[:5]]
            raise ValueError(f"{root / 'train'}: class folders without images: {empty}")
    return classes, files


def read_image(path: pathlib.Path, image_size: int, channels: int) -> np.ndarray:
    """uint8 [H, W, channels] (1: grey, 3: RGB), resized (bilinear) to image_size x
    image_size when image_size > 0."""
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        if image_size:
            image = image.resize((image_size, image_size), Image.BILINEAR)
        pixels = np.asarray(image, np.uint8)
    return pixels[..., None] if channels == 1 else pixels


def folder_config_name(root: pathlib.Path, image_size: int) -> str:
    """A TFDS config name unique to the folder's absolute path and the size setting."""
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_") or "root"
    return f"{slug}_{digest}_{'size' + str(image_size) if image_size else 'native'}"


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """`root/{train,test}/<class>/*` images prepared as array_record (classes sorted by folder
    name). Grey images stay one channel when the first training image is grey."""

    name = "image_folder"
    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # no downloads; see _OfflineCifarMixin

    def __init__(self, *, root, image_size: int = 0, **kwargs):
        self._root = pathlib.Path(root).resolve()
        self._image_size = image_size
        self._classes, self._files = folder_layout(self._root)
        with Image.open(self._files["train"][0][0]) as first:
            self._channels = 1 if first.mode in ("1", "L", "I", "I;16", "F") else 3
        self._shape = read_image(self._files["train"][0][0], image_size, self._channels).shape
        super().__init__(config=tfds.core.BuilderConfig(
            name=folder_config_name(self._root, image_size)), **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description=f"Images of {self._root}",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=self._shape),
                "label": tfds.features.ClassLabel(names=self._classes)}),
            supervised_keys=("image", "label"),
            disable_shuffling=True)  # stored in folder order: classes, then file names

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        """Yields (relative path, {"image": PNG bytes, "label"}); every image must have the
        first one's size unless image_size resizes them all."""
        for path, label in self._files[split]:
            image = read_image(path, self._image_size, self._channels)
            if image.shape != self._shape:
                raise ValueError(
                    f"{path} is {image.shape[1]}x{image.shape[0]}, but "
                    f"{self._files['train'][0][0]} is {self._shape[1]}x{self._shape[0]}; pass "
                    "--config.image_size=N to resize every image to N x N")
            yield str(path.relative_to(self._root)), {"image": _png_bytes(image),
                                                      "label": label}


def prepared_version_dir(name: str, data_dir) -> Optional[pathlib.Path]:
    """The newest prepared version folder of TFDS dataset `name` ("ds" or "ds/config") in
    data_dir, or None."""
    folder = pathlib.Path(data_dir or pathlib.Path.home() / "tensorflow_datasets") / name
    versions = [d for d in folder.glob("*") if (d / "dataset_info.json").exists()] \
        if folder.is_dir() else []
    if not versions:
        return None
    return max(versions, key=lambda d: tuple(int(p) for p in d.name.split(".")
                                             if p.isdigit()))


def dataset_stats(version_dir: pathlib.Path, chunk_size: int = 4096) -> dict:
    """Class count, image shape and per-channel pixel mean/std (in [0, 1]) of a prepared
    dataset's train split, cached in `<version_dir>/abd_stats.json` (when writable)."""
    cache = version_dir / STATS_FILE
    if cache.exists():
        return json.loads(cache.read_text())
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
        cache.write_text(json.dumps(stats))
    except OSError as err:
        logging.warning("could not cache the dataset's statistics in %s (%s)", cache, err)
    return stats


def prepare_folder(root, data_dir=None, image_size: int = 0) -> pathlib.Path:
    """Prepares `root` (see `ImageFolder`) once into data_dir; returns its version folder.
    A folder prepared before is not read again (delete that version folder to redo it)."""
    root = pathlib.Path(root).expanduser().resolve()
    name = f"{ImageFolder.name}/{folder_config_name(root, image_size)}"
    prepared = prepared_version_dir(name, data_dir)
    if prepared is None:
        builder = ImageFolder(root=root, image_size=image_size, data_dir=data_dir,
                              file_format="array_record")
        logging.info("preparing %s into %s", root, builder.data_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            try_download_gcs=False))
        prepared = pathlib.Path(builder.data_dir)
    dataset_stats(prepared)
    return prepared
