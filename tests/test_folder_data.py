"""Users' own image folders (`--config.dataset=folder:<root>`) and any prepared TFDS dataset by
name: prepared once without TensorFlow, statistics from the training split, then read and run
like the built-in datasets."""
import io
import json
import os
import pathlib
import re
import subprocess
import sys

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


@pytest.mark.slow
def test_a_two_task_run_on_a_folder(tmp_path, session):
    make_folder(tmp_path / "pets")
    config = tiny_config(str(tmp_path / "tfds"), dataset=f"folder:{tmp_path / 'pets'}",
                         num_tasks=2, batch_size=8, method="abd", epochs=1)
    results = experiment.run(config, tmp_path / "run", session=session)
    rep = results["repeats"][0]
    assert len(rep["A_global"]) == 2 and 0 <= rep["final_accuracy"] <= 100
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["dataset"] == f"folder:{tmp_path / 'pets'}"
    with pytest.raises(ValueError, match=r"valid task counts: \[1, 2, 4\]"):
        experiment.run(tiny_config(str(tmp_path / "tfds"), num_tasks=3,
                                   dataset=f"folder:{tmp_path / 'pets'}"), tmp_path / "bad", session=session)


def test_prepare_data_prepares_a_folder(tmp_path):
    from abd_jax.prepare_data import prepare
    make_folder(tmp_path / "pets")
    assert prepare(f"folder:{tmp_path / 'pets'}", tmp_path / "tfds", image_size=4) == {
        "train": 40, "test": 12}
    assert data_lib.get_spec(f"folder:{tmp_path / 'pets'}", tmp_path / "tfds",
                             image_size=4).image_shape == (4, 4, 3)


# ------------------------------------------------- bad folders: one line naming the culprit

def small_folder(root, classes=("ant", "cat"), per_class=2, size=4):
    """root/{train,test}/<class>/<i>.png, 4x4 RGB; returns root."""
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.randint(0, 256, (size, size, 3)).astype(np.uint8)).save(
                    root / split / name / f"{i}.png")
    return root


def refused(root, tmp_path, culprit, match, error=ValueError):
    """Asserts that preparing `root` fails with one line naming `culprit` and matching
    `match`, and leaves nothing a later run would take for a prepared dataset."""
    with pytest.raises(error) as info:
        data_lib.get_spec(f"folder:{root}", tmp_path / "tfds")
    message = str(info.value)
    assert "\n" not in message and str(culprit) in message, message
    assert re.search(match, message), message
    assert not [p for p in (tmp_path / "tfds").rglob("*") if p.is_file()]
    return message


def _encoded(fmt, size=32):
    buf = io.BytesIO()
    pixels = np.random.RandomState(1).randint(0, 256, (size, size, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("name,content", [
    ("2.png", _encoded("PNG")[:300]),  # truncated in the pixel data
    ("2.jpg", _encoded("JPEG")[:400]),
    ("2.png", _encoded("PNG")[:20]),  # truncated in the header
    ("2.jpeg", b"\xff\xd8\xff" + bytes(200)),  # a JPEG marker, then garbage
])
def test_a_truncated_or_corrupt_image_is_named(tmp_path, name, content):
    root = small_folder(tmp_path / "pets")
    (root / "train" / "cat" / name).write_bytes(content)
    refused(root, tmp_path, root / "train" / "cat" / name,
            "cannot be read as an image.*truncated or corrupt; replace or delete it")


def test_files_with_an_image_suffix_must_be_images_others_are_skipped(tmp_path):
    root = small_folder(tmp_path / "pets")
    for stray in ("notes.txt", "labels.csv", ".DS_Store", "._0.png"):  # hidden: macOS's
        (root / "train" / "ant" / stray).write_text("not an image")
    (root / "test" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "ant" / "more").mkdir()  # folders inside class folders: not read
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "train" / "ant" / "more" / "x.png")
    assert data_lib.get_spec(f"folder:{root}", tmp_path / "tfds").num_classes == 2
    (root / "test" / "ant" / "readme.png").write_text("not an image")
    refused(tmp_path / "pets", tmp_path / "again",
            root / "test" / "ant" / "readme.png", "PIL recognises no image format in it")


def test_an_empty_or_missing_class_folder_is_named(tmp_path):
    root = small_folder(tmp_path / "pets", classes=("ant", "cat", "dog"))
    for image in (root / "train" / "cat").iterdir():
        image.unlink()
    (root / "train" / "cat" / "notes.txt").write_text("no images here")
    refused(root, tmp_path, root / "train" / "cat", r"holds no images.*add some, or remove it")
    small_folder(tmp_path / "b", classes=("ant", "cat", "dog"))
    for image in (tmp_path / "b" / "test" / "dog").iterdir():
        image.unlink()
    refused(tmp_path / "b", tmp_path, tmp_path / "b" / "test" / "dog",
            "holds no images; every class needs test images")
    (tmp_path / "b" / "test" / "dog").rmdir()
    refused(tmp_path / "b", tmp_path, tmp_path / "b" / "test" / "dog",
            "does not exist; every class needs test images")


def test_a_test_class_that_train_lacks_is_named(tmp_path):
    root = small_folder(tmp_path / "pets")
    small_folder(tmp_path / "extra", classes=("yak",))
    (tmp_path / "extra" / "test" / "yak").rename(root / "test" / "yak")
    refused(root, tmp_path, root / "test" / "yak",
            "is a class that .*train lacks; add its training images")


@pytest.mark.parametrize("limit", [7, 14])  # PIL: an error above 2 x limit, a warning above
def test_an_image_bomb_is_refused(tmp_path, monkeypatch, limit):
    root = small_folder(tmp_path / "pets")  # 16 pixels each
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    refused(root, tmp_path, root / "train" / "ant" / "0.png",
            f"possible decompression bomb.*at most {limit} pixels")


def test_links_out_of_the_folder_are_refused(tmp_path):
    root = small_folder(tmp_path / "pets")
    small_folder(tmp_path / "elsewhere", classes=("yak",))
    os.symlink(root / "train" / "ant" / "0.png", root / "train" / "cat" / "9.png")  # inside
    assert data_lib.get_spec(f"folder:{root}", tmp_path / "ok").num_classes == 2
    os.symlink(tmp_path / "elsewhere" / "train" / "yak", root / "train" / "yak")
    refused(root, tmp_path, root / "train" / "yak", "is a link to .*outside the dataset folder")
    (root / "train" / "yak").unlink()
    os.symlink(tmp_path / "elsewhere" / "test" / "yak" / "0.png", root / "test" / "cat" / "9.png")
    refused(root, tmp_path, root / "test" / "cat" / "9.png", "outside the dataset folder")


@pytest.mark.slow
def test_the_command_line_prints_one_line_and_exits_1(tmp_path):
    root = small_folder(tmp_path / "pets")
    (root / "train" / "cat" / "1.png").write_bytes(b"\x89PNG\r\n")
    done = subprocess.run(
        [sys.executable, "-m", "abd_jax.prepare_data", f"--dataset=folder:{root}",
         f"--data_dir={tmp_path / 'tfds'}"], capture_output=True, text=True, timeout=300,
        cwd=pathlib.Path(__file__).resolve().parents[1])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.replace("\r", "\n").strip().splitlines()[-1].strip()
    assert last.startswith(f"error: {root / 'train' / 'cat' / '1.png'} cannot be read"), last


def test_an_interrupted_preparation_leaves_nothing_and_a_rerun_reads_everything(
        tmp_path, monkeypatch):
    from abd_jax.datasets import folder as folder_lib
    from abd_jax.datasets import prepared_version_dir
    expected = make_folder(tmp_path / "pets", per_class=(3, 2), size=4)
    read_image, calls = folder_lib.read_image, []

    def stopped_at_the_fifth(*args):  # Ctrl-C while the 5th image is read
        calls.append(args[0])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return read_image(*args)

    monkeypatch.setattr(folder_lib, "read_image", stopped_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        data_lib.get_spec(f"folder:{tmp_path / 'pets'}", tmp_path / "tfds")
    assert not [p for p in (tmp_path / "tfds").rglob("*") if p.is_file()]
    # A preparation killed outright leaves TFDS's temporary folder: never taken as prepared,
    # and deleted by the next preparation.
    name = f"image_folder/{folder_lib.folder_config_name(tmp_path / 'pets', 0)}"
    killed = tmp_path / "tfds" / name / "incomplete.ABC123_1.0.0"
    killed.mkdir(parents=True)
    (killed / "dataset_info.json").write_text("{}")
    assert prepared_version_dir(name, tmp_path / "tfds") is None
    monkeypatch.setattr(folder_lib, "read_image", read_image)
    spec = data_lib.get_spec(f"folder:{tmp_path / 'pets'}", tmp_path / "tfds")
    assert not killed.exists(), "the next preparation deletes what a killed one left"
    for split in ("train", "test"):
        images, labels = data_lib.load_split(spec, split, str(tmp_path / "tfds"))
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])
    # The statistics file is replaced whole; a damaged one is recomputed.
    stats_file = pathlib.Path(spec.prepared_dir) / "abd_stats.json"
    stats_file.write_text(stats_file.read_text()[:20])
    assert data_lib.get_spec(f"folder:{tmp_path / 'pets'}", tmp_path / "tfds") == spec
    assert json.loads(stats_file.read_text())["num_classes"] == 4
    assert [p.name for p in stats_file.parent.glob(".*")] == []


@pytest.mark.slow
def test_two_processes_preparing_one_folder_both_finish_with_one_dataset(tmp_path):
    """Two runs started on a folder that is not prepared yet: the second waits for the
    first's preparation and reads it, instead of racing it to the version folder."""
    expected = make_folder(tmp_path / "pets", per_class=(60, 10), size=16)
    command = [sys.executable, "-m", "abd_jax.prepare_data",
               f"--dataset=folder:{tmp_path / 'pets'}", f"--data_dir={tmp_path / 'tfds'}"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=pathlib.Path(__file__).resolve().parents[1])
             for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
        assert "train: 240 examples" in out, out
    spec = data_lib.get_spec(f"folder:{tmp_path / 'pets'}", tmp_path / "tfds")
    images, labels = data_lib.load_split(spec, "train", str(tmp_path / "tfds"))
    np.testing.assert_array_equal(images, expected["train"][0])
    np.testing.assert_array_equal(labels, expected["train"][1])
    leftovers = [p.name for p in pathlib.Path(spec.prepared_dir).parent.iterdir()
                 if p.name.startswith("incomplete.")]
    assert leftovers == []
