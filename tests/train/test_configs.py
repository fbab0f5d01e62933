"""Hydra configs: every group file matches its dataclass, every experiment composes (style rule 5)."""

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from model import PRESETS, ModelArgs
from train.config import Config, register_configs, validate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
register_configs()


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_yaml_equals_preset(name):
    cfg = OmegaConf.to_object(_compose(f"model={name}"))
    assert cfg.model == ModelArgs.preset(name)


def test_default_composes_and_validates():
    cfg = OmegaConf.to_object(_compose())
    assert isinstance(cfg, Config) and cfg.model == ModelArgs.preset("tiny")
    validate(cfg)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_experiment_composes_with_tiny_cpu_overrides(experiment):
    cfg = OmegaConf.to_object(_compose(f"experiment={experiment}", "model=tiny", "train.device=cpu",
                                       "train.max_steps=2"))
    validate(cfg)


@pytest.mark.parametrize("group", ["data", "optim", "parallel", "train", "logging"])
def test_every_group_option_composes(group):
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        dict_cfg = _compose(f"{group}={path.stem}")
        assert dict_cfg[group] is not None


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="no_such_field"):
        _compose("train.no_such_field=3")


@pytest.mark.parametrize("override,fields", [
    (["train.global_batch=6", "train.micro_batch=4"], ["train.global_batch", "train.micro_batch"]),
    (["train.seq_len=1024"], ["train.seq_len", "model.max_seq_len"]),
    (["train.stage=indexer_warmup"], ["train.stage", "model.indexer_mode"]),
])
def test_cross_concern_errors_name_fields(override, fields):
    cfg = OmegaConf.to_object(_compose(*override))
    with pytest.raises(ValueError) as err:
        validate(cfg)
    for f in fields:
        assert f in str(err.value)
