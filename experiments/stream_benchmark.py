"""Images/s of the streaming input path (`input_pipeline="stream"`) on this host.

Times `input_pipeline.StreamFeed` alone: grain reading the prepared array_record files,
decoding (and the dataset's host transform), stacking and placing each batch on the mesh,
as a training stage consumes it. Prints the device, CPU count and min/median/max over
repeats for every worker count.

    python experiments/stream_benchmark.py --dataset=cifar10 --data_dir=/tmp/tfds \
        --workers=0,2
    # 224x224: a generated folder of JPEGs (smooth random images), prepared once
    python experiments/stream_benchmark.py --fake_images=2000 --fake_size=224 \
        --data_dir=/tmp/tfds --workers=0,2
"""
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from abd_jax import data as data_lib  # noqa: E402
from abd_jax import experiment, input_pipeline, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "cifar10", "a prepared dataset name or folder:<root>")
flags.DEFINE_string("data_dir", "", "TFDS data dir")
flags.DEFINE_integer("fake_images", 0, "if > 0: generate this many training JPEGs (10 "
                     "classes) of --fake_size in <data_dir>/stream_benchmark_<size> and "
                     "stream that folder dataset")
flags.DEFINE_integer("fake_size", 224, "side of the generated images")
flags.DEFINE_list("workers", ["0", "2"], "grain worker process counts to time")
flags.DEFINE_integer("batch_size", 128, "images per batch")
flags.DEFINE_integer("steps", 30, "batches timed per repeat")
flags.DEFINE_integer("repeats", 3, "timed repeats per worker count")
flags.DEFINE_integer("prefetch", 4, "batches read ahead")


def make_fake_folder(root: pathlib.Path, count: int, size: int) -> pathlib.Path:
    """`root/{train,test}/c<k>/*.jpg`: smooth random colour images (JPEG-sized like photos,
    not noise), 10 classes; written once."""
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("test", max(10, count // 10))):
        for i in range(n):
            folder = root / split / f"c{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
            image.save(folder / f"{i:06d}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def time_feed(source, spec, labels, workers: int) -> list[float]:
    """images/s of each repeat: `steps` batches through a fresh feed (after 2 warm-up)."""
    n = len(labels)
    steps_per_epoch = n // FLAGS.batch_size
    info = train.TaskInfo(index=jnp.arange(n, dtype=jnp.int32), count=jnp.int32(n),
                          num_old=jnp.int32(0), num_seen=jnp.int32(spec.num_classes),
                          steps_per_epoch=jnp.int32(steps_per_epoch),
                          total_steps=jnp.int32(steps_per_epoch * 1000),
                          key=jax.random.PRNGKey(0))
    rates = []
    for r in range(FLAGS.repeats):
        feed = input_pipeline.StreamFeed(
            source, spec, labels, info, r * (FLAGS.steps + 2), FLAGS.batch_size, 1,
            experiment.make_mesh(), workers, FLAGS.prefetch,
            input_pipeline.train_transform(spec))
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
    image_size = 0
    if FLAGS.fake_images:
        base = pathlib.Path(FLAGS.data_dir or "/tmp") / f"stream_benchmark_{FLAGS.fake_size}"
        name = "folder:" + str(make_fake_folder(base, FLAGS.fake_images, FLAGS.fake_size))
        image_size = FLAGS.fake_size
    spec = data_lib.get_spec(name, data_dir, image_size)
    source = data_lib.open_split(spec, "train", data_dir)
    labels = input_pipeline.split_labels(data_lib.open_split(
        spec, "train", data_dir, decoders=input_pipeline.labels_only()))
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax "
          f"{jax.__version__}, host CPUs: {os.cpu_count()}")
    print(f"dataset {name}: {len(labels)} training images {spec.image_shape}, batch "
          f"{FLAGS.batch_size}, {FLAGS.steps} batches x {FLAGS.repeats} repeats")
    print(f"{'workers':>8s} {'min':>10s} {'median':>10s} {'max':>10s}  images/s")
    for workers in (int(w) for w in FLAGS.workers):
        rates = time_feed(source, spec, labels, workers)
        print(f"{workers:8d} {min(rates):10.0f} {np.median(rates):10.0f} {max(rates):10.0f}",
              flush=True)


if __name__ == "__main__":
    app.run(main)
