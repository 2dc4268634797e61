"""experiments/sweep.py: k-fold cross-validation on the first half of the tasks' training data,
never the test split."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from abd_jax import data as data_lib
from helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", REPO / "experiments" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cv_splits_are_stratified_disjoint_folds_of_the_chosen_classes():
    sweep = _sweep_module()
    spec = data_lib.get_spec("digits")
    labels = np.repeat(np.arange(10), 7).astype(np.int32)
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1) * np.ones(
        (1, *spec.image_shape), np.uint8)
    classes = np.array([7, 2, 5])
    folds = sweep.cv_splits(spec, images, labels, classes, 3, seed=0)
    held = [set(f.test_images[:, 0, 0, 0]) for f in folds]
    chosen = {i for i in range(len(labels)) if labels[i] in classes}
    assert set().union(*held) == chosen and sum(map(len, held)) == len(chosen)  # a partition
    for k, fold in enumerate(folds):
        assert fold.spec.num_classes == 3
        assert set(fold.train_images[:, 0, 0, 0]) == chosen - held[k]
        # relabelled in the given order: original 7 -> 0, 2 -> 1, 5 -> 2
        np.testing.assert_array_equal(classes[fold.test_labels],
                                      labels[fold.test_images[:, 0, 0, 0]])
        assert sorted(np.bincount(fold.test_labels, minlength=3)) in ([2, 2, 3], [2, 3, 3],
                                                                      [3, 3, 3], [2, 2, 2])


def test_parse_grid_products_and_names_unknown_fields():
    sweep = _sweep_module()
    config = tiny_config("/nowhere")
    points = sweep.parse_grid(["abd.mu=0.03,0.1", "method=abd,deepinversion"], config)
    assert points == [{"abd.mu": 0.03, "method": "abd"},
                      {"abd.mu": 0.03, "method": "deepinversion"},
                      {"abd.mu": 0.1, "method": "abd"}, {"abd.mu": 0.1, "method": "deepinversion"}]
    with pytest.raises(Exception, match="no 'nu'"):
        sweep.parse_grid(["abd.nu=1"], config)


@pytest.mark.slow
def test_sweep_scores_each_point_on_held_out_training_folds(digits_data_dir, tmp_path,
                                                             monkeypatch, session):
    sweep = _sweep_module()
    loaded = []
    real_load = data_lib.load_split
    monkeypatch.setattr(data_lib, "load_split",
                        lambda spec, split, *a, **k: loaded.append(split) or real_load(
                            spec, split, *a, **k))
    config = tiny_config(digits_data_dir, method="base", epochs=1)
    points = [{"lr": 0.05}, {"lr": 0.1}]
    report = sweep.sweep(config, tmp_path, points, folds=2, session=session)
    assert loaded == ["train"]  # the test split is never read
    assert report["tasks"] == 2 and len(report["classes"]) == 4
    for entry in report["points"]:
        assert len(entry["A_N"]) == 2 and entry["mean"] == pytest.approx(np.mean(entry["A_N"]))
        assert all(0 <= a <= 100 for a in entry["A_N"])
    assert report["best"] == max(report["points"], key=lambda p: p["mean"])["point"]
    stored = json.loads((tmp_path / "sweep.json").read_text())
    assert stored["points"] == report["points"]
    assert "**best**" in (tmp_path / "sweep.md").read_text()
    run_config = json.loads((tmp_path / "lr=0.05" / "fold_0" / "config.json").read_text())
    assert run_config["num_tasks"] == 2 and run_config["class_order"] == "identity"
    # Rerunning resumes: every (point, fold) is already complete, same numbers.
    again = sweep.sweep(config, tmp_path, points, folds=2, session=session)
    assert [p["A_N"] for p in again["points"]] == [p["A_N"] for p in report["points"]]
