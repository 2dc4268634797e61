"""`tiny_imagenet`: Tiny-ImageNet 200 read in place from the official zip in the manual dir."""
import io
import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from abd_jax.datasets.common import manual_dir, png_bytes

_PREFIX = "tiny-imagenet-200/"  # every member of the official zip lies in this folder


def _wnid(train_member: str) -> str:
    """The class of `tiny-imagenet-200/train/<wnid>/images/<file>`."""
    return train_member[len(_PREFIX + "train/"):].split("/")[0]


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny-ImageNet (200 classes, 64x64) from `<manual_dir>/tiny-imagenet-200.zip`, read in
    place: `train` = the 500 labelled training images per class, `test` = the labelled `val`
    set (labels from `val/val_annotations.txt`; the official `test` images have none).
    Classes are the sorted wnids; grey images are converted to RGB."""

    name = "tiny_imagenet"
    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # no downloads through TFDS, so no checksums to look up
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
        archive = os.path.join(manual_dir(dl_manager), self.ARCHIVE)
        if not os.path.isfile(archive):
            raise FileNotFoundError(f"{archive} not found; copy the official {self.ARCHIVE} "
                                    f"({self.URL}) into the manual dir")
        try:
            with zipfile.ZipFile(archive) as zf:
                names = zf.namelist()
                annotations = (zf.read(_PREFIX + "val/val_annotations.txt").decode().splitlines()
                               if _PREFIX + "val/val_annotations.txt" in names else [])
        except zipfile.BadZipFile as err:
            raise ValueError(f"{archive} is corrupt or truncated ({err})") from None
        train_names = sorted(n for n in names if n.startswith(_PREFIX + "train/")
                             and n.lower().endswith(".jpeg"))
        wnids = sorted({_wnid(n) for n in train_names})
        if len(wnids) != 200 or not annotations:
            raise ValueError(f"{archive} has {len(wnids)} training classes, not 200"
                             f"{'' if annotations else ', and no val/val_annotations.txt'}; "
                             "it is not the official tiny-imagenet-200.zip")
        label = {w: i for i, w in enumerate(wnids)}
        train = [(n, label[_wnid(n)]) for n in train_names]
        test = [(f"{_PREFIX}val/images/{fields[0]}", label[fields[1]])
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
                yield member, {"image": png_bytes(pixels), "label": label}
