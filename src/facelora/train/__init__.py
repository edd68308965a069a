"""LoRA training: data and caches, the flow-matching loop, checkpoints and resume."""
