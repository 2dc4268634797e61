"""A damaged newest checkpoint: the run says which one and why, moves it aside, resumes from
the one before, and finishes with the same numbers."""
import re
import shutil

import pytest

from abd_jax import checkpoint as ckpt_lib
from abd_jax import experiment
from helpers import tiny_config

# One worker runs this file: its module-wide fixtures are built once (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("checkpoint")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _data_file(step):
    return sorted(p for p in (step / "state").rglob("d/*") if p.is_file())[0]


DAMAGE = {
    "truncated data file": lambda step: _truncate(_data_file(step)),
    "truncated state/_METADATA": lambda step: _truncate(step / "state" / "_METADATA"),
    "deleted meta/metadata": lambda step: (step / "meta" / "metadata").unlink(),
    "deleted manifest.ocdbt": lambda step: (step / "state" / "manifest.ocdbt").unlink(),
    "emptied step folder": lambda step: [shutil.rmtree(p) if p.is_dir() else p.unlink()
                                         for p in list(step.iterdir())],
}


@pytest.fixture(scope="module")
def clean_run(digits_data_dir, tmp_path_factory, session):
    config = tiny_config(digits_data_dir, method="lwf", epochs=1)
    workdir = tmp_path_factory.mktemp("clean")
    return config, workdir, experiment.run(config, workdir, session=session)


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes(clean_run, tmp_path,
                                                                       damage, caplog, session):
    config, clean, reference = clean_run
    workdir = tmp_path / "run"
    shutil.copytree(clean, workdir)
    steps = workdir / "checkpoints" / "repeat_0"
    newest = max((p for p in steps.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    DAMAGE[damage](newest)
    results = experiment.run(config, workdir, session=session)
    assert [r["R_global"] for r in results["repeats"]] == [
        r["R_global"] for r in reference["repeats"]]
    moved = steps.with_name("repeat_0.damaged") / newest.name
    assert moved.exists(), "the damaged checkpoint must be kept, not deleted"
    warnings = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(warnings) == 1 and f"checkpoint {newest.name}" in warnings[0]
    # its position in words, as the resume message gives it (the last task's end here)
    position = ckpt_lib.describe_position(*ckpt_lib.id_to_position(int(newest.name)))
    assert position == "the end of task 5" and f"({position})" in warnings[0]


def test_positions_in_words():
    """A checkpoint's id decodes to the phase it was saved in (task numbers from 1)."""
    words = lambda ckpt_id: ckpt_lib.describe_position(*ckpt_lib.id_to_position(ckpt_id))
    assert words(2 * ckpt_lib.ID_STRIDE + 90) == "task 3, training step 90"
    assert words(ckpt_lib.ID_STRIDE + ckpt_lib.stage_step(0, 160)) == (
        "task 2, end-of-task stage 1, step 160")
    assert words(ckpt_lib.ID_STRIDE + ckpt_lib.stage_step(2, 0)) == (
        "task 2, end-of-task stage 3, step 0")
    assert words(ckpt_lib.EVALUATE) == "task 1, before its evaluation"
    assert words(3 * ckpt_lib.ID_STRIDE) == "the end of task 3"


def test_a_save_is_a_snapshot_finished_in_the_background(tmp_path):
    """`save` returns before the files are written; what it saves is the tree and meta as
    they were at the call (the loop keeps appending to its timing lists), and `latest` and
    `close` wait for the write."""
    import jax.numpy as jnp
    import numpy as np

    checkpointer = ckpt_lib.RunCheckpointer(tmp_path / "ckpt")
    tree = {"w": jnp.arange(4.0)}
    meta = {"accuracy": {"rows": [1.0]}, "timing": {"task_wall_seconds": [3.0]}}
    checkpointer.save(2, 7, tree, meta)
    meta["accuracy"]["rows"].append(2.0)
    meta["timing"]["task_wall_seconds"].append(4.0)
    assert checkpointer.latest() == (2, 7)
    checkpointer.close()

    reopened = ckpt_lib.RunCheckpointer(tmp_path / "ckpt")
    position, restored, saved_meta = reopened.restore_latest({"w": jnp.zeros(4)})
    reopened.close()
    assert position == (2, 7)
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    assert saved_meta == {"accuracy": {"rows": [1.0]}, "timing": {"task_wall_seconds": [3.0]}}


def test_a_state_is_saved_packed_and_restores_placed_like_its_template(tmp_path):
    """A 4-device data-parallel state is saved as one array per dtype (its replicated leaves)
    plus its other arrays; it, and a checkpoint of one orbax array per leaf (the format
    before), restore to the template's placement and values. A template of another layout is
    refused, naming the first difference."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


    mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    values = {"w": np.arange(12.0, dtype=np.float32).reshape(3, 4),
              "b": np.arange(3, dtype=np.uint32), "step": np.array(7, np.int32),
              "half": np.array([1.5, -2.0], jnp.bfloat16), "v": np.array([9.0], np.float32),
              "rows": np.arange(8.0, dtype=np.float32)}
    placement = {k: sharded if k == "rows" else replicated for k in values}
    tree = {"state": {k: jax.device_put(v, placement[k]) for k, v in values.items()}}
    saved, layout = ckpt_lib._pack(tree)
    assert sorted(saved["packed"]) == ["bfloat16", "float32", "int32", "uint32"]
    assert saved["packed"]["float32"].shape == (13,) and list(saved["arrays"]) == ["2"]  # rows
    assert [entry[0] for entry in layout] == [
        "['state']['" + k + "']" for k in sorted(values)]

    checkpointer = ckpt_lib.RunCheckpointer(tmp_path / "ckpt")
    checkpointer.save(0, 1, tree, {"accuracy": {}})
    checkpointer._manager.save(ckpt_lib.position_to_id(0, 2), args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave({"accuracy": {}})))
    template = {"state": {k: jax.device_put(np.zeros_like(v), placement[k])
                          for k, v in values.items()}}
    for step in (1, 2):
        restored, meta = checkpointer.restore_at(0, step, template)
        assert meta == {"accuracy": {}}
        for k, v in values.items():
            leaf = restored["state"][k]
            assert leaf.sharding == placement[k] and leaf.dtype == v.dtype, k
            np.testing.assert_array_equal(np.asarray(leaf), v)
    template["state"]["w"] = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=re.escape(
            "saved ['state']['w'] float32[3, 4] where this run has ['state']['w'] float32[4, 3]")):
        checkpointer.restore_at(0, 1, template)
    checkpointer.close()


def test_a_checkpoint_of_another_layout_stops_the_resume_without_moving_anything(tmp_path):
    """Checkpoints saved by another version of the code (other arrays in the state) are not
    damaged: the resume stops in one line naming the checkpoint and the fix, every checkpoint
    stays where it was, and no restart from task 1 overwrites the run."""
    import jax.numpy as jnp

    directory = tmp_path / "ckpt"
    checkpointer = ckpt_lib.RunCheckpointer(directory)
    for step in (1, 2):
        checkpointer.save(0, step, {"w": jnp.ones(3)}, {"accuracy": {}})
    checkpointer.close()
    before = sorted(p.name for p in directory.iterdir())

    reopened = ckpt_lib.RunCheckpointer(directory)
    with pytest.raises(ckpt_lib.LayoutMismatch) as err:
        reopened.restore_latest({"w": jnp.ones(3), "extra": jnp.zeros(2)})
    reopened.close()
    message = str(err.value)
    assert "\n" not in message
    newest = ckpt_lib.position_to_id(0, 2)
    assert message.startswith(f"checkpoint {newest} (task 1, training step 2) in {directory} "
                              "was saved by another version of abd-jax: ")
    assert "(1 vs 2 arrays)" in message and message.endswith("or pass a new --workdir")
    assert sorted(p.name for p in directory.iterdir()) == before
    assert not directory.with_name("ckpt.damaged").exists()
