"""Helpers of the distillation tests: composing the distill config, tiny checkpoints and teachers."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distill.config import DistillJobConfig, register_configs
from distill.teachers import TeacherSpec
from model import ModelArgs, V4Model
from train.checkpoint import save_checkpoint
from train.config import Config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMALL_DATA = ["data.embedded_math_problems=400", "data.embedded_code_max_files=8",
              "data.embedded_code_max_chars=120000", "data.embedded_prose_max_chars=120000"]
register_configs()


def compose_job(*overrides: str) -> DistillJobConfig:
    """configs/distill.yaml with the given overrides, as the schema object."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return OmegaConf.to_object(compose(config_name="distill", overrides=list(overrides)))


def save_model(root: Path, model: V4Model, job_like) -> Path:
    """A checkpoint of `model` whose manifest records `job_like` (a Config or DistillJobConfig) as its config."""
    return save_checkpoint(root, 0, {"model": model.state_dict()},
                           meta={"config": OmegaConf.to_container(OmegaConf.structured(job_like))})


def make_teachers(root: Path, count: int, tokenizer_dir: Path, domains=("code", "math", "prose"),
                  head_scale: float = 30.0, first_seed: int = 100, **model_overrides) -> list:
    """`count` tiny teachers with distinct seeds and sharpened heads (random-init heads give
    near-uniform distributions, which would make every comparison trivially pass)."""
    args = ModelArgs.preset("tiny", **model_overrides)
    specs = []
    for index in range(count):
        torch.manual_seed(first_seed + index)
        model = V4Model(args)
        with torch.no_grad():
            model.head.weight.mul_(head_scale)
        path = save_model(root / f"t{index:02d}" / "checkpoints", model, Config(model=args))
        specs.append(TeacherSpec(name=f"t{index:02d}", domain=domains[index % len(domains)], checkpoint=str(path),
                                 tokenizer=str(tokenizer_dir)))
    return specs
