"""Tests for abd_jax.metrics on hand-made accuracy matrices."""
import json
import math

import numpy as np
import pytest

from abd_jax import metrics, reporting

nan = float("nan")


def _run(seed, Rg, Rl, spb=0.05, peak=3 * 2**20):
    return {"seed": seed, "class_order": list(range(4)), "R_global": Rg, "R_local": Rl,
            "train_seconds_per_batch": spb, "task_wall_seconds": [10.0, 20.0],
            "peak_memory_bytes": peak}


def test_average_and_final_accuracy():
    R = [[90, nan], [40, 80]]
    np.testing.assert_allclose(metrics.average_accuracy(R), [90, 60])
    assert metrics.final_accuracy(R) == pytest.approx(60)
    # Upper triangle ignored, None accepted; 3 tasks: A_3 = (30 + 60 + 90) / 3.
    R3 = [[50, 99, None], [20, 70, 99], [30, 60, 90]]
    np.testing.assert_allclose(metrics.average_accuracy(R3), [50, 45, 60])


def test_average_accuracy_unmeasured_row_is_nan_and_shape_checked():
    A = metrics.average_accuracy([[90, nan], [nan, nan]])
    assert A[0] == 90 and math.isnan(A[1])
    with pytest.raises(ValueError, match="square"):
        metrics.average_accuracy([[1, 2, 3], [4, 5, 6]])


def test_average_forgetting_hand_values():
    """Task 1: best 90 (after task 1), now 50: 40; task 2: best 80, now 70: 10; F = 25. The
    best may come after the task's own (a later task helped it: 90 - 50), a task may gain
    (80 - 85 = -5): F = 17.5; one task: undefined."""
    assert metrics.average_forgetting([[90, None, None], [60, 80, None], [50, 70, 75]]) == 25.0
    assert metrics.average_forgetting([[60, None, None], [90, 80, None], [50, 85, 75]]) == 17.5
    assert math.isnan(metrics.average_forgetting([[70.0]]))


def test_omega():
    # (90/100 + 60/80) / 2 = (0.9 + 0.75) / 2
    assert metrics.omega([90, 60], [100, 80]) == pytest.approx(0.825)
    with pytest.raises(ValueError, match="equal length"):
        metrics.omega([90, 60], [100, 80, 70])


def test_summarize_repeats():
    s = metrics.summarize_repeats([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(math.sqrt(1.25))  # population std, ddof=0
    assert s["n"] == 4
    assert metrics.summarize_repeats([7.0]) == {"mean": 7.0, "std": 0.0, "n": 1}
    with pytest.raises(ValueError):
        metrics.summarize_repeats([])


def test_accuracy_matrix_round_trip():
    m = metrics.AccuracyMatrix(3)
    m.record(0, 0, 95.0, 95.0)
    m.record(1, 0, 40.0, 85.0)
    m.record(1, 1, 80.0, 90.0)
    d = m.to_dict()
    assert d["R_global"][0] == [95.0, None, None]
    json.dumps(d, allow_nan=False)  # strict JSON
    back = metrics.AccuracyMatrix.from_dict(json.loads(json.dumps(d)))
    np.testing.assert_array_equal(back.global_acc, m.global_acc)  # NaN == NaN here
    np.testing.assert_array_equal(back.local_acc, m.local_acc)
    with pytest.raises(ValueError):
        m.record(0, 1, 1.0, 1.0)  # above the diagonal


def test_top5_is_recorded_and_older_records_without_it_still_load():
    m = metrics.AccuracyMatrix(2)
    m.record(0, 0, 50.0, 60.0, 99.0)
    m.record(1, 0, 40.0, 55.0, 90.0)
    m.record(1, 1, 30.0, 70.0, 80.0)
    d = json.loads(json.dumps(m.to_dict()))
    assert d["R_global_top5"] == [[99.0, None], [90.0, 80.0]]
    np.testing.assert_array_equal(metrics.AccuracyMatrix.from_dict(d).top5_acc, m.top5_acc)
    old = {k: v for k, v in d.items() if k != "R_global_top5"}
    assert np.isnan(metrics.AccuracyMatrix.from_dict(old).top5_acc).all()
    run = {**_run(0, d["R_global"], d["R_local"]), "R_global_top5": d["R_global_top5"]}
    res = metrics.build_results([run])
    assert res["repeats"][0]["A_global_top5"] == [99.0, 85.0]
    assert res["aggregate"]["final_top5_accuracy"]["mean"] == 85.0
    assert "final_top5_accuracy" not in metrics.build_results([_run(0, d["R_global"],
                                                                    d["R_local"])])["aggregate"]


def test_build_results_values():
    runs = [_run(0, [[90, None], [40, 80]], [[90, None], [85, 95]], spb=0.04),
            _run(1, [[80, None], [50, 70]], [[80, None], [75, 85]], spb=0.06, peak=None)]
    ub = metrics.build_results([_run(9, [[100, None], [80, 80]], [[100, None], [90, 90]])])
    assert ub["A_mean"] == [100.0, 80.0]
    res = metrics.build_results(runs, upper_bound=ub)

    assert res["num_tasks"] == 2 and res["num_repeats"] == 2
    r0 = res["repeats"][0]
    assert r0["A_global"] == [90.0, 60.0] and r0["final_accuracy"] == 60.0
    assert r0["final_local_accuracy"] == 90.0
    assert r0["omega"] == pytest.approx(0.825)
    assert res["repeats"][1]["omega"] == pytest.approx((80 / 100 + 60 / 80) / 2)
    agg = res["aggregate"]
    assert agg["final_accuracy"] == {"mean": 60.0, "std": 0.0, "n": 2}
    assert [r["forgetting"] for r in res["repeats"]] == [50.0, 30.0]
    # A_inc: the mean of A_i over every task, the first included
    assert [r["average_incremental_accuracy"] for r in res["repeats"]] == [75.0, 70.0]
    assert agg["average_incremental_accuracy"] == {"mean": 72.5, "std": 2.5, "n": 2}
    assert agg["forgetting"] == {"mean": 40.0, "std": 10.0, "n": 2}
    assert agg["A_global"]["mean"] == [85.0, 60.0]
    assert agg["A_global"]["std"] == [5.0, 0.0]
    assert agg["train_seconds_per_batch"]["mean"] == pytest.approx(0.05)
    assert agg["peak_memory_bytes"] == 3 * 2**20
    assert agg["omega"]["n"] == 2
    assert res["A_mean"] == [85.0, 60.0]
    assert "omega" not in metrics.build_results(runs)["aggregate"]
    # No timed step (every loop one call, which counts as compilation): n/a, not 0.
    untimed = metrics.build_results([{**run, "train_seconds_per_batch": None} for run in runs])
    assert untimed["aggregate"]["train_seconds_per_batch"] == {"mean": None, "std": None, "n": 2}
    assert "- seconds per training batch: n/a ± n/a" in reporting._summary_markdown(
        untimed, {"method": "abd"}, "t")
    with pytest.raises(ValueError):
        metrics.build_results(runs, upper_bound={"A_mean": [1.0, 2.0, 3.0]})


def test_write_results(tmp_path):
    runs = [_run(0, [[90, None], [40, 80]], [[90, None], [85, 95]]),
            _run(1, [[80, None], [50, 70]], [[80, None], [75, 85]])]
    res = metrics.build_results(runs, upper_bound={"A_mean": [100.0, 80.0]})
    cfg = {"method": "abd", "dataset": "cifar100", "num_tasks": 2}
    out = tmp_path / "run"
    reporting.write_results(out, res, cfg, title="ABD test")

    loaded = json.loads((out / "results.json").read_text())
    for key in ("repeats", "aggregate", "A_mean", "config", "title", "num_tasks"):
        assert key in loaded
    assert loaded["config"]["method"] == "abd"
    assert loaded["repeats"][0]["R_global"][0][1] is None
    assert metrics.build_results(runs, upper_bound=loaded)["aggregate"]["omega"]["n"] == 2

    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "# ABD test" in md and "cifar100" in md
    assert "A_N: 60.00 ± 0.00" in md
    assert "forgetting F_N: 40.00 ± 10.00" in md
    assert "A_inc (the mean of A_i over every task, the first included): 72.50 ± 2.50" in md
    assert "Omega" in md and "MiB" in md
    assert "seed 1" in md and "| 2 | 50.00 | 70.00 |" in md  # last repeat's R_global
    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_metric_writer_appends(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    w = reporting.MetricWriter(path)
    w.write(1, {"loss": np.float32(0.5), "acc": 3}, task=0, phase="train")
    w.close()
    with reporting.MetricWriter(path) as w:  # resumed run keeps earlier lines
        w.write(2, {"loss": float("nan")}, task=1)
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert lines[0] == {"step": 1, "task": 0, "phase": "train", "loss": 0.5, "acc": 3.0}
    assert lines[1] == {"step": 2, "task": 1, "loss": None}


def test_metric_writer_truncates_to_a_checkpointed_length(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with reporting.MetricWriter(path) as w:
        w.write(1, {"loss": 1.0})
        saved = w.tell()  # what a checkpoint records
        w.write(2, {"loss": 2.0})  # logged after the checkpoint, then the run was killed
    with reporting.MetricWriter(path) as w:  # the resumed run
        w.truncate(saved)
        assert w.tell() == saved
        w.write(2, {"loss": 2.0})
    assert [json.loads(s)["step"] for s in path.read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("num_repeats", [1, 3])
def test_accuracy_plot_has_a_fixed_axis_and_an_honest_legend(num_repeats):
    runs = [_run(r, [[99, None], [97 - r, 95]], [[99, None], [97, 95]])
            for r in range(num_repeats)]
    fig = reporting.accuracy_figure(metrics.build_results(runs), "t")
    ax = fig.axes[0]
    assert ax.get_ylim() == (0, 100)  # not auto-zoomed to 95-99
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == (["1 repeat"] if num_repeats == 1 else ["mean ± std over 3 repeats"])
    assert len(ax.collections) == (num_repeats > 1)  # the std band only with repeats


def read_events(run_dir):
    """Every event in a TensorBoard run folder, oldest file first (TFRecord framing: length
    u64, its crc u32, the Event proto, its crc u32)."""
    import struct

    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


def scalars(events):
    return [(e.step, v.tag, round(v.simple_value, 5)) for e in events for v in e.summary.value]


def test_metric_writer_writes_tensorboard_runs_and_purges_on_resume(tmp_path):
    tb = tmp_path / "tb"
    with reporting.MetricWriter(tmp_path / "m.jsonl", tb) as writer:
        writer.write(4, {"loss": 2.0, "ce": 1.5}, repeat=0, task=1)
        writer.write(8, {"loss": 1.0, "ce": float("nan")}, repeat=0, task=1)
        writer.write(10, {"loss": 7.0}, repeat=0, task=1, phase="generator")
        writer.write(1, {"A": 90.0}, repeat=0, eval=1)
        writer.write(4, {"loss": 3.0}, repeat=0, task=2)
    assert scalars(read_events(tb / "repeat_0" / "task_1" / "train")) == [
        (4, "loss", 2.0), (4, "ce", 1.5), (8, "loss", 1.0)]  # a NaN is left out
    assert scalars(read_events(tb / "repeat_0" / "task_1" / "generator")) == [(10, "loss", 7.0)]
    assert scalars(read_events(tb / "repeat_0" / "eval")) == [(1, "A", 90.0)]
    assert scalars(read_events(tb / "repeat_0" / "task_2" / "train")) == [(4, "loss", 3.0)]

    # A resumed process rewrites task 1 from step 8: its run starts with a purge at step 8,
    # so TensorBoard drops the old step-8 point.
    with reporting.MetricWriter(tmp_path / "m.jsonl", tb) as writer:
        writer.write(8, {"loss": 0.5}, repeat=0, task=1)
    events = read_events(tb / "repeat_0" / "task_1" / "train")
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
    assert starts[-1] == 8
    assert scalars(events)[-1] == (8, "loss", 0.5)
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[1])["ce"] is None
