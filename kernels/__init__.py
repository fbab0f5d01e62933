"""Fused kernels of v4forge; each is a triple kernel.py / ref.py / __init__.py (style rule 10).

* `kernels.distill_kl`: distillation loss recomputing student and teacher logits from hidden
  states (TileLang, spec opd-and-fused-loss §6).
"""
