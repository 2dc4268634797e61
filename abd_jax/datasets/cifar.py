"""`cifar10` / `cifar100` prepared from the official binary archives in the manual dir.

TFDS's own builders (same name, version and features), with the network download replaced
by the archive, so `tfds.data_source("cifar10", data_dir=...)` reads what they write."""
import gzip
import os
import tarfile
import tempfile
import zlib

import numpy as np
from tensorflow_datasets.image_classification import cifar

from abd_jax.datasets.common import manual_dir, png_bytes

_PIXELS = 3 * 32 * 32  # one record's image: the R, G, B planes of 32 x 32


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
    TITLE: str  # "CIFAR-10" / "CIFAR-100"
    # Nothing is downloaded, so no checksums; TFDS's lookup of them (via `code_path`) would
    # import `importlib_resources`, which is not a dependency.
    url_infos = None

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
        self._archive = os.path.join(manual_dir(dl_manager), self.ARCHIVE)
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
        record_size = len(label_keys) + _PIXELS
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
                record["image"] = png_bytes(image)
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
