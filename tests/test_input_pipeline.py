"""The streaming input path (`input_pipeline="stream"`): the same batches as the on-device
path, hence the same numbers; resumable mid-epoch from the checkpoint's (task, step)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax import data as data_lib
from abd_jax import experiment, input_pipeline, preemption, sampling, services
from abd_jax.session import Session
from helpers import tiny_config

SPEC = data_lib.DatasetSpec("fake", 5, (4, 4, 1), (0.5,), (0.25,))


class FakeSource:
    """A data source whose image `i` is filled with the value `i` (mod 256)."""

    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitems__(self, indices):
        self.reads += len(indices)
        return [{"image": np.full(SPEC.image_shape, i % 256, np.uint8), "label": i % 5}
                for i in indices]


def _task(count=23, capacity=30, steps_per_epoch=5, total=13):
    index = np.zeros(capacity, np.int32)
    index[:count] = np.arange(100, 100 + count)
    return sampling.TaskInfo(index=index, count=np.int32(count), num_old=np.int32(0),
                             num_seen=np.int32(5), steps_per_epoch=np.int32(steps_per_epoch),
                             total_steps=np.int32(total), key=np.array([0, 3], np.uint32),
                             base_lr=np.float32(0.1), lr_milestones=np.zeros(0, np.int32),
                             cosine_epochs=np.int32(0))


@pytest.mark.slow
@pytest.mark.parametrize("start,steps_per_call", [(0, 1), (7, 3)])
def test_stream_feed_reads_the_batches_the_device_path_samples(start, steps_per_call,
                                                               session):
    """Across epoch boundaries, from a mid-epoch start, with a padded last call."""
    task, batch = _task(), 4
    labels = np.arange(200, dtype=np.int32) % 7
    images = np.arange(200, dtype=np.int32) % 256
    feed = input_pipeline.StreamFeed(FakeSource(200), SPEC, labels, task, start, batch,
                                     steps_per_call, experiment.make_mesh(2), session=session)
    task = jax.device_put(task)
    step = start
    while step < 13:
        got = feed.next_call()
        assert got.images.shape == (steps_per_call, batch, *SPEC.image_shape)
        assert int(got.first_step) == step
        for i in range(steps_per_call):
            want_x, want_y = sampling.sample_batch(jnp.asarray(images), jnp.asarray(labels), task,
                                                min(step + i, 12), batch)
            x, y = got.batch(task, jnp.int32(step + i), batch)
            np.testing.assert_array_equal(np.asarray(x)[:, 0, 0, 0], np.asarray(want_x))
            np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))
        step += steps_per_call
    with pytest.raises(RuntimeError, match="past the stage"):
        feed.next_call()


def test_every_example_once_per_epoch(session):
    task = _task(count=20, steps_per_epoch=5, total=10)
    feed = input_pipeline.StreamFeed(FakeSource(200), SPEC, np.zeros(200, np.int32), task, 0,
                                     4, 5, experiment.make_mesh(1), session=session)
    for _ in range(2):
        seen = np.asarray(feed.next_call().images)[..., 0, 0, 0].ravel()
        assert sorted(seen) == list(range(100, 120))


def test_source_images_read_on_demand(session):
    source = FakeSource(50)
    images = input_pipeline.SourceImages(source, SPEC, session)
    assert len(images) == 50 and images.shape == (50, 4, 4, 1)
    picked = images[np.arange(50) % 2 == 0][np.array([3, 1, 4])]  # mask, then indices
    assert source.reads == 0 and len(picked) == 3
    np.testing.assert_array_equal(picked[:][:, 0, 0, 0], [6, 2, 8])
    assert source.reads == 3
    assert picked[3:].shape == (0, 4, 4, 1)


def test_auto_streams_only_large_splits():
    config = tiny_config("")
    assert not input_pipeline.use_stream(config, SPEC, 1000)
    config.stream_above_gb = 1e-6  # ~1 KiB of pixels
    assert input_pipeline.use_stream(config, SPEC, 1000)
    config.input_pipeline = "device"
    assert not input_pipeline.use_stream(config, SPEC, 1000)
    config.input_pipeline = "disk"
    with pytest.raises(ValueError, match="input_pipeline"):
        input_pipeline.use_stream(config, SPEC, 1000)


def test_streamed_calls_stay_under_a_quarter_gigabyte():
    assert input_pipeline.steps_per_call_for(50, 256, (224, 224, 3)) == 6
    assert input_pipeline.steps_per_call_for(50, 128, (32, 32, 3)) == 50
    assert input_pipeline.steps_per_call_for(1, 4096, (512, 512, 3)) == 1


def _log(workdir):
    lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "images_per_second"} for line in lines]


@pytest.mark.slow
def test_stream_and_device_paths_give_the_same_run(digits_data_dir, tmp_path, session):
    """E2E: task training, a balanced fine-tuning stage, herding on predicted features and
    evaluation all read through the stream path, on 2 devices."""
    runs = {}
    for pipeline in ("device", "stream"):
        config = tiny_config(digits_data_dir, method="e2e", num_tasks=2, epochs=1,
                             num_devices=2, input_pipeline=pipeline)
        config.e2e.balanced_epochs = 1
        runs[pipeline] = experiment.run(config, tmp_path / pipeline, session=session)
    assert runs["stream"]["repeats"][0]["R_global"] == runs["device"]["repeats"][0]["R_global"]
    assert _log(tmp_path / "stream") == _log(tmp_path / "device")


def test_split_labels_are_read_once_per_version_of_the_split_files(digits_data_dir,
                                                                    tmp_path):
    """A second run in the session reuses a split's labels; a split prepared again (its
    files rewritten) is read again."""
    session = Session()
    import shutil
    folder = tmp_path / "digits"
    shutil.copytree(digits_data_dir, folder)
    spec = data_lib.get_spec("digits")
    _, expected = data_lib.load_split(spec, "train", str(folder))

    class Counted:
        def __init__(self):
            self.source = data_lib.open_split(spec, "train", str(folder),
                                              decoders=input_pipeline.labels_only())
            self.dataset_info, self.split, self.reads = (
                self.source.dataset_info, self.source.split, 0)

        def __len__(self):
            return len(self.source)

        def __getitems__(self, indices):
            self.reads += len(indices)
            return self.source.__getitems__(indices)

    first, second = Counted(), Counted()
    np.testing.assert_array_equal(input_pipeline.split_labels(first, session), expected)
    np.testing.assert_array_equal(input_pipeline.split_labels(second, session), expected)
    assert (first.reads, second.reads) == (len(expected), 0)
    [train_file] = folder.rglob("*-train.array_record*")
    stat = train_file.stat()
    os.utime(train_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = Counted()
    np.testing.assert_array_equal(input_pipeline.split_labels(third, session), expected)
    assert third.reads == len(expected)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dgr", "rdfcil"])
def test_stages_that_reread_the_tasks_batches_stream_them_too(digits_data_dir, tmp_path,
                                                              session, method):
    """DGR's autoencoder pass and R-DFCIL's head fine-tuning read the task's batches again:
    streamed, the same numbers."""
    config = tiny_config(digits_data_dir, method=method, num_tasks=2, num_classes=4, epochs=1)
    config.rdfcil.finetune_epochs = 1
    device = experiment.run(config, tmp_path / "device", session=session)
    config.input_pipeline = "stream"
    streamed = experiment.run(config, tmp_path / "stream", session=session)
    assert streamed["repeats"][0]["R_global"] == device["repeats"][0]["R_global"]


@pytest.mark.slow
def test_cifar10_stream_resumes_mid_epoch_identically(prepared_cifar10, tmp_path,
                                                      monkeypatch, session):
    """Forced stream on real CIFAR-10 (its first 4 classes, 2 tasks): 5 steps per epoch,
    stopped after step 8 (mid epoch 2, checkpoint there), resumed: the same numbers and
    metrics log as without the stop."""
    cifar10_data_dir, _ = prepared_cifar10
    config = tiny_config(cifar10_data_dir, dataset="cifar10", method="lwf", num_tasks=2,
                         num_classes=4, batch_size=16, train_per_class=40,
                         input_pipeline="stream", eval_batch_size=500)
    config.model = "resnet8"
    straight = experiment.run(config, tmp_path / "straight", session=session)
    assert experiment.load_splits(config, session).streamed

    real_log = services.RepeatServices.log
    calls = {"n": 0}

    def stop_after_second_log(self, *args, **kwargs):
        real_log(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # step 8 of task 1
            self.session.stop.request()

    monkeypatch.setattr(services.RepeatServices, "log", stop_after_second_log)
    with Session() as stopped, pytest.raises(preemption.Preempted):
        experiment.run(config, tmp_path / "resumed", session=stopped)
    monkeypatch.setattr(services.RepeatServices, "log", real_log)
    from abd_jax import checkpoint as ckpt_lib
    checkpointer = ckpt_lib.RunCheckpointer(tmp_path / "resumed" / "checkpoints" / "repeat_0")
    try:
        assert checkpointer.latest() == (0, 8)  # mid epoch (epochs are 5 steps)
    finally:
        checkpointer.close()
    resumed = experiment.run(config, tmp_path / "resumed", session=session)
    assert resumed["repeats"][0]["R_global"] == straight["repeats"][0]["R_global"]
    assert _log(tmp_path / "resumed") == _log(tmp_path / "straight")
