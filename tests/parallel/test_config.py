"""ParallelConfig validation: every bad layout fails before any process group, naming the field."""

import pytest

from model import ModelArgs
from train.parallel import ParallelConfig, validate_layout

TINY = ModelArgs.preset("tiny")          # 4 heads, 2 output groups, 8 experts, vocab 512


@pytest.mark.parametrize("cfg, world, field", [
    (ParallelConfig(tp=3), 3, "n_heads"),
    (ParallelConfig(tp=4), 4, "o_groups"),
    (ParallelConfig(ep=3), 3, "n_routed_experts"),
    (ParallelConfig(tp=2, dp=3), 4, "parallel.dp"),
    (ParallelConfig(tp=2), 3, "parallel.tp"),
    (ParallelConfig(ep=4), 2, "parallel.ep"),
    (ParallelConfig(zero_stage=3), 1, "parallel.zero_stage"),
    (ParallelConfig(backend="mpi"), 1, "parallel.backend"),
    (ParallelConfig(tp=0), 1, "parallel.tp"),
])
def test_rejects_bad_layouts(cfg, world, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate_layout(cfg, world, TINY)


def test_vocab_must_split_over_tp():
    args = ModelArgs.preset("tiny", vocab_size=510, n_heads=4)
    with pytest.raises(ValueError, match="vocab_size=510"):
        validate_layout(ParallelConfig(tp=4, dp=1), 4, args.replace(o_groups=4))


@pytest.mark.parametrize("cfg, world", [
    (ParallelConfig(), 1), (ParallelConfig(tp=2, ep=2), 4), (ParallelConfig(ep=2), 2),
    (ParallelConfig(tp=2, ep=4), 4), (ParallelConfig(tp=2, dp=2, ep=2), 4),
])
def test_accepts_valid_layouts(cfg, world):
    validate_layout(cfg, world, TINY)
    assert cfg.tp * cfg.dp_size(world) == world


@pytest.mark.parametrize("name, world", [("single", 1), ("dp2", 2), ("tp2", 2), ("ep2", 2), ("tp2_ep2", 4)])
def test_layout_files_fit_the_presets(name, world):
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[2] / "configs" / "parallel" / f"{name}.yaml"
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ParallelConfig), OmegaConf.load(path)))
    for preset in ("tiny", "h200_1b"):
        validate_layout(cfg, world, ModelArgs.preset(preset))
