"""Users' own image folders (`--config.dataset=folder:<root>`) and any prepared TFDS dataset by
name: prepared once without TensorFlow, statistics from the training split, then read and run
like the built-in datasets."""
import json

import numpy as np
import pytest
from PIL import Image

from abd_jax import data as data_lib
from abd_jax import experiment
from helpers import tiny_config

CLASSES = ["emu", "ant", "cat", "dog"]  # sorted: ant, cat, dog, emu


def make_folder(root, per_class=(10, 3), size=8, seed=0, odd_file=None):
    """root/{train,test}/<class>/<i>.png of random RGB pixels; returns {split: (images, labels)}
    in the order the dataset must read them (classes sorted, files sorted)."""
    rng = np.random.RandomState(seed)
    out = {}
    for split, count in zip(("train", "test"), per_class):
        images, labels = [], []
        for label, name in enumerate(sorted(CLASSES)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.randint(0, 256, (size, size, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
                images.append(pixels)
                labels.append(label)
        out[split] = np.stack(images), np.array(labels)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    if odd_file:
        Image.fromarray(np.zeros((size + 2, size, 3), np.uint8)).save(
            root / "train" / "cat" / odd_file)
    return out


def test_folder_is_prepared_once_and_read_back_exactly(tmp_path):
    expected = make_folder(tmp_path / "pets")
    data_dir = tmp_path / "tfds"
    spec = data_lib.get_spec(f"folder:{tmp_path / 'pets'}", data_dir)
    assert spec.num_classes == 4 and spec.image_shape == (8, 8, 3)
    train = expected["train"][0].astype(np.float64) / 255
    np.testing.assert_allclose(spec.mean, train.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(spec.std, train.std(axis=(0, 1, 2)), rtol=1e-6)
    for split in ("train", "test"):
        images, labels = data_lib.load_split(spec, split, str(data_dir))
        np.testing.assert_array_equal(images, expected[split][0])  # PNG: lossless
        np.testing.assert_array_equal(labels, expected[split][1])
    # Prepared once: a second lookup reads the stored statistics, not the images.
    (tmp_path / "pets" / "train" / "ant" / "000.png").unlink()
    assert data_lib.get_spec(f"folder:{tmp_path / 'pets'}", data_dir) == spec


def test_images_of_another_size_name_the_file_and_the_fix(tmp_path):
    make_folder(tmp_path / "pets", odd_file="zzz.png")
    with pytest.raises(ValueError, match=r"zzz\.png is 8x10.*--config.image_size"):
        data_lib.get_spec(f"folder:{tmp_path / 'pets'}", tmp_path / "tfds")
    spec = data_lib.get_spec(f"folder:{tmp_path / 'pets'}", tmp_path / "tfds", image_size=6)
    assert spec.image_shape == (6, 6, 3)
    images, _ = data_lib.load_split(spec, "train", str(tmp_path / "tfds"))
    assert images.shape == (4 * 10 + 1, 6, 6, 3)


def test_bad_folders_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="root/train/<class>"):
        data_lib.get_spec(f"folder:{tmp_path / 'nothing'}", tmp_path / "tfds")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*folder:"):
        data_lib.get_spec("mnist", tmp_path / "tfds")


def test_a_prepared_tfds_dataset_is_usable_by_name(digits_data_dir):
    spec = data_lib.get_spec("sklearn_digits", digits_data_dir)
    assert spec.num_classes == 10 and spec.image_shape == (8, 8, 1)
    registered = data_lib.get_spec("digits")
    np.testing.assert_allclose(spec.mean, registered.mean, atol=1e-4)  # same train split
    images, labels = data_lib.load_split(spec, "test", digits_data_dir)
    ref_images, ref_labels = data_lib.load_split(registered, "test", digits_data_dir)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)


def test_a_two_task_run_on_a_folder(tmp_path):
    make_folder(tmp_path / "pets")
    config = tiny_config(str(tmp_path / "tfds"), dataset=f"folder:{tmp_path / 'pets'}",
                         num_tasks=2, batch_size=8, method="abd", epochs=1)
    results = experiment.run(config, tmp_path / "run")
    rep = results["repeats"][0]
    assert len(rep["A_global"]) == 2 and 0 <= rep["final_accuracy"] <= 100
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["dataset"] == f"folder:{tmp_path / 'pets'}"
    with pytest.raises(ValueError, match=r"valid task counts: \[1, 2, 4\]"):
        experiment.run(tiny_config(str(tmp_path / "tfds"), num_tasks=3,
                                   dataset=f"folder:{tmp_path / 'pets'}"), tmp_path / "bad")


def test_prepare_data_prepares_a_folder(tmp_path):
    from abd_jax.prepare_data import prepare
    make_folder(tmp_path / "pets")
    assert prepare(f"folder:{tmp_path / 'pets'}", tmp_path / "tfds", image_size=4) == {
        "train": 40, "test": 12}
    assert data_lib.get_spec(f"folder:{tmp_path / 'pets'}", tmp_path / "tfds",
                             image_size=4).image_shape == (4, 4, 3)
