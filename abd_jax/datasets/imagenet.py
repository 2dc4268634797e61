"""`imagenet2012` (ILSVRC-2012) prepared from the two official tars, read as a stream."""
import io
import os
import re
import tarfile

import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder

from abd_jax.datasets.common import manual_dir

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
    url_infos = None  # no downloads through TFDS, so no checksums to look up
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
        folder = manual_dir(dl_manager)
        paths = {name: os.path.join(folder, name)
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
