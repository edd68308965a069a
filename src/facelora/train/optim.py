"""Optimizers and learning-rate schedules, all built from params.yaml."""

from __future__ import annotations

import logging
import math

import torch

from facelora.config import TrainParams
from facelora.errors import EnvironmentProblem

log = logging.getLogger(__name__)
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-5, "adamw8bit": 1e-5, "prodigy": 0.05}


def make_optimizer(params: list[torch.nn.Parameter], lr: float, train: TrainParams):
    decay = (
        train.weight_decay
        if train.weight_decay is not None
        else DEFAULT_WEIGHT_DECAY[train.optimizer]
    )
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    if train.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise EnvironmentProblem(
                "train.optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=decay)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        message = "train.optimizer prodigy needs prodigyopt: pip install prodigyopt"
        raise EnvironmentProblem(message) from None
    # Prodigy estimates the step size itself: lr is a multiplier (1.0 is the intended value)
    if lr < 0.1:
        log.warning("train.optimizer prodigy with lr %g: Prodigy expects lr near 1.0", lr)
    return Prodigy(params, lr=lr, weight_decay=decay, decouple=True, use_bias_correction=False)


def lr_lambda(train: TrainParams, total_steps: int, lr: float):
    """A multiplier of the base lr per optimizer step (for torch's LambdaLR)."""
    warmup = int(train.warmup_fraction * total_steps) if train.schedule != "constant" else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if train.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if train.schedule == "polynomial":  # linear from lr to lr_end
            return 1.0 + progress * (train.lr_end / lr - 1.0)
        return 1.0

    return factor


def make_scheduler(optimizer, train: TrainParams, total_steps: int, lr: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train, total_steps, lr))
