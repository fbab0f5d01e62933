"""Pretraining: Hydra entry `python -m train`, the loop, data, optimizers, parallel engines."""
