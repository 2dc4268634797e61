"""The paper's diagnostics: MID and MMD^2 against hand values, and `abd_jax.analyze` end to end
on a tiny ABD run that kept its task checkpoints."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from abd_jax import analysis, experiment
from abd_jax import checkpoint as ckpt_lib
from helpers import tiny_config

# One worker runs this file: its module-wide fixtures are built once (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("analysis")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mid_hand_value():
    # reference: mean (1, 1), per-feature std (1, 1); sample mean (3, 1):
    # ||((1, 1) - (3, 1)) / (1, 1)|| = 2.
    reference = np.array([[0.0, 0.0], [2.0, 2.0]])
    sample = np.array([[3.0, 1.0], [3.0, 1.0]])
    assert analysis.mean_image_distance(reference, sample) == pytest.approx(2.0)
    # Divided by the *reference's* std: scaling the sample's spread changes nothing.
    assert analysis.mean_image_distance(reference, np.array([[1.0, -9.0], [5.0, 11.0]])) == \
        pytest.approx(2.0)
    assert analysis.mean_image_distance(reference, reference) == 0.0


def test_mid_divides_by_the_reference_std_not_its_variance():
    # reference: features 0/4 and 10/10 +- 0 ... per feature mean (2, 10), population std
    # (2, 0.5); sample mean (5, 9): ||((2 - 5) / 2, (10 - 9) / 0.5)|| = ||(-1.5, 2)|| = 2.5.
    # Divided by the variances (4, 0.25) it would be ||(-0.75, 4)|| = 4.07.
    reference = np.array([[0.0, 9.5], [4.0, 10.5]])
    sample = np.array([[5.0, 8.0], [5.0, 10.0]])
    assert analysis.mean_image_distance(reference, sample) == pytest.approx(2.5)


def test_median_bandwidth_hand_value():
    # pooled points 0, 1, 3: distances 1, 3, 2 -> median 2.
    assert analysis.median_bandwidth(np.array([[0.0], [1.0]]), np.array([[3.0]])) == 2.0


def test_unbiased_gaussian_mmd2_hand_value():
    x, y = np.array([[0.0], [1.0]]), np.array([[0.0], [3.0]])
    k = lambda d: math.exp(-d * d / 2.0)  # bandwidth 1
    expected = k(1) + k(3) - 2.0 * (k(0) + k(3) + k(1) + k(2)) / 4.0  # off-diagonal means
    assert analysis.gaussian_mmd2(x, y, bandwidth=1.0) == pytest.approx(expected, rel=1e-12)


def test_mmd2_separates_distributions_and_is_unbiased():
    rng = np.random.RandomState(0)
    same = [analysis.gaussian_mmd2(rng.randn(200, 4), rng.randn(200, 4)) for _ in range(5)]
    shifted = analysis.gaussian_mmd2(rng.randn(200, 4), rng.randn(200, 4) + 1.0)
    assert abs(np.mean(same)) < 0.005 and min(same) < 0  # unbiased: straddles zero
    assert shifted > 0.1


@pytest.fixture(scope="module")
def abd_run(digits_data_dir, tmp_path_factory, session):
    workdir = tmp_path_factory.mktemp("abd")
    experiment.run(tiny_config(digits_data_dir, method="abd", epochs=1, num_tasks=2,
                               keep_task_checkpoints=True), workdir, session=session)
    return workdir


@pytest.mark.slow
def test_task_checkpoints_are_kept(abd_run):
    checkpointer = ckpt_lib.RunCheckpointer(abd_run / "checkpoints" / "repeat_0")
    positions = checkpointer.positions()
    checkpointer.close()
    assert {(1, 0), (2, 0)} <= set(positions)


@pytest.mark.slow
def test_analyze_writes_numbers_and_plots(abd_run, tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "abd_jax.analyze", f"--workdir={abd_run}",
                    f"--workdir={abd_run}", f"--out={out}", "--tsne_points=40"],
                   cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "analysis.json").read_text())
    assert list(report) == [f"abd ({abd_run.name}) #1", f"abd ({abd_run.name}) #2"]
    first = report[f"abd ({abd_run.name}) #1"]
    assert first["task"] == 2 and first["method"] == "abd"
    counts = first["counts"]
    assert counts["synthetic_first"] == counts["real_first"] > 0 and counts["real_current"] > 0
    for pair in ("real1_vs_realT", "real1_vs_synthetic1"):
        assert first["pairs"][pair]["mid"] > 0
        assert np.isfinite(first["pairs"][pair]["mmd2"])
    for name in ("feature_gap.png", "cost.png", f"tsne_abd_{abd_run.name}_1.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_a_cell_run_in_processes_is_read_through_its_repeat_folder(abd_run, tmp_path):
    """A `run_table.py --parallel` cell keeps repeat r in `<cell>/repeat_<r>/`: given the cell,
    the diagnostics read that run; a repeat it lacks is one message naming both places."""
    cell = tmp_path / "cell"
    shutil.copytree(abd_run, cell / "repeat_0")
    direct = analysis.feature_sets(abd_run, task=2, max_per_set=50)
    via_cell = analysis.feature_sets(cell, task=2, max_per_set=50)
    for group in ("real_first", "real_current", "synthetic_first"):
        np.testing.assert_array_equal(getattr(via_cell, group), getattr(direct, group))
    with pytest.raises(FileNotFoundError, match="repeat_1/config.json"):
        analysis.feature_sets(cell, task=2, repeat=1)


@pytest.mark.slow
def test_missing_task_checkpoint_says_how_to_keep_them(abd_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(abd_run, copy)
    shutil.rmtree(copy / "checkpoints" / "repeat_0" / str(ckpt_lib.position_to_id(1, 0)))
    with pytest.raises(FileNotFoundError, match="keep_task_checkpoints=True"):
        analysis.feature_sets(copy, task=2)


@pytest.mark.slow
def test_a_method_without_a_generator_is_refused(abd_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(abd_run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["method"] = "lwf"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="replays no generator"):
        analysis.feature_sets(copy, task=2)
