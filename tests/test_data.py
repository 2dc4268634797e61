"""Tests for abd_jax.data, abd_jax.datasets and abd_jax.prepare_data."""
import io
import shutil
import tarfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from abd_jax import augment, data, datasets, input_pipeline
from abd_jax.prepare_data import prepare


def test_task_boundaries():
    assert data.task_boundaries(100, 5) == [(0, 20), (20, 40), (40, 60), (60, 80), (80, 100)]
    assert data.task_boundaries(10, 1) == [(0, 10)]
    with pytest.raises(ValueError, match=r"valid task counts: \[1, 2, 5, 10\]"):
        data.task_boundaries(10, 3)
    with pytest.raises(ValueError, match="valid task counts"):
        data.task_boundaries(10, 0)
    # warm start: "B50, 5 steps" is first_task_classes=50, num_tasks=6
    assert data.task_boundaries(100, 6, 50) == [(0, 50), (50, 60), (60, 70), (70, 80),
                                                 (80, 90), (90, 100)]
    assert data.task_boundaries(100, 21, 40)[:3] == [(0, 40), (40, 43), (43, 46)]
    assert data.task_boundaries(200, 11, 100)[-1] == (190, 200)
    with pytest.raises(ValueError, match=r"valid num_tasks .*: \[2, 3, 6, 11, 26, 51\]"):
        data.task_boundaries(100, 5, 50)  # 50 classes do not split into 4 steps
    for bad in ((100, 1, 50), (100, 6, 100), (100, 6, -5)):
        with pytest.raises(ValueError, match="first_task_classes"):
            data.task_boundaries(*bad)


def test_class_order_shuffle_and_identity():
    a = data.class_order(100, "shuffle", seed=0)
    assert a.dtype == np.int32 and sorted(a) == list(range(100))
    np.testing.assert_array_equal(a, data.class_order(100, "shuffle", seed=0))
    assert not np.array_equal(a, data.class_order(100, "shuffle", seed=1))
    np.testing.assert_array_equal(data.class_order(5, "identity", seed=3), np.arange(5))


# R-DFCIL's release lists its CIFAR-100 orders (config/cifar100.yaml, "used by ABD and our
# R-DFCIL"): ABD's release's orders of repeats 0, 1 and 2.
RDFCIL_CLASS_ORDERS = (
    (23, 8, 11, 7, 48, 13, 1, 91, 94, 54, 16, 63, 52, 41, 80, 2, 47, 87, 78, 66, 19, 6, 24, 10,
     59, 30, 22, 29, 83, 37, 93, 81, 43, 99, 86, 28, 34, 88, 44, 14, 84, 70, 4, 20, 15, 21, 31,
     76, 57, 67, 73, 50, 69, 25, 98, 46, 96, 0, 72, 35, 58, 92, 3, 95, 56, 90, 26, 40, 55, 89,
     75, 71, 60, 42, 9, 82, 39, 18, 77, 68, 32, 79, 12, 85, 36, 17, 64, 27, 74, 45, 61, 38, 51,
     62, 65, 33, 5, 53, 97, 49),
    (53, 37, 65, 51, 4, 20, 38, 9, 10, 81, 44, 36, 84, 50, 96, 90, 66, 16, 80, 33, 24, 52, 91,
     99, 64, 5, 58, 76, 39, 79, 23, 94, 30, 73, 25, 47, 31, 45, 19, 87, 42, 68, 95, 21, 7, 67,
     46, 82, 11, 6, 41, 86, 88, 70, 18, 78, 71, 59, 43, 61, 22, 14, 35, 93, 56, 28, 98, 54, 27,
     89, 1, 69, 74, 2, 85, 40, 13, 75, 29, 34, 92, 0, 77, 55, 49, 3, 62, 12, 26, 48, 83, 60, 57,
     63, 15, 32, 8, 97, 72, 17),
    (0, 76, 61, 63, 1, 71, 2, 6, 16, 19, 13, 24, 49, 12, 75, 9, 83, 72, 5, 41, 99, 45, 89, 53,
     79, 18, 52, 92, 14, 42, 68, 44, 38, 84, 36, 17, 31, 15, 70, 88, 25, 97, 51, 73, 66, 37, 78,
     33, 80, 26, 82, 28, 60, 35, 43, 57, 23, 58, 91, 8, 62, 93, 98, 86, 29, 30, 22, 95, 67, 54,
     48, 40, 59, 96, 3, 87, 34, 64, 56, 69, 47, 65, 50, 81, 55, 20, 74, 4, 90, 27, 77, 32, 39,
     85, 94, 21, 46, 10, 11, 7),
)


def test_release_class_orders():
    """The release's orders (trainer.py): Python's random.shuffle with the repeat's seed for
    CIFAR and Tiny-ImageNet, numpy's seed 1993 for ImageNet in every repeat. "1993" is the
    iCaRL / PODNet / PyCIL order (CIFAR-100's begins 68, 56, 78, 8, as iCaRL's)."""
    first = lambda *args, **kw: data.class_order(*args, **kw)[:8].tolist()
    assert first(100, "release", seed=0) == [23, 8, 11, 7, 48, 13, 1, 91]
    assert first(100, "release", seed=1) == [53, 37, 65, 51, 4, 20, 38, 9]
    assert first(100, "release", seed=2) == [0, 76, 61, 63, 1, 71, 2, 6]
    assert first(200, "release", seed=0) == [131, 181, 22, 172, 144, 92, 97, 187]
    assert first(10, "release", seed=0) == [7, 8, 1, 5, 3, 4, 2, 0]
    imagenet = [54, 7, 894, 512, 126, 337, 988, 11]
    for seed in (0, 1):
        assert first(1000, "release", seed=seed, dataset="imagenet2012") == imagenet
        assert first(1000, "1993", seed=seed) == imagenet
        assert first(100, "1993", seed=seed) == [68, 56, 78, 8, 23, 84, 90, 65]
    for seed, order in enumerate(RDFCIL_CLASS_ORDERS):
        np.testing.assert_array_equal(data.class_order(100, "release", seed=seed), order)
    order = data.class_order(100, "release", seed=0)
    assert order.dtype == np.int32 and sorted(order) == list(range(100))
    # numpy's shuffle is another order
    assert not np.array_equal(order, data.class_order(100, "shuffle", seed=0))


def test_class_order_explicit():
    np.testing.assert_array_equal(data.class_order(4, [2, 0, 3, 1]), [2, 0, 3, 1])
    for bad in ([0, 1, 2], [0, 1, 1, 2], [0, 1, 2, 4]):
        with pytest.raises(ValueError, match=r"permutation of range\(4\)"):
            data.class_order(4, bad)
    with pytest.raises(ValueError, match="release, 1993, shuffle, identity"):
        data.class_order(4, "random")


def test_remap_labels_tasks_and_bijection():
    order = data.class_order(20, "shuffle", seed=2)
    new = data.remap_labels(np.arange(20), order)
    assert sorted(new) == list(range(20))
    np.testing.assert_array_equal(order[new], np.arange(20))
    labels = np.repeat(np.arange(20), 3)
    remapped = data.remap_labels(labels, order)
    for start, end in data.task_boundaries(20, 4):
        task_classes = order[start:end]
        got = remapped[np.isin(labels, task_classes)]
        assert got.min() >= start and got.max() < end
        assert set(got) == set(range(start, end))


def test_select_classes_and_limit():
    labels = np.array([0, 3, 1, 2, 1, 3, 1, 0, 2])
    images = np.arange(len(labels))[:, None, None, None].astype(np.uint8)
    x, y = data.select_classes(images, labels, 1, 3)
    np.testing.assert_array_equal(y, [1, 2, 1, 1, 2])
    np.testing.assert_array_equal(x[:, 0, 0, 0], [2, 3, 4, 6, 8])
    x, y = data.select_classes(images, labels, 1, 3, per_class_limit=1)
    np.testing.assert_array_equal(y, [1, 2])
    np.testing.assert_array_equal(x[:, 0, 0, 0], [2, 3])


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _images(c=3, b=8, size=16):
    return np.random.RandomState(0).randint(0, 256, (b, size, size, c)).astype(np.uint8)


def test_augment_shape_determinism_and_key():
    images = _images()
    aug = augment.AugmentConfig()
    out = augment.augment_batch(jax.random.key(0), images, aug, MEAN, STD)
    assert out.shape == images.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, augment.augment_batch(jax.random.key(0), images, aug, MEAN, STD))
    assert not np.allclose(out, augment.augment_batch(jax.random.key(1), images, aug, MEAN, STD))
    unit = np.asarray(out) * np.array(STD) + np.array(MEAN)
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    gray = augment.augment_batch(jax.random.key(0), _images(c=1), aug, (0.3,), (0.4,))
    assert gray.shape == (8, 16, 16, 1)


def test_augment_disabled_equals_normalize():
    images = _images()
    off = augment.AugmentConfig(brightness=0, contrast=0, flip=False, crop_padding=0)
    out = augment.augment_batch(jax.random.key(3), images, off, MEAN, STD)
    np.testing.assert_allclose(out, augment.normalize(images, MEAN, STD), atol=1e-6)


def test_augment_each_stage_changes_images():
    images = _images()
    for aug in (augment.AugmentConfig(0.5, 0, False, 0), augment.AugmentConfig(0, 0.8, False, 0),
                augment.AugmentConfig(0, 0, True, 0), augment.AugmentConfig(0, 0, False, 4)):
        out = augment.augment_batch(jax.random.key(0), images, aug, MEAN, STD)
        assert not np.allclose(out, augment.normalize(images, MEAN, STD)), aug


def test_augment_pins_each_operation_by_hand():
    """Each image's draws applied by hand: the release's ColorJitter (brightness x * b,
    contrast c x + (1 - c) mean gray, each clipped, in a random order), flip, and a crop of the
    image padded with black (0 before normalising, as torchvision pads the PIL image)."""
    images = _images(b=64, size=6)
    aug = augment.AugmentConfig(brightness=0.9, contrast=0.9, flip=True, crop_padding=2)
    key = jax.random.key(5)
    out = np.asarray(augment.augment_batch(key, images, aug, MEAN, STD)) * STD + MEAN
    keys = jax.random.split(key, len(images))
    orders = set()
    for i, x in enumerate(images.astype(np.float64) / 255):
        d = {k: np.asarray(v) for k, v in augment.augment_draws(keys[i], aug).items()}
        bright = lambda v: np.clip(v * d["brightness"], 0, 1)
        gray = lambda v: (v @ np.array([0.299, 0.587, 0.114])).mean()
        contrast = lambda v: np.clip(d["contrast"] * v + (1 - d["contrast"]) * gray(v), 0, 1)
        x = bright(contrast(x)) if d["contrast_first"] else contrast(bright(x))
        orders.add(bool(d["contrast_first"]))
        x = x[:, ::-1] if d["flip"] else x
        padded = np.zeros((10, 10, 3))
        padded[2:8, 2:8] = x
        want = padded[d["top"]:d["top"] + 6, d["left"]:d["left"] + 6]
        np.testing.assert_allclose(out[i], want, atol=2e-5)
    assert orders == {True, False}
    # a white image shows the black padding wherever the crop is off-centre
    white = np.full((16, 8, 8, 3), 255, np.uint8)
    crop = augment.AugmentConfig(0, 0, False, 4)
    pixels = np.asarray(augment.augment_batch(key, white, crop, MEAN, STD)) * STD + MEAN
    assert set(np.round(pixels, 4).ravel()) == {0.0, 1.0}


def _abd_before_policy(rng, images, aug, mean, std):
    """augment.augment_batch as it was before AugmentConfig.policy existed, verbatim."""
    def one(key, x):
        k_bright, k_contrast, k_flip, k_crop = jax.random.split(key, 4)
        factor = lambda k, a: jax.random.uniform(k, (), minval=max(0.0, 1 - a), maxval=1 + a)
        top, left = jax.random.randint(k_crop, (2,), 0, 2 * aug.crop_padding + 1)
        d = dict(brightness=factor(k_bright, aug.brightness),
                 contrast=factor(k_contrast, aug.contrast),
                 contrast_first=jax.random.bernoulli(jax.random.fold_in(key, 4)),
                 flip=jax.random.bernoulli(k_flip), top=top, left=left)
        brightness = lambda v: jnp.clip(v * d["brightness"], 0.0, 1.0)

        def contrast(v):
            gray = v[..., 0] if v.shape[-1] == 1 else v @ jnp.array([0.299, 0.587, 0.114])
            return jnp.clip(d["contrast"] * v + (1 - d["contrast"]) * gray.mean(), 0.0, 1.0)

        x = jnp.where(d["contrast_first"], brightness(contrast(x)), contrast(brightness(x)))
        x = jnp.where(d["flip"], x[:, ::-1], x)
        p = aug.crop_padding
        padded = jnp.pad(x, ((p, p), (p, p), (0, 0)))
        return jax.lax.dynamic_slice(padded, (d["top"], d["left"], 0), x.shape)

    x = images.astype(jnp.float32) / 255.0
    keys = jax.random.split(rng, images.shape[0])
    x = jax.vmap(one)(keys, x)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def test_augment_policy_abd_is_the_default_and_unchanged():
    """policy="abd" (the default) gives, to the bit, what the code before `policy` gave (a
    verbatim copy above, compiled alike: XLA's fusion decides the last bits)."""
    assert augment.AugmentConfig().policy == "abd"
    images = _images()
    for aug in (augment.AugmentConfig(), augment.AugmentConfig(0.9, 0.5, True, 3, policy="abd")):
        out = augment.augment_batch(jax.random.key(7), images, aug, MEAN, STD)
        before = jax.jit(_abd_before_policy, static_argnums=2)(jax.random.key(7), images, aug,
                                                               MEAN, STD)
        np.testing.assert_array_equal(out, before)


def test_augment_policy_is_checked_and_pycil_draws():
    """The runner's AugmentConfig(**config.augment.to_dict()) takes `policy`; an unknown one
    stops with the choices; "pycil" draws crop, flip, brightness (no contrast: not in PyCIL's
    ColorJitter) and the AutoAugment sub-policy (tests/test_autoaugment.py pins the rest)."""
    with pytest.raises(ValueError, match=r"augment.policy='autoaugment'.*'abd', 'pycil'"):
        augment.AugmentConfig(policy="autoaugment")
    aug = augment.AugmentConfig(**dict(brightness=63 / 255, contrast=0.8, flip=True,
                                     crop_padding=4, policy="pycil"))
    d = augment.augment_draws(jax.random.key(0), aug)
    assert sorted(d) == ["apply", "brightness", "flip", "left", "sign", "sub_policy", "top"]
    assert 1 - 63 / 255 <= d["brightness"] <= 1 + 63 / 255 and 0 <= d["sub_policy"] < 25


def test_get_spec():
    assert data.get_spec("cifar100").num_classes == 100
    with pytest.raises(ValueError, match="cifar10"):
        data.get_spec("imagenet")


def _mock_getitems(keys, generator):
    return [generator[k] for k in keys]


def test_load_split_with_mock_data():
    # TFDS 4.9.10's mock sets `__getitems__` on a MagicMock without `self`; patch its helper.
    with tfds.testing.mock_data(num_examples=37), mock.patch(
            "tensorflow_datasets.testing.mocking._getitems", _mock_getitems):
        images, labels = data.load_split(data.get_spec("cifar100"), "train", chunk_size=10)
    assert images.shape == (37, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (37,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 100


def test_digits(tmp_path):
    spec = data.get_spec("digits")
    train_x, train_y = data.load_split(spec, "train", data_dir=tmp_path)
    test_x, test_y = data.load_split(spec, "test", data_dir=tmp_path)
    assert train_x.shape[1:] == (8, 8, 1) and train_x.dtype == np.uint8
    assert len(train_y) + len(test_y) == 1797
    counts = np.bincount(load_digits().target)
    np.testing.assert_array_equal(np.bincount(test_y, minlength=10), counts // 5)
    np.testing.assert_array_equal(np.bincount(train_y, minlength=10), counts - counts // 5)
    np.testing.assert_allclose(train_x.mean() / 255, spec.mean[0], atol=1e-4)
    np.testing.assert_allclose((train_x / 255).std(), spec.std[0], atol=1e-4)


@pytest.mark.parametrize("shape", [(8, 8, 1), (5, 7, 3), (64, 64, 3)])
def test_png_bytes_decode_to_the_image(shape):
    from PIL import Image
    rng = np.random.default_rng(0)
    planes = rng.integers(0, 256, shape[::-1], dtype=np.uint8)  # [C, W, H] as CIFAR stores it
    for image in (rng.integers(0, 256, shape, dtype=np.uint8), planes.transpose(2, 1, 0),
                  np.full(shape, 255, np.uint8), np.zeros(shape, np.uint8)):
        with Image.open(io.BytesIO(datasets.png_bytes(image))) as decoded:
            assert decoded.format == "PNG"
            assert decoded.mode == ("L" if shape[-1] == 1 else "RGB")
            np.testing.assert_array_equal(np.asarray(decoded).reshape(shape), image)


def _archive_test_split(shared_data_dir):
    """(images [10000, 32, 32, 3], labels) of test_batch.bin in the official archive."""
    with tarfile.open(shared_data_dir / "cifar-10-binary.tar.gz") as archive:
        raw = archive.extractfile("cifar-10-batches-bin/test_batch.bin").read()
    records = np.frombuffer(raw, np.uint8).reshape(-1, 1 + 3 * 32 * 32)
    return records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), records[:, 0]


@pytest.mark.slow
def test_prepare_cifar10_offline(prepared_cifar10, shared_data_dir, session):
    data_dir, counts = prepared_cifar10
    assert counts == {"train": 50000, "test": 10000}
    spec = data.get_spec("cifar10")
    for split, per_class in (("train", 5000), ("test", 1000)):
        labels = input_pipeline.split_labels(data.open_split(
            spec, split, data_dir, decoders=input_pipeline.labels_only()), session)
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
    # The test split's images decoded whole (the train split's take ~12 s more on 2 cores;
    # tests/test_input_pipeline.py streams some of them).
    images, labels_read = data.load_split(spec, "test", data_dir=data_dir)
    assert images.shape == (10_000, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels_read, labels)
    # The archive's (image, label) pairs, each once: TFDS stores them in its own order.
    pairs = lambda images, labels: sorted(zip(map(bytes, images), labels.tolist()))
    assert pairs(images, labels_read) == pairs(*_archive_test_split(shared_data_dir))


def _assert_no_partial_output(data_dir):
    assert not list(data_dir.glob("cifar10/*")), list(data_dir.glob("cifar10/*"))


def test_corrupt_archive(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "cifar-10-binary.tar.gz").write_bytes(b"not a gzip file" * 100)
    with pytest.raises(ValueError, match=r"cifar-10-binary.tar.gz is corrupt.*re-copy"):
        prepare("cifar10", tmp_path / "out", manual)
    _assert_no_partial_output(tmp_path / "out")


def test_truncated_archive(shared_data_dir, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with open(shared_data_dir / "cifar-10-binary.tar.gz", "rb") as f:
        (manual / "cifar-10-binary.tar.gz").write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        prepare("cifar10", tmp_path / "out", manual)
    _assert_no_partial_output(tmp_path / "out")


def _write_archive(manual, archive: str, folder: str, files: dict) -> None:
    """`manual/archive`, a .tar.gz holding `folder/<name>` with each `files[name]` bytes."""
    manual.mkdir(exist_ok=True)
    with tarfile.open(manual / archive, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def test_bad_record_size(tmp_path):
    manual = tmp_path / "manual"
    files = {"batches.meta.txt": b"\n".join(b"c%d" % i for i in range(10))}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        files[name] = bytes(3073 * 2 + (5 if name == "data_batch_3.bin" else 0))
    _write_archive(manual, "cifar-10-binary.tar.gz", "cifar-10-batches-bin", files)
    with pytest.raises(ValueError, match="data_batch_3.bin .* not a multiple of the 3073-byte"):
        prepare("cifar10", tmp_path / "out", manual)
    _assert_no_partial_output(tmp_path / "out")


def test_missing_archive(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "other.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="cifar-10-binary.tar.gz not found"):
        prepare("cifar10", tmp_path / "out", manual)
    shutil.rmtree(manual)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare("cifar10", tmp_path / "out", manual)


def test_unprepared_dataset_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m abd_jax.prepare_data "
                                                r"--dataset=cifar10 --manual_dir="):
        data.load_split(data.get_spec("cifar10"), "train", data_dir=tmp_path)


def test_download_path_fetches_the_archive_and_prepares(tmp_path, monkeypatch):
    """`download=True` fetches the official archive by URL (here a file:// URL standing in for
    the CIFAR host; a small archive in CIFAR-10's binary layout) and prepares TFDS's cifar10
    without TensorFlow: pixels and labels as written."""
    rng = np.random.RandomState(0)

    def records(n):  # (labels, R/G/B planes, the file's bytes: a label byte, then the planes)
        labels = rng.randint(0, 10, n).astype(np.uint8)
        planes = rng.randint(0, 256, (n, 3, 32, 32)).astype(np.uint8)
        return labels, planes, np.concatenate([labels[:, None], planes.reshape(n, -1)],
                                              1).tobytes()

    files = {f"data_batch_{i}.bin": records(2)[2] for i in range(1, 6)}
    want_labels, planes, files["test_batch.bin"] = records(20)
    files["batches.meta.txt"] = b"\n".join(b"c%d" % i for i in range(10))
    _write_archive(tmp_path / "host", "cifar-10-binary.tar.gz", "cifar-10-batches-bin", files)
    monkeypatch.setattr(datasets.OfflineCifar10, "URL",
                        (tmp_path / "host" / "cifar-10-binary.tar.gz").as_uri())
    images, labels = data.load_split(data.get_spec("cifar10"), "test", str(tmp_path / "tfds"),
                                     download=True)
    order = np.lexsort(images.reshape(20, -1).T)  # the split's order is TFDS's, not the file's
    want_images = planes.transpose(0, 2, 3, 1)
    want_order = np.lexsort(want_images.reshape(20, -1).T)
    np.testing.assert_array_equal(images[order], want_images[want_order])
    np.testing.assert_array_equal(labels[order], want_labels[want_order])
    assert (tmp_path / "tfds" / "downloads" / "manual" / "cifar-10-binary.tar.gz").exists()


def test_cifar100_binary_layout_two_label_bytes(tmp_path):
    """A hand-made archive in the CIFAR-100 binary layout (coarse, fine label bytes, then the
    R, G, B planes) is prepared as TFDS's cifar100 and read back with the fine labels."""
    rng = np.random.RandomState(0)
    splits = {}
    for name, n in (("train.bin", 6), ("test.bin", 4)):
        fine = rng.randint(0, 100, n).astype(np.uint8)
        coarse = (fine // 5).astype(np.uint8)
        planes = rng.randint(0, 256, (n, 3, 32, 32)).astype(np.uint8)
        splits[name] = (fine, planes)
        records = np.concatenate([coarse[:, None], fine[:, None], planes.reshape(n, -1)], 1)
        splits[name + "/bytes"] = records.tobytes()
    files = {"train.bin": splits["train.bin/bytes"], "test.bin": splits["test.bin/bytes"],
             "coarse_label_names.txt": b"\n".join(b"c%d" % i for i in range(20)),
             "fine_label_names.txt": b"\n".join(b"f%d" % i for i in range(100))}
    manual = tmp_path / "manual"
    _write_archive(manual, "cifar-100-binary.tar.gz", "cifar-100-binary", files)
    assert prepare("cifar100", tmp_path / "out", manual) == {"train": 6, "test": 4}
    images, labels = data.load_split(data.get_spec("cifar100"), "test", str(tmp_path / "out"))
    fine, planes = splits["test.bin"]
    expected = planes.transpose(0, 2, 3, 1)
    # TFDS stores examples in its own (hashed) order: match them up by content.
    order = [int(np.flatnonzero((expected == img).all(axis=(1, 2, 3)))[0]) for img in images]
    assert sorted(order) == [0, 1, 2, 3]
    np.testing.assert_array_equal(labels, fine[order])
