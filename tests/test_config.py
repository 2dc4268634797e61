"""Settings: checked before anything is written; renamed settings named; a workdir's run
fingerprinted (old runs resume where their numbers can't change; --allow_changed)."""
import json

import pytest

from abd_jax import config as config_lib
from configs import digits


def test_a_run_made_before_a_setting_existed_resumes_with_its_default(tmp_path):
    """config.json of an older run lacks `image_size`; it stands for the default (0)."""
    config_lib.check_or_write_fingerprint(tmp_path, {"method": "abd", "lr": 0.1})
    config_lib.check_or_write_fingerprint(tmp_path, {"method": "abd", "lr": 0.1,
                                                     "image_size": 0}, write=False)
    with pytest.raises(ValueError, match="image_size: 0 -> 32"):
        config_lib.check_or_write_fingerprint(tmp_path, {"method": "abd", "lr": 0.1,
                                                         "image_size": 32}, write=False)


def test_fingerprint_resolves_the_generator_dtype(tmp_path):
    """Runs made before `synthesis.generator_dtype` existed had a float32 generator: a float32
    run resumes with the new default "" (= dtype), a bfloat16 run does not (its G now
    computes in bfloat16) unless generator_dtype=float32 is passed."""
    def config(dtype, **synthesis):
        return {"method": "abd", "dtype": dtype, "synthesis": {"lr": 1e-3, **synthesis}}

    old_f32, old_bf16 = tmp_path / "f32", tmp_path / "bf16"
    config_lib.check_or_write_fingerprint(old_f32, config("float32"))
    config_lib.check_or_write_fingerprint(old_f32, config("float32", generator_dtype=""), False)
    config_lib.check_or_write_fingerprint(old_bf16, config("bfloat16"))
    with pytest.raises(ValueError, match="synthesis.generator_dtype: 'float32' -> 'bfloat16'"):
        config_lib.check_or_write_fingerprint(old_bf16, config("bfloat16", generator_dtype=""),
                                              False)
    config_lib.check_or_write_fingerprint(old_bf16, config("bfloat16", generator_dtype="float32"),
                                          False)


def _as_stored(config):
    return json.loads(config.to_json())


def test_an_old_workdir_with_flat_settings_resumes(tmp_path):
    """A config.json written before the per-method subtrees (`lwf_mu`, `memory`,
    `synthesis_log_every` ... at the top) fingerprints as today's config of the same run;
    subtrees of other methods (changed since) don't count."""
    new = digits.get_config()
    new.method = "lwf"
    old = _as_stored(new)
    old["lwf_mu"] = old.pop("lwf")["mu"]
    old["memory"] = old.pop("coreset")["memory"]
    old["synthesis_log_every"] = old["synthesis"].pop("log_every")
    old["bic"] = {"val_fraction": 0.1, "steps": 1000, "lr": 0.01}  # BiC's settings of then
    (tmp_path / "config.json").write_text(json.dumps(old))
    config_lib.check_or_write_fingerprint(tmp_path, _as_stored(new), write=False)
    new.lwf.mu = 0.5
    with pytest.raises(ValueError, match=r"lwf.mu: 1.0 -> 0.5"):
        config_lib.check_or_write_fingerprint(tmp_path, _as_stored(new), write=False)


def test_allow_changed_resumes_with_a_changed_rate_and_records_it(tmp_path):
    config = digits.get_config()
    config_lib.check_or_write_fingerprint(tmp_path, _as_stored(config))
    config.lr = 0.01
    with pytest.raises(ValueError, match="lr: 0.05 -> 0.01.*--allow_changed"):
        config_lib.check_or_write_fingerprint(tmp_path, _as_stored(config))
    config_lib.check_or_write_fingerprint(tmp_path, _as_stored(config), allowed=("lr",))
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.01
    change, = [json.loads(line) for line in
               (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert change["changes"] == {"lr": [0.05, 0.01]}
    with pytest.raises(ValueError, match="may change only"):
        config_lib.check_or_write_fingerprint(tmp_path, _as_stored(config),
                                              allowed=("num_tasks",))


@pytest.mark.parametrize("old,new", [("lwf_mu", "lwf.mu"), ("memory", "coreset.memory"),
                                     ("deepinversion_mu", "deepinversion.mu"),
                                     ("synthesis_checkpoint_every",
                                      "synthesis.checkpoint_every")])
def test_a_renamed_setting_names_its_new_place(old, new):
    message = config_lib.unknown_setting_message(f"'{old}'", [f"--config.{old}=3"])
    assert message == (f"error: --config.{old} was renamed: use --config.{new} (settings of "
                       "one method live in its own subtree)")


def test_show_config_lists_every_setting_and_the_methods():
    text = config_lib.describe(digits.get_config())
    from abd_jax import methods
    assert text.splitlines()[0].endswith(", ".join(methods.METHODS))
    assert "abd, rdfcil, dgr" in text.splitlines()[0]
    assert "coreset.memory = 60" in text and "synthesis.iterations = 300" in text
