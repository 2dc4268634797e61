"""TFDS builders that prepare datasets offline and without TensorFlow.

* `OfflineCifar10` / `OfflineCifar100`: the official `cifar10` / `cifar100` builders, fed from
  the binary archive in the manual dir instead of the network. They write to the same place
  as the registered builders, so `tfds.data_source("cifar10", data_dir=...)` reads the result.
* `SklearnDigits` (registered as `sklearn_digits`): scikit-learn's 8x8 digits, for quick runs.

Images are yielded as PNG bytes encoded with PIL (TFDS's numpy image encoder needs TF).
"""
import gzip
import io
import os
import tarfile
import tempfile
import urllib.request
import zlib

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image
from sklearn.datasets import load_digits
from tensorflow_datasets.image_classification import cifar

_CIFAR_PIXELS = 3 * 32 * 32


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 image [H, W, C] with C in {1, 3}."""
    image = np.ascontiguousarray(image)
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


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


OFFLINE_BUILDERS = {"cifar10": OfflineCifar10, "cifar100": OfflineCifar100,
                    "sklearn_digits": SklearnDigits}


def fetch_archive(name: str, folder) -> epath.Path:
    """Downloads the official binary archive of `name` (cifar10 | cifar100) into `folder`
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

    The CIFAR archive is read from `manual_dir`; with `download` and no manual dir, it is
    first fetched into `<data_dir>/downloads/manual`. A no-op when already prepared. Returns
    the builder; its `info.splits` give the sizes.
    """
    if name not in OFFLINE_BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(OFFLINE_BUILDERS)}")
    if data_dir is not None:
        data_dir = epath.Path(data_dir).expanduser()
    if manual_dir is not None:
        manual_dir = epath.Path(manual_dir).expanduser()
    builder = OFFLINE_BUILDERS[name](data_dir=data_dir, file_format="array_record")
    if download and manual_dir is None and name != "sklearn_digits" and not builder.is_prepared():
        manual_dir = fetch_archive(name, epath.Path(builder.data_dir_root) / "downloads" / "manual")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False))
    return builder
