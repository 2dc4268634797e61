"""Users' own images, `root/{train,test}/<class>/*` (`--config.dataset=folder:<root>`), prepared
once as a TFDS dataset (array_record) in the data dir."""
import hashlib
import pathlib
import re

import tensorflow_datasets as tfds
from absl import logging

from abd_jax.datasets.common import png_bytes
from abd_jax.datasets.folder_files import SPLITS, folder_layout, read_image
from abd_jax.datasets.prepared import dataset_stats, prepared_version_dir, preparing


def folder_config_name(root: pathlib.Path, image_size: int) -> str:
    """A TFDS config name unique to the folder's absolute path and the size setting."""
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_") or "root"
    return f"{slug}_{digest}_{'size' + str(image_size) if image_size else 'native'}"


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """`root/{train,test}/<class>/*` images prepared as array_record (classes sorted by folder
    name; which files are read or refused: `folder_files`). Grey images stay one channel when
    the first training image is grey. The layout is checked on construction, before anything
    is written; an unreadable image stops the preparation, and TFDS then removes what it
    wrote."""

    name = "image_folder"
    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # no downloads, so no checksums to look up

    def __init__(self, *, root, image_size: int = 0, **kwargs):
        self._root = pathlib.Path(root).resolve()
        self._image_size = image_size
        self._classes, self._files = folder_layout(self._root)
        self._first = self._files["train"][0][0]
        self._shape = read_image(self._first, image_size).shape  # [H, W, 1 or 3]
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
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        """Yields (relative path, {"image": PNG bytes of [H, W, C], "label"}); every image
        must have the first one's size unless image_size resizes them all."""
        for path, label in self._files[split]:
            image = read_image(path, self._image_size, self._shape[-1])
            if image.shape != self._shape:
                raise ValueError(
                    f"{path} is {image.shape[1]}x{image.shape[0]}, but {self._first} is "
                    f"{self._shape[1]}x{self._shape[0]}; pass --config.image_size=N (to "
                    "prepare_data: --image_size=N) to resize every image to N x N")
            yield str(path.relative_to(self._root)), {"image": png_bytes(image),
                                                      "label": label}


def prepare_folder(root, data_dir=None, image_size: int = 0) -> pathlib.Path:
    """Prepares `root` (see `ImageFolder`) once into data_dir; returns its version folder.
    A folder prepared before is not read again (delete that version folder to redo it)."""
    root = pathlib.Path(root).expanduser().resolve()
    name = f"{ImageFolder.name}/{folder_config_name(root, image_size)}"
    prepared = prepared_version_dir(name, data_dir)
    if prepared is None:
        builder = ImageFolder(root=root, image_size=image_size, data_dir=data_dir,
                              file_format="array_record")
        with preparing(pathlib.Path(builder.data_dir).parent):
            prepared = prepared_version_dir(name, data_dir)  # by a process waited for
            if prepared is None:
                logging.info("preparing %s into %s", root, builder.data_dir)
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                    try_download_gcs=False))
                prepared = pathlib.Path(builder.data_dir)
    dataset_stats(prepared)
    return prepared
