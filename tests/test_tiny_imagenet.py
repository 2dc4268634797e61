"""Tiny-ImageNet prepared from a fake archive in the official tiny-imagenet-200.zip layout
(200 classes, one training and one val image each), then a 2-task run on it."""
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from abd_jax import data as data_lib
from abd_jax import datasets, experiment
from helpers import tiny_config

# One worker runs this file: its module-wide fixtures are built once (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("tiny_imagenet")


def _jpeg(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def make_archive(folder, num_classes=200, seed=0):
    """Returns {"train"/"test": (images decoded as the builder must decode them, labels)}."""
    rng = np.random.RandomState(seed)
    wnids = [f"n{7000 - 13 * i:08d}" for i in range(num_classes)]  # not in sorted order
    label = {w: i for i, w in enumerate(sorted(wnids))}
    expected = {"train": {}, "test": {}}
    folder.mkdir(parents=True, exist_ok=True)
    p = "tiny-imagenet-200/"
    with zipfile.ZipFile(folder / "tiny-imagenet-200.zip", "w") as zf:
        zf.writestr(p + "wnids.txt", "\n".join(wnids))
        annotations = []
        for i, w in enumerate(wnids):
            grey = i == 3  # the official set has some grey JPEGs
            shape = (64, 64) if grey else (64, 64, 3)
            for split, member in (("train", f"{p}train/{w}/images/{w}_0.JPEG"),
                                  ("test", f"{p}val/images/val_{i}.JPEG")):
                data = _jpeg(rng.randint(0, 256, shape).astype(np.uint8))
                zf.writestr(member, data)
                decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                expected[split][member] = (decoded, label[w])
            annotations.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
            zf.writestr(f"{p}train/{w}/{w}_boxes.txt", "")
        zf.writestr(p + "val/val_annotations.txt", "\n".join(annotations))
        zf.writestr(p + "test/images/test_0.JPEG", _jpeg(np.zeros((64, 64, 3), np.uint8)))
    return expected


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    expected = make_archive(root / "manual")
    datasets.download_and_prepare("tiny_imagenet", root / "tfds", root / "manual")
    return root, expected


def test_train_and_val_are_read_with_sorted_wnid_labels(prepared):
    root, expected = prepared
    spec = data_lib.get_spec("tiny_imagenet")
    for split in ("train", "test"):
        images, labels = data_lib.load_split(spec, split, str(root / "tfds"))
        assert images.shape == (200, 64, 64, 3)
        want = sorted(expected[split].values(), key=lambda e: e[1])
        order = np.argsort(labels)
        np.testing.assert_array_equal(labels[order], np.arange(200))
        np.testing.assert_array_equal(images[order], np.stack([e[0] for e in want]))


def test_a_wrong_archive_is_named(tmp_path):
    make_archive(tmp_path / "manual", num_classes=4)
    with pytest.raises(ValueError, match="4 training classes, not 200"):
        datasets.download_and_prepare("tiny_imagenet", tmp_path / "tfds", tmp_path / "manual")
    with pytest.raises(FileNotFoundError, match=r"Place tiny-imagenet-200\.zip"):
        datasets.download_and_prepare("tiny_imagenet", tmp_path / "tfds2", tmp_path / "none")


@pytest.mark.slow
def test_a_two_task_run_on_tiny_imagenet(prepared, tmp_path, session):
    root, _ = prepared
    config = tiny_config(str(root / "tfds"), dataset="tiny_imagenet", num_tasks=2,
                         batch_size=16, method="lwf", epochs=1, download=False)
    results = experiment.run(config, tmp_path, session=session)
    assert len(results["repeats"][0]["A_global"]) == 2
