"""DeepSpeed's `mpu` interface over megatron-core's groups held in a `ParallelDims`.

DeepSpeed asks an mpu object for the data-parallel group (its ZeRO partitioning and gradient
averaging group) and the model-parallel group (to count tensor-parallel shards once in the
gradient norm). Issue 5: megatron's parallel_state is passed to DeepSpeed as mpu; this adapter
answers from the groups `init_parallel` took from parallel_state (no pipeline or sequence
parallelism here, so model parallel = tensor parallel).
"""

from __future__ import annotations

import torch.distributed as dist

from .dims import ParallelDims


class MegatronMpu:
    """The subset of megatron's old `mpu` module that DeepSpeed 0.19 calls."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.tp_group

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self.dims.tp_group, 0)

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_data_parallel_rank(self) -> int:
        return self.dims.dp_rank

    def get_data_parallel_group_ranks(self) -> list:
        return dist.get_process_group_ranks(self.dims.dp_group)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0
