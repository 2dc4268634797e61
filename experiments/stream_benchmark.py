"""Images/s of the streaming input path (`input_pipeline="stream"`) on this host.

Times `input_pipeline.StreamFeed` alone: grain reading the prepared array_record files,
decoding (and the dataset's host transform), stacking and placing each batch on the mesh,
as a training stage consumes it. Prints the device, CPU count and min/median/max over
repeats for every worker count.

    python experiments/stream_benchmark.py --dataset=cifar10 --data_dir=/tmp/tfds \
        --workers=0,2
    # ImageNet-shaped: generated ILSVRC2012 tars (500x375 JPEGs), prepared once, streamed
    # with the random-resized crop to 224x224
    python experiments/stream_benchmark.py --fake_imagenet=2000 --data_dir=/tmp/tfds \
        --workers=0,2
"""
import io
import os
import pathlib
import tarfile
import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from abd_jax import data as data_lib
from abd_jax import experiment, input_pipeline, sampling
from abd_jax.session import Session

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "cifar10", "a prepared dataset name or folder:<root>")
flags.DEFINE_string("data_dir", "", "TFDS data dir")
flags.DEFINE_integer("fake_imagenet", 0, "if > 0: write ILSVRC2012 tars with this many "
                     "training JPEGs (10 classes, 500x375, photo-sized) into "
                     "<data_dir>/fake_ilsvrc, prepare imagenet2012 from them in "
                     "<data_dir>/fake_imagenet and stream that")
flags.DEFINE_list("workers", ["0", "2"], "grain worker process counts to time")
flags.DEFINE_integer("batch_size", 128, "images per batch")
flags.DEFINE_integer("steps", 30, "batches timed per repeat")
flags.DEFINE_integer("repeats", 3, "timed repeats per worker count")
flags.DEFINE_integer("prefetch", 4, "batches read ahead")


def make_fake_imagenet(folder: pathlib.Path, count: int) -> None:
    """ILSVRC2012_img_{train,val}.tar in `folder`: `count` training JPEGs of 500x375 over
    the first 10 classes of TFDS's labels.txt (smooth random images, photo-sized files),
    and 10 validation JPEGs; written once."""
    from abd_jax import datasets  # noqa: PLC0415
    if (folder / "ILSVRC2012_img_val.tar").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    wnids = datasets.IMAGENET_LABELS_FILE.read_text().split()[:10]
    val_wnids = datasets.IMAGENET_VAL_LABELS_FILE.read_text().split()
    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(coarse).resize((500, 375), Image.BICUBIC).save(buf, "JPEG",
                                                                      quality=90)
        return buf.getvalue()

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as train_tar:
        for c, wnid in enumerate(wnids):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for i in range(c, count, len(wnids)):
                    add(class_tar, f"{wnid}_{i}.JPEG", jpeg())
            add(train_tar, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(folder / "ILSVRC2012_img_val.tar.part", "w") as val_tar:
        for wnid in wnids:
            number = val_wnids.index(wnid) + 1
            add(val_tar, f"ILSVRC2012_val_{number:08d}.JPEG", jpeg())
    (folder / "ILSVRC2012_img_val.tar.part").rename(folder / "ILSVRC2012_img_val.tar")


def time_feed(source, spec, labels, workers: int, session: Session) -> list[float]:
    """images/s of each repeat: `steps` batches through a fresh feed (after 2 warm-up)."""
    n = len(labels)
    steps_per_epoch = n // FLAGS.batch_size
    info = sampling.TaskInfo(index=np.arange(n, dtype=np.int32), count=np.int32(n),
                             num_old=np.int32(0), num_seen=np.int32(spec.num_classes),
                             steps_per_epoch=np.int32(steps_per_epoch),
                             total_steps=np.int32(steps_per_epoch * 1000),
                             key=np.array([0, 0], np.uint32), base_lr=np.float32(0.1),
                             lr_milestones=np.zeros(0, np.int32))
    rates = []
    for r in range(FLAGS.repeats):
        feed = input_pipeline.StreamFeed(
            source, spec, labels, info, r * (FLAGS.steps + 2), FLAGS.batch_size, 1,
            experiment.make_mesh(), workers, FLAGS.prefetch,
            input_pipeline.train_transform(spec), session)
        for _ in range(2):
            jax.block_until_ready(feed.next_call().images)
        tic = time.perf_counter()
        for _ in range(FLAGS.steps):
            jax.block_until_ready(feed.next_call().images)
        rates.append(FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - tic))
    return rates


def main(argv):
    del argv
    name = FLAGS.dataset
    data_dir = FLAGS.data_dir or None
    if FLAGS.fake_imagenet:
        from abd_jax import datasets  # noqa: PLC0415
        base = pathlib.Path(FLAGS.data_dir or "/tmp")
        make_fake_imagenet(base / "fake_ilsvrc", FLAGS.fake_imagenet)
        name, data_dir = "imagenet2012", str(base / "fake_imagenet")
        datasets.download_and_prepare(name, data_dir, base / "fake_ilsvrc")
    spec = data_lib.get_spec(name, data_dir)
    source = data_lib.open_split(spec, "train", data_dir)
    session = Session()
    labels = input_pipeline.split_labels(data_lib.open_split(
        spec, "train", data_dir, decoders=input_pipeline.labels_only()), session)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax "
          f"{jax.__version__}, host CPUs: {os.cpu_count()}")
    print(f"dataset {name}: {len(labels)} training images {spec.image_shape}, batch "
          f"{FLAGS.batch_size}, {FLAGS.steps} batches x {FLAGS.repeats} repeats")
    print(f"{'workers':>8s} {'min':>10s} {'median':>10s} {'max':>10s}  images/s")
    for workers in (int(w) for w in FLAGS.workers):
        rates = time_feed(source, spec, labels, workers, session)
        print(f"{workers:8d} {min(rates):10.0f} {np.median(rates):10.0f} {max(rates):10.0f}",
              flush=True)


if __name__ == "__main__":
    app.run(main)
