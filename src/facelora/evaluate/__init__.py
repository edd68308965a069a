"""Evaluation of checkpoints: generation, metrics, reports and the choice of the best."""
