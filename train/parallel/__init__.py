"""Parallel training of V4 models: megatron-core groups and layers, DeepSpeed ZeRO (issue 5).

Entry points, in the order the training loop uses them:
- `ParallelConfig`, `validate_layout` (config.py): the layout and its checks;
- `init_parallel(cfg, model_args) -> ParallelDims` (dims.py): torch.distributed + megatron groups;
- `parallelize(model, dims, ...) -> ParallelEngine` (apply.py): TP -> EP -> AC -> compile ->
  DeepSpeed; `ParallelEngine` (engine.py) runs forward/backward/step;
- `global_token_counts`, `token_weights`, `reduce_expert_load` (engine.py):
  data-parallel loss bookkeeping;
- `gather_full_parameters` (state.py): unsharded parameters for checkpoints and parity checks.

Modules that import megatron-core or DeepSpeed load on first use (their imports are slow).
"""

from .config import ParallelConfig, validate_layout
from .dims import ParallelDims, destroy_parallel, init_parallel

_LAZY = {
    "parallelize": "apply", "shard_model": "apply",
    "ParallelEngine": "engine", "token_weights": "engine", "global_token_counts": "engine",
    "reduce_expert_load": "engine", "split_params": "engine",
    "gather_full_parameters": "state",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ParallelConfig", "validate_layout", "ParallelDims", "init_parallel", "destroy_parallel",
           *_LAZY]
