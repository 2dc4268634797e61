"""`sklearn_digits`: scikit-learn's 8x8 digits as a TFDS dataset, for quick runs."""
import numpy as np
import tensorflow_datasets as tfds

from abd_jax.datasets.common import png_bytes


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 1797 8x8 digits; every 5th image of each class goes to `test`."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # no downloads, so no checksums to look up

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
            yield int(i), {"image": png_bytes(images[i]), "label": int(labels[i])}
