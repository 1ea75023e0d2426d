from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError
from common.config_files import load_config


def test_demo_config_loads_with_overrides():
    cfg = load_config(
        "configs/demo-cpu.yaml", ["iterations=7", "algorithm.beta=0.2", "selection.mode=random", "selection.rho=0.5"]
    )
    assert cfg.iterations == 7 and cfg.algorithm.beta == 0.2 and cfg.selection.rho == 0.5


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_validates(path):
    load_config(path)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["algoritm.name=dpo"], "unknown config key 'algoritm'. did you mean 'algorithm'?"),
        (["algorithm.bta=0.1"], "did you mean 'algorithm.beta'?"),
        (["selection.rho=1.5", "selection.mode=lowest_reward"], "selection.rho"),
        (["selection.rho=0", "selection.mode=lowest_reward"], "selection.rho"),
        (["algorithm.beta=0"], "algorithm.beta"),
        (["algorithm.beta=-1"], "algorithm.beta"),
        (["algorithm.name=ppo"], "algorithm.name"),
        (["train.zero_stage=1"], "train.zero_stage"),
        (["iterations=many"], "iterations"),
        (["rollout.n_samples=1"], "needs at least 2 samples"),
        (["selection.rho=0.5"], "has no effect with selection.mode=all"),
        (["reward.kind=model"], "reward.model_path"),
        (["reward.kind=remote"], "reward.url"),
        (["rollout.max_model_len=32", "data.max_prompt_length=64"], "rollout.max_model_len"),
        (["rollout.max_model_len=16", "rollout.max_new_tokens=14"], "max_model_len=16 leaves no room for a prompt"),
        (["noequals"], "key=value"),
    ],
)
def test_bad_config_gives_one_clear_message(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo-cpu.yaml", overrides)
    assert message in str(e.value)


def test_resume_accepts_auto_and_bools():
    assert load_config("configs/demo-cpu.yaml", ["resume=auto"]).resume == "auto"
    assert load_config("configs/demo-cpu.yaml", ["resume=true"]).resume is True
    with pytest.raises(ConfigError, match="resume"):
        load_config("configs/demo-cpu.yaml", ["resume=sometimes"])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("iterations: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(latin)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_fresh_prompts_and_optune_selection_exclude_each_other():
    with pytest.raises(ConfigError, match="use one or the other"):
        load_config(
            "configs/demo-cpu.yaml",
            ["data.prompts_per_iteration=32", "selection.mode=lowest_reward", "selection.rho=0.5"],
        )


def test_wdpo_knobs_carry_the_method_prefix():
    cfg = load_config(None, ["algorithm.name=wdpo", "algorithm.wdpo_beta2=2.0", "algorithm.wdpo_weight_fn=sigmoid"])
    assert (cfg.algorithm.wdpo_beta2, cfg.algorithm.wdpo_weight_fn, cfg.algorithm.wdpo_normalize_weights) == (
        2.0,
        "sigmoid",
        True,
    )
    for old in ("beta2", "weight_fn", "normalize_weights"):
        with pytest.raises(ConfigError, match=f"'algorithm.{old}' was renamed 'algorithm.wdpo_{old}'"):
            load_config(None, ["algorithm.name=wdpo", f"algorithm.{old}=1"])


def _old_run_config(tmp_path, *overrides: str) -> dict:
    """A run directory's config.yaml as this release's predecessor wrote it: no train.reference_logps, and
    wDPO's knobs under their old names."""
    saved = load_config("configs/cpu-wdpo.yaml", [f"output_dir={tmp_path}", *overrides]).model_dump(mode="json")
    del saved["train"]["reference_logps"]
    for old in ("beta2", "weight_fn", "normalize_weights"):
        saved["algorithm"][old] = saved["algorithm"].pop(f"wdpo_{old}")
    return saved


def test_a_run_made_before_the_new_settings_still_resumes(tmp_path):
    from pipeline.checkpoint import compare_configs

    for extra in ([], ["train.bf16=true"], ["model.dtype=bfloat16"], ["algorithm.wdpo_beta2=2.0"]):
        saved = _old_run_config(tmp_path, *extra)
        refused, _ = compare_configs(saved, load_config("configs/cpu-wdpo.yaml", [f"output_dir={tmp_path}", *extra]))
        assert refused == {}, extra


def test_reference_logps_auto_stays_auto_in_the_saved_config():
    cfg = load_config(None, [])
    assert cfg.train.reference_logps == "auto" and cfg.model_dump()["train"]["reference_logps"] == "auto"
    assert cfg.resolved_reference_logps() == "rollout"  # fp32 engine and trainer on CPU
    for bf16 in (["train.bf16=true"], ["model.dtype=bfloat16"], ["rollout.num_gpus=1"]):
        assert load_config(None, bf16).resolved_reference_logps() == "forward", bf16
    assert load_config(None, ["train.reference_logps=forward"]).resolved_reference_logps() == "forward"


def test_an_override_that_is_not_yaml_is_one_clear_error():
    """A value YAML cannot read (an unbalanced quote from a shell) named with its key, not a scanner traceback."""
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="override 'train.resources=.*': the value is not valid YAML"):
        load_config(None, ["train.resources={onalign_trainer: 1}'"])


# ---------------------------------------------------------------- the last silent answers
@pytest.mark.parametrize("override", ["iterations=true", "train.lr=false", "rollout.num_gpus=true", "seed=false"])
def test_a_boolean_for_a_number_is_refused(override):
    """pydantic's lax mode took `iterations=true` as 1."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}': expects a number, got the boolean"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "text,message",
    [
        ("iterations: 1\nseed: 3\niterations: 6\n", "'iterations' is given twice .*lines 1 and 3"),
        ("train:\n  lr: 1.0e-4\n  epochs: 1\n  lr: 2.0e-4\n", "'train.lr' is given twice .*lines 2 and 4"),
    ],
)
def test_a_key_given_twice_in_yaml_is_refused_with_both_lines(tmp_path, text, message):
    """YAML keeps the last of two equal keys without a word."""
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_an_empty_output_dir_is_refused():
    with pytest.raises(ConfigError, match="output_dir is empty"):
        load_config(None, ["output_dir="])


def test_spin_with_pair_mean_selection_is_refused():
    """SPIN's chosen response is the ground truth, which is never scored: its pair mean is meaningless."""
    with pytest.raises(ConfigError, match="selection.score=pair_mean .*spin"):
        load_config(
            None,
            ["algorithm.name=spin", "rollout.n_samples=1", "selection.mode=lowest_reward", "selection.rho=0.5"]
            + ["selection.score=pair_mean"],
        )
