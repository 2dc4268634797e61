"""The streaming input path (`config.input_pipeline`): training batches read on the host.

"device" (CIFAR-sized data) puts the whole training split on the mesh once and every step
gathers its batch there. "stream" leaves the split in its prepared array_record files:
grain reads, decodes and transforms each step's examples on host threads or worker
processes, every process only its own part of the global batch, and the batches reach the
step as `sampling.StreamedBatches`. Both paths pick the same examples for a step
(`sampling.batch_indices`), so they give the same numbers, and a batch is a function of
(task key, step) only: a checkpoint's (task, step) is the whole iterator state, and a resumed
run reads the same batches from there on.
"""
from __future__ import annotations

import os

import numpy as np

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from abd_jax import data as data_lib
from abd_jax import hosts, sampling, transforms

PIPELINES = ("auto", "device", "stream")


def use_stream(config, spec: data_lib.DatasetSpec, num_train: int) -> bool:
    """Whether the run streams its training data: `input_pipeline` "stream", or "auto" and
    the images vary in size or their pixels (`num_train` images) exceed `stream_above_gb`."""
    mode = config.input_pipeline
    if mode not in PIPELINES:
        raise ValueError(f"input_pipeline={mode!r}: use one of {PIPELINES}")
    if mode == "device" and spec.variable_size:
        raise ValueError(f"{spec.tfds_name} stores images of varying size, which only the "
                         "stream path crops to one size: set --config.input_pipeline=stream")
    if mode != "auto":
        return mode == "stream"
    return spec.variable_size or (
        num_train * int(np.prod(spec.image_shape)) > config.stream_above_gb * 2 ** 30)


def train_transform(spec: data_lib.DatasetSpec):
    """The host transform `(image, rng) -> uint8 [H, W, C]` of a stored training image
    (`transforms.train_transform`: random-resized crop for variable-size data), or None when
    images are stored at the model's input size."""
    return transforms.train_transform(spec) if spec.variable_size else None


def test_transform(spec: data_lib.DatasetSpec):
    """As `train_transform`, for evaluation (deterministic: resize + centre crop)."""
    return transforms.test_transform(spec) if spec.variable_size else None


def steps_per_call_for(default: int, batch_size: int, image_shape,
                       max_bytes: int = 2 ** 28) -> int:
    """Steps per jitted call on the stream path: `default`, fewer where one call's uint8
    batches would exceed `max_bytes` (ImageNet, batch 256: 6 steps, 231 MB)."""
    return max(1, min(default, max_bytes // (batch_size * int(np.prod(image_shape)))))


def split_labels(source_without_images, session) -> np.ndarray:
    """int32 `[N]` labels (read-only) of a split opened with images left undecoded
    (`open_split(..., decoders=labels_only())`), read in chunks. Every record is parsed, so
    the session keeps them per split and version of its files: the later runs of a table, a
    sweep or a resume read them once."""
    key = _split_files(source_without_images)
    if key is not None and key in session.labels:
        return session.labels[key]
    n, chunk = len(source_without_images), 8192
    labels = np.empty((n,), np.int32)
    for start in range(0, n, chunk):
        examples = source_without_images.__getitems__(list(range(start, min(start + chunk, n))))
        labels[start:start + len(examples)] = [ex["label"] for ex in examples]
    labels.flags.writeable = False
    if key is not None:
        session.labels[key] = labels
    return labels


def _split_files(source):
    """(path, size, mtime) of each file of a TFDS data source's split, or None if unknown: a
    prepared split rewritten in place gets another key."""
    try:
        folder, split = os.fspath(source.dataset_info.data_dir), str(source.split)
        paths = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                       if f"-{split}." in name)
        return tuple((path, (st := os.stat(path)).st_size, st.st_mtime_ns) for path in paths) \
            or None
    except (AttributeError, OSError):
        return None


def labels_only():
    """Decoders that skip the image feature (bytes stay encoded)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415
    return {"image": tfds.decode.SkipDecoding()}


class SourceImages:
    """The uint8 images `[N, H, W, C]` of a split, read from its data source on demand
    (through a deterministic `transform(image, rng)` when given, e.g. resize + centre crop).

    Indexing with a slice returns a numpy array; with an int array or a boolean mask it
    returns another `SourceImages` over those examples (nothing read yet), so that
    `evaluation.predict_all` can walk a selection batch by batch like an array."""

    def __init__(self, source, spec: data_lib.DatasetSpec, session, index=None, transform=None):
        self.source, self.spec, self.session, self.transform = source, spec, session, transform
        self.index = np.arange(len(source)) if index is None else np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple:
        return (len(self), *self.spec.image_shape)

    def __getitem__(self, key):
        if isinstance(key, slice):
            threads = os.cpu_count() or 1
            return read_images(self.source, self.index[key], self.spec, self.transform,
                               threads=threads, pool=self.session.pool(threads))
        return SourceImages(self.source, self.spec, self.session, self.index[np.asarray(key)],
                            self.transform)


def read_images(source, index: np.ndarray, spec: data_lib.DatasetSpec, transform=None,
                seeds=None, threads: int = 1, pool=None) -> np.ndarray:
    """uint8 `[n, H, W, C]` images of examples `index` (any order, repeats allowed), each
    passed through `transform(image, rng)` when given (a stored image of any size -> the
    spec's shape), with rng = `np.random.default_rng(seeds[i])`; decoded on `threads`
    threads of `pool` (image decoding releases the GIL)."""
    out = np.empty((len(index), *spec.image_shape), np.uint8)

    def read(lo: int, hi: int) -> None:
        examples = source.__getitems__([int(i) for i in index[lo:hi]])
        for i, ex in enumerate(examples, lo):
            out[i] = ex["image"] if transform is None else transform(
                ex["image"], np.random.default_rng(None if seeds is None else seeds[i]))

    bounds = np.linspace(0, len(index), max(1, min(threads, len(index) // 32)) + 1).astype(int)
    if len(bounds) == 2 or pool is None:
        read(0, len(index))
    else:
        list(pool.map(read, bounds[:-1], bounds[1:]))
    return out


class _ReadBatch:
    """grain map function: step -> (images uint8 `[b, H, W, C]`, labels int32 `[b]`), this
    process's rows `[row_lo, row_hi)` of the step's global batch. A row's random transform
    is seeded by (task key, step, row): the same on any process split and on resume."""

    def __init__(self, source, spec, labels, index, orders, steps_per_epoch, batch_size,
                 rows: tuple[int, int], transform=None, key_words=()):
        self.source, self.spec, self.labels, self.index = source, spec, labels, index
        self.orders, self.steps_per_epoch, self.batch_size = orders, steps_per_epoch, batch_size
        self.rows, self.transform, self.key_words = rows, transform, tuple(key_words)

    def __call__(self, step: int):
        epoch, position = divmod(int(step), self.steps_per_epoch)
        start = position * self.batch_size
        chosen = self.index[self.orders[epoch, start:start + self.batch_size]]
        chosen = chosen[self.rows[0]:self.rows[1]]
        seeds = None if self.transform is None else [
            (*self.key_words, int(step), row) for row in range(*self.rows)]
        return (read_images(self.source, chosen, self.spec, self.transform, seeds),
                self.labels[chosen])


def _epoch_orders():
    return jax.vmap(sampling.epoch_order, in_axes=(None, 0))


def _host_epoch_orders(info: sampling.TaskInfo, epochs: int, session) -> np.ndarray:
    """int32 `[epochs, M]`: `sampling.epoch_order` of every epoch, the same permutations the
    device path draws."""
    placed = jax.device_put((info, np.arange(epochs, dtype=np.int32)))
    return hosts.fetch(session.jitted(_epoch_orders)(*placed))


class StreamFeed(sampling.Feed):
    """The batches of one training stage (steps `[start, total)` of `info`), read by grain
    and placed on the mesh `steps_per_call` at a time as `sampling.StreamedBatches` (sharded
    over the batch axis; each process reads only its own rows)."""

    def __init__(self, source, spec: data_lib.DatasetSpec, labels: np.ndarray,
                 info: sampling.TaskInfo, start: int, batch_size: int, steps_per_call: int,
                 mesh: Mesh, workers: int = 0, prefetch: int = 4, transform=None,
                 session=None):
        import grain  # noqa: PLC0415 (only stream runs need it)
        host = hosts.fetch(info)
        total, steps_per_epoch = int(host.total_steps), int(host.steps_per_epoch)
        self.steps_per_call, self.step, self.total = steps_per_call, start, total
        self.batch_sharding = NamedSharding(mesh, P(None, "data"))
        self.replicated = NamedSharding(mesh, P())
        self.rows = self._process_rows(batch_size)
        read = _ReadBatch(source, spec, np.asarray(labels, np.int32), np.asarray(host.index),
                          _host_epoch_orders(host, -(-total // steps_per_epoch), session),
                          steps_per_epoch, batch_size, self.rows, transform,
                          np.asarray(jax.random.key_data(host.key)).ravel().tolist())
        dataset = grain.MapDataset.range(start, total).map(read).to_iter_dataset(
            grain.ReadOptions(num_threads=max(1, min(16, prefetch)),
                              prefetch_buffer_size=prefetch))
        if workers:
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        self._batches = iter(dataset)

    def _process_rows(self, batch_size: int) -> tuple[int, int]:
        """This process's rows of the global batch under the batch sharding."""
        spans = self.batch_sharding.addressable_devices_indices_map(
            (self.steps_per_call, batch_size))
        rows = [(s[1].start or 0, batch_size if s[1].stop is None else s[1].stop)
                for s in spans.values()]
        return min(r[0] for r in rows), max(r[1] for r in rows)

    def next_call(self) -> sampling.StreamedBatches:
        """The next `steps_per_call` batches (past the stage's end the last one repeats; those
        steps are skipped by the chunk)."""
        if self.step >= self.total:
            raise RuntimeError("the stream is past the stage's last step")
        images, labels = [], []
        for _ in range(min(self.steps_per_call, self.total - self.step)):
            x, y = next(self._batches)
            images.append(x)
            labels.append(y)
        while len(images) < self.steps_per_call:
            images.append(images[-1])
            labels.append(labels[-1])
        first = self.step
        self.step += self.steps_per_call
        rows = lambda a: hosts.to_global(np.stack(a), self.batch_sharding, whole=False)
        return sampling.StreamedBatches(images=rows(images), labels=rows(labels),
                                     first_step=hosts.to_global(np.int32(first),
                                                                self.replicated))
