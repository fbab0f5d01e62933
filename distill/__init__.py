"""On-policy distillation from domain experts into one student (spec opd-and-fused-loss §3, §4, §8).

`python -m distill` runs the expert stage (one fine-tune per domain label) and the OPD stage
(student rollouts, teachers shipping hidden states, full-vocabulary reverse KL through
kernels.distill_kl). Modules: config (schemas), experts, rollout (prompts, sampling, alignment),
teachers (the pool), loss (the distill_kl wrapper), opd (the loop), pipeline (the job), summary.
"""

from distill.config import (DistillConfig, DistillJobConfig, ExpertsConfig, LossConfig, OPDConfig, RolloutConfig,
                            TeacherPoolConfig, validate)
from distill.loss import OPDLossOutput, opd_loss, resolve_impl
from distill.rollout import PromptSets, RolloutBatch, rollout
from distill.teachers import TeacherGroup, TeacherPool, TeacherSpec, read_manifest, write_manifest

__all__ = ["DistillConfig", "DistillJobConfig", "ExpertsConfig", "LossConfig", "OPDConfig", "RolloutConfig",
           "TeacherPoolConfig", "validate", "OPDLossOutput", "opd_loss", "resolve_impl", "PromptSets", "RolloutBatch",
           "rollout", "TeacherGroup", "TeacherPool", "TeacherSpec", "read_manifest", "write_manifest"]
