"""Running our Muon as the optimizer of a DeepSpeed ZeRO stage 1/2 engine (spec §3.11 "Distributed notes").

DeepSpeed 0.19.8 has its own Muon path inside ZeRO 1/2: for parameters tagged `use_muon` (ndim ≥ 2 and
not embed/lm_head) it calls its `muon_update` (Keller Jordan's 5-step quintic or Gram NS, scale
sqrt(max(1, rows/cols))) while filling the gradient partitions, then computes the gradient norm and clips
the *orthogonalised* updates. Its NS, scaling and grouping are not V4's, replacing them would mean
monkey-patching `deepspeed.runtime.zero.muon.original_muon`, and its clip differs from a single process's.

What we reuse instead: the ZeRO partitioning of fp32 master weights, its gradient averaging and raw-gradient
clipping (`gradient_clipping`, applied before the optimizer step as `clip_grad_norm_` would), its
`_hp_mapping` fragment links between model parameters and flat partitions (the same ones DeepSpeed's
`get_full_hp_param` uses), its bit16 all-gather after the step and its checkpointing of optimizer state.
Our Muon is handed in as a client optimizer; parameters must not carry DeepSpeed's `use_muon` tag, so its
own path stays off. ZeRO-3 is not supported (its partitions are per-parameter and its Muon path needs
"reduce_scatter": false); stage 1 is the tested layout.
"""

from torch import nn

from train.optim.config import OptimConfig


def zero_config_for_muon(cfg: OptimConfig, *, stage: int = 1) -> dict:
    """The DeepSpeed config entries our Muon needs under ZeRO `stage` (1 or 2); merge into the engine config."""
    if stage not in (1, 2):
        raise ValueError(f"ZeRO stage {stage} is not supported with Muon: use stage 1 (or 2)")
    return {
        "zero_optimization": {"stage": stage},
        "gradient_clipping": cfg.grad_clip,
        # DeepSpeed lists only its own optimizers as tested under ZeRO.
        "zero_allow_untested_optimizer": True,
    }


def check_no_deepspeed_muon_tags(model: nn.Module) -> None:
    """Raise if a parameter carries DeepSpeed's `use_muon` tag, which would run DeepSpeed's NS on our gradients."""
    tagged = [name for name, p in model.named_parameters() if getattr(p, "use_muon", False)]
    if tagged:
        raise ValueError(
            f"{len(tagged)} parameters carry DeepSpeed's use_muon tag (e.g. {tagged[0]}): pass our Muon as the "
            "client optimizer and leave the DeepSpeed config's optimizer section out"
        )
