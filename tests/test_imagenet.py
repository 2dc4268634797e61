"""ImageNet (ILSVRC-2012) prepared from fake tars in the official layout (4 of the 1000
classes: per-class tars inside the train tar, flat validation JPEGs), read back through
`tfds.data_source`; configs/imagenet.py and ResNet-18 at 224x224; ImageNet-100 read from
the same preparation."""
import io
import json
import shutil
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from abd_jax import config as config_lib
from abd_jax import data as data_lib
from abd_jax import datasets, experiment, models, transforms
from configs import imagenet

# One worker runs this file: its module-wide fixtures are built once (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("imagenet")


WNIDS = datasets.IMAGENET_LABELS_FILE.read_text().split()
VAL_WNIDS = datasets.IMAGENET_VAL_LABELS_FILE.read_text().split()
CLASSES = (0, 417, 57, 999)  # class ids (lines of labels.txt) the fake archive holds


def _smooth(rng, height, width):
    """uint8 [height, width, 3]: a random colour gradient (JPEG keeps it close)."""
    corners = rng.uniform(0, 255, (2, 2, 3))
    y, x = np.linspace(0, 1, height)[:, None, None], np.linspace(0, 1, width)[None, :, None]
    top = corners[0, 0] * (1 - x) + corners[0, 1] * x
    bottom = corners[1, 0] * (1 - x) + corners[1, 1] * x
    return np.round(top * (1 - y) + bottom * y).astype(np.uint8)


def _encode(pixels, mode="RGB", fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_archives(folder, seed=0):
    """Writes ILSVRC2012_img_{train,val}.tar into `folder`; returns {split: {file name:
    (original pixels, label, stored as is)}} (CMYK and PNG files are re-encoded)."""
    rng = np.random.default_rng(seed)
    expected = {"train": {}, "test": {}}
    folder.mkdir(parents=True, exist_ok=True)
    # The middle class also holds a grey and a CMYK JPEG, and a PNG named .JPEG (as ImageNet).
    kinds = [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")]
    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as train:
        for c in CLASSES:
            class_tar = io.BytesIO()
            with tarfile.open(fileobj=class_tar, mode="w") as inner:
                for i, (mode, fmt) in enumerate(kinds if c == CLASSES[1] else kinds[:1] * 2):
                    name = f"{WNIDS[c]}_{10 * i + 7}.JPEG"
                    pixels = _smooth(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90)))
                    _add(inner, name, _encode(pixels, mode, fmt))
                    if mode == "L":
                        pixels = np.repeat(np.asarray(Image.fromarray(pixels).convert("L"))
                                           [..., None], 3, axis=-1)
                    expected["train"][name] = (pixels, c, mode != "CMYK" and fmt == "JPEG")
            _add(train, f"{WNIDS[c]}.tar", class_tar.getvalue())
    with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as val:
        for c in CLASSES:
            numbers = [i + 1 for i, w in enumerate(VAL_WNIDS) if w == WNIDS[c]][:2]
            for number in numbers:
                name = f"ILSVRC2012_val_{number:08d}.JPEG"
                pixels = _smooth(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90)))
                _add(val, name, _encode(pixels))
                expected["test"][name] = (pixels, c, True)
    return expected


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    expected = make_archives(root / "manual")
    datasets.download_and_prepare("imagenet2012", root / "tfds", root / "manual")
    return root, expected


def test_both_splits_read_back_as_rgb_images_of_their_own_size(prepared):
    root, expected = prepared
    for split in ("train", "test"):
        source = tfds.data_source("imagenet2012", split=split, data_dir=str(root / "tfds"))
        assert len(source) == len(expected[split])
        examples = source.__getitems__(list(range(len(source))))
        for ex in examples:
            name = ex["file_name"].decode()
            pixels, label, stored_as_is = expected[split][name]
            assert ex["label"] == label
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == pixels.shape
            # JPEG is lossy: the smooth originals come back within a few levels.
            error = np.abs(ex["image"].astype(int) - pixels)
            assert error.mean() < 2 and error.max() < 24, name
        assert sorted(ex["file_name"].decode() for ex in examples) == sorted(expected[split])


def test_jpegs_are_stored_as_they_are_and_decode_as_pil_decodes_them(prepared):
    root, expected = prepared
    source = tfds.data_source("imagenet2012", split="train", data_dir=str(root / "tfds"))
    with tarfile.open(root / "manual" / "ILSVRC2012_img_train.tar") as train:
        originals = {}
        for member in train.getmembers():
            with tarfile.open(fileobj=io.BytesIO(train.extractfile(member).read())) as inner:
                originals.update({m.name: inner.extractfile(m).read()
                                  for m in inner.getmembers()})
    for ex in source.__getitems__(list(range(len(source)))):
        name = ex["file_name"].decode()
        with Image.open(io.BytesIO(originals[name])) as image:
            decoded = np.asarray(image.convert("RGB"))
        if expected["train"][name][2]:  # RGB / grey JPEG: the same bytes, so the same pixels
            np.testing.assert_array_equal(ex["image"], decoded)
        else:  # CMYK / PNG: re-encoded as RGB JPEG at quality 100
            assert np.abs(ex["image"].astype(int) - decoded).mean() < 1.5
    # The raw records hold the original JPEG bytes of the RGB and grey images.
    for name, (_, _, stored_as_is) in expected["train"].items():
        assert stored_as_is == (datasets.rgb_or_grey_jpeg(originals[name]) is originals[name])


def test_labels_are_labels_txt_lines_of_1000_classes(prepared):
    root, _ = prepared
    builder = tfds.builder("imagenet2012", data_dir=str(root / "tfds"))
    assert builder.info.features["label"].num_classes == 1000
    assert builder.info.features["label"].names == sorted(WNIDS)
    assert set(builder.info.splits) == {"train", "test"}
    # Prepared once, it needs no manual dir any more (and passes the split check).
    assert datasets.download_and_prepare("imagenet2012", root / "tfds").info.splits[
        "test"].num_examples == 8
    spec = data_lib.DATASETS["imagenet2012"]
    assert (spec.tfds_name, spec.num_classes, spec.image_shape, spec.variable_size) == (
        "imagenet2012", 1000, (224, 224, 3), True)
    source = tfds.data_source("imagenet2012", split="test", data_dir=str(root / "tfds"))
    for ex in source.__getitems__(list(range(len(source)))):
        number = int(ex["file_name"].decode()[len("ILSVRC2012_val_"):-len(".JPEG")])
        assert WNIDS[ex["label"]] == VAL_WNIDS[number - 1]
        image = transforms.test_transform(spec)(ex["image"], None)
        assert image.shape == (224, 224, 3)


def test_missing_or_wrong_archives_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar and .*"
                                                "ILSVRC2012_img_val.tar not found"):
        datasets.download_and_prepare("imagenet2012", tmp_path / "tfds", tmp_path)
    make_archives(tmp_path / "manual")
    (tmp_path / "manual" / "ILSVRC2012_img_val.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_img_val\.tar not found; Place"):
        datasets.download_and_prepare("imagenet2012", tmp_path / "tfds", tmp_path / "manual")
    with tarfile.open(tmp_path / "manual" / "ILSVRC2012_img_val.tar", "w") as val:
        _add(val, "val_1.JPEG", _encode(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(ValueError, match=r"val_1\.JPEG, not an ILSVRC2012_val_"):
        datasets.download_and_prepare("imagenet2012", tmp_path / "tfds", tmp_path / "manual")
    with tarfile.open(tmp_path / "manual" / "ILSVRC2012_img_train.tar", "w") as train:
        _add(train, "n99999999.tar", b"")
    with pytest.raises(ValueError, match="n99999999.tar, not a <wnid>.tar"):
        datasets.download_and_prepare("imagenet2012", tmp_path / "tfds", tmp_path / "manual")


def test_tfds_own_preparation_is_refused_with_a_fix(prepared, tmp_path):
    # TFDS's imagenet2012 (labelled 'validation', unlabelled 'test') in the same data_dir.
    root, _ = prepared
    shutil.copytree(root / "tfds", tmp_path / "tfds")
    info_file = next((tmp_path / "tfds" / "imagenet2012").glob("*/dataset_info.json"))
    info = json.loads(info_file.read_text())
    info["splits"] = [dict(split, name="validation") if split["name"] == "test" else split
                      for split in info["splits"]]
    info_file.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\].*another data_dir"):
        datasets.download_and_prepare("imagenet2012", tmp_path / "tfds", root / "manual")


def test_imagenet_config_and_resnet18_at_224():
    c = imagenet.get_config()
    assert (c.dataset, c.model, c.batch_size, c.weight_decay, c.epochs, c.num_tasks,
            c.seed) == ("imagenet2012", "resnet18", 256, 1e-4, 100, 10, 0)
    # the release's ImageNet order: numpy's seed-1993 shuffle in every repeat (seeds 0, 1)
    want = np.random.RandomState(1993).permutation(1000)
    for repeat in (0, 1):
        np.testing.assert_array_equal(data_lib.class_order(
            1000, c.class_order, c.seed + repeat, repeat, c.dataset), want)
    assert tuple(c.lr_milestones) == (30, 60, 80, 90)
    assert (c.augment.brightness, c.augment.contrast, c.augment.flip,
            c.augment.crop_padding) == (0, 0, True, 0)
    assert c.synthesis.iterations == 50_000 and c.input_pipeline == "stream"
    config_lib.validate(c, num_devices=1)
    model = models.create_classifier(c.model, 1000, c.dtype, c.conv_impl)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 224, 224, 3)), jnp.float32)
    # Random variables of the right shapes (model.init's 11.7M draws take ~20 s on 2 CPUs).
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: np.abs(rng.normal(0, 0.05, s.shape)).astype(s.dtype),
                             shapes)
    logits, features = jax.jit(model.apply)(variables, images)
    assert logits.shape == (2, 1000) and features.shape == (2, 512)
    assert np.isfinite(logits).all()


@pytest.mark.slow
def test_a_streamed_two_task_run_on_the_fake_archive(prepared, tmp_path, session):
    """configs/imagenet.py end to end on the fake archive (a small net and schedule): the
    stream path crops the varying sizes on the host (random-resized for training, resize +
    centre crop for testing); top-5 lands in results.json."""
    c = imagenet.get_config()
    c.data_dir = str(prepared[0] / "tfds")
    c.download = False
    c.class_order = "identity"  # task 1: ids 0-499 (classes 0, 57, 417), task 2: 999
    c.num_tasks = 2
    c.model = "resnet8"
    c.method = "base"
    c.batch_size = 2
    c.epochs = 1
    c.num_devices = 1
    c.eval_batch_size = 4
    c.tensorboard = False
    splits = experiment.load_splits(c, session)
    assert splits.streamed and len(splits.train_images) == 10
    batch = splits.test_images[:2]
    assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.uint8
    results = experiment.run(c, tmp_path, session=session)
    rep = results["repeats"][0]
    assert len(rep["R_global"]) == 2
    top1, top5 = (np.array(rep[k], dtype=float) for k in ("R_global", "R_global_top5"))
    assert np.all(np.tril(top5) >= np.tril(top1))
    c.input_pipeline = "device"
    with pytest.raises(ValueError, match="input_pipeline=stream"):
        experiment.run(c, tmp_path / "device", session=session)


def test_imagenet50_is_the_first_50_classes_in_5_tasks():
    from configs import imagenet50
    c = imagenet50.get_config()
    spec = data_lib.classes_in_use(data_lib.get_spec(c.dataset), c.num_classes)
    assert (spec.num_classes, c.num_tasks, c.model, c.class_order) == (50, 5, "resnet18",
                                                                        "release")
    config_lib.validate(c, 1)


def test_imagenet100_is_the_first_100_ilsvrc_classes_relabelled(prepared, session):
    """ImageNet-100 (PODNet's val_100.txt: wnids n01440764 .. n01855672 as labels 0-99) reads
    the prepared ILSVRC-2012 and keeps the examples of its classes (here 0 and 57 of the
    fake archive's four), in stored order."""
    from configs import imagenet100
    assert WNIDS[0] == "n01440764" and WNIDS[99] == "n01855672"
    spec = data_lib.DATASETS["imagenet100"]
    assert spec.class_subset == tuple(range(100)) and spec.num_classes == 100
    c = imagenet100.get_config()
    c.data_dir = str(prepared[0] / "tfds")
    splits = experiment.load_splits(c, session)
    assert splits.streamed
    for images, labels, split in ((splits.train_images, splits.train_labels, "train"),
                                  (splits.test_images, splits.test_labels, "test")):
        full = tfds.data_source("imagenet2012", split=split, data_dir=c.data_dir)
        names = [ex["file_name"].decode() for ex in images.source.__getitems__(
            list(range(len(images))))]
        kept = sorted(n for n, (_, label, _) in prepared[1][split].items() if label in (0, 57))
        assert sorted(names) == kept and len(images) == len(labels) == 4
        for name, label in zip(names, labels):
            assert label == prepared[1][split][name][1]  # relabelled: 0 -> 0, 57 -> 57
        stored = [ex["label"] for ex in full.__getitems__(list(range(len(full))))]
        assert sorted(labels) == sorted(v for v in stored if v < 100)
        assert images[:4].shape == (4, 224, 224, 3)
    config_lib.validate(c, 1)
    assert (c.model, c.num_tasks, c.class_order) == ("resnet18", 10, "release")


def test_class_subsets_relabel_in_the_listed_order():
    positions, labels = data_lib.class_subset_positions(np.array([5, 2, 9, 2, 7, 5]), (5, 2))
    np.testing.assert_array_equal(positions, [0, 1, 3, 5])
    np.testing.assert_array_equal(labels, [0, 1, 1, 0])


def test_imagenet100_without_the_archive_refuses_in_one_line(tmp_path, session):
    """No prepared ILSVRC-2012: one line naming the preparation (the archives and the
    command); prepare_data takes --dataset=imagenet100 for it and names the missing tars."""
    from abd_jax import prepare_data
    from configs import imagenet100
    c = imagenet100.get_config()
    c.data_dir = str(tmp_path / "empty")
    c.download = False
    with pytest.raises(FileNotFoundError) as info:
        experiment.run(c, tmp_path / "run", session=session)
    message = str(info.value)
    assert "\n" not in message and "--dataset=imagenet2012" in message
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in message
    assert "100 of its classes" in message
    assert not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar and .*not found"):
        prepare_data.prepare("imagenet100", tmp_path / "tfds", tmp_path)


@pytest.mark.slow
def test_a_streamed_imagenet100_run_on_the_fake_archive(prepared, tmp_path, session):
    """configs/imagenet100.py end to end (a small net and schedule, identity order: class 0
    in task 1, class 57 in task 2)."""
    from configs import imagenet100
    c = imagenet100.get_config()
    c.data_dir = str(prepared[0] / "tfds")
    c.download = False
    c.class_order = "identity"
    c.num_tasks = 2
    c.model = "resnet8"
    c.method = "lwf"
    c.batch_size = 2
    c.epochs = 1
    c.num_devices = 1
    c.eval_batch_size = 4
    c.tensorboard = False
    results = experiment.run(c, tmp_path, session=session)
    assert len(results["repeats"][0]["R_global"]) == 2
    assert results["repeats"][0]["class_order"] == list(range(100))
