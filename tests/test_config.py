"""Config loading and validation: one clear line for every kind of bad input."""
from __future__ import annotations

import pytest

from hpctrain.config import check_world_size, config_from_dict, load_config
from hpctrain.errors import UserError


def test_shipped_configs_load():
    assert load_config("configs/mnist1d.toml").model.name == "cnn1d"
    assert load_config("configs/digits.toml").model.args == {"width": 128, "depth": 2}


def test_overrides_are_typed_toml_values():
    cfg = load_config("configs/digits.toml", ["train.lr=0.5", "train.fusion=backward", "run.world_sizes=[2, 4]",
                                              "compression.rules={'*.bias' = 'none'}"])
    assert cfg.train.lr == 0.5 and cfg.train.fusion == "backward"
    assert cfg.run.world_sizes == [2, 4] and cfg.compression.rules == {"*.bias": "none"}


@pytest.mark.parametrize("table, message", [
    ({"train": {"epoch": 3}}, "unknown key 'train.epoch' (did you mean 'epochs'?); valid keys in [train]: epochs,"),
    ({"trian": {}}, "unknown key 'trian' (did you mean 'train'?)"),
    ({"train": {"optimizer": "lamb"}}, "train.optimizer = 'lamb' is not allowed; choose one of 'sgd', 'adam', 'adamw'"),
    ({"train": {"epochs": "ten"}}, "train.epochs must be int, got 'ten'"),
    ({"train": {"epochs": True}}, "train.epochs must be int"),
    ({"train": {"lr": -1.0}}, "train.lr = -1.0 must be positive"),
    ({"data": {"keep_fraction": 1.5}}, "data.keep_fraction = 1.5 must be in (0, 1]"),
    ({"compression": {"rules": {"*.bias": "zip"}}}, "compression.rules.'*.bias' = 'zip'"),
    ({"compression": {"rules": {"*": "auto"}}}, 'use compression.name = "auto"'),  # auto decides for all layers
    ({"compression": {"adacomp": {"bins": 3}}}, "unknown key 'compression.adacomp.bins'"),
    ({"compression": {"warmup_steps": -1}}, "compression.warmup_steps = -1 must be 0 or positive"),
    ({"compression": {"trial_plans": 0}}, "compression.trial_plans = 0 must be 1 or more"),
    ({"dist": {"bucket_mb": 0}}, "dist.bucket_mb = 0.0 must be positive"),
    ({"dist": {"bucket_mb": float("nan")}}, "dist.bucket_mb = nan must be positive"),
    ({"compression": {"threshold": {"min_entries": 0}}}, "config: [compression.threshold] Threshold(min_entries=0): must be a positive number of entries"),
    ({"batch": {"initial": 64, "max": 32}}, "batch.max = 32 is below batch.initial = 64"),
])
def test_bad_values_name_the_key(table, message):
    with pytest.raises(UserError) as err:
        config_from_dict(table)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_int_is_accepted_for_float():
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)


def test_world_size_checks():
    cfg = config_from_dict({"run": {"world_sizes": [2, 4]}, "batch": {"initial": 64}})
    check_world_size(cfg, 4)
    with pytest.raises(UserError, match="world size 3 is not allowed by run.world_sizes = \\[2, 4\\]"):
        check_world_size(cfg, 3)
    with pytest.raises(UserError, match="batch.initial = 66 is not divisible by world size 4"):
        check_world_size(config_from_dict({"batch": {"initial": 66}}), 4)
