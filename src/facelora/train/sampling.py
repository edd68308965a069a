"""Flow-matching noise levels: how sigma is drawn for each training sample.

Both model families are rectified-flow transformers: x_t = (1 - sigma) x_0 + sigma noise, the
model sees sigma (the pipelines pass timestep / 1000, i.e. sigma) and predicts the velocity
noise - x_0. Sampling strategies:
- uniform: sigma ~ U(0, 1);
- sigmoid (logit-normal, good for faces): sigma = sigmoid(scale x N(0, 1));
- shift: sigma ~ U(0, 1) pushed towards noise by shift s: s sigma / (1 + (s - 1) sigma), with
  s = exp(mu) from the model's own resolution-dependent rule when not given.
"""

from __future__ import annotations

import torch


def sample_sigmas(
    n: int,
    method: str,
    generator: torch.Generator,
    sigmoid_scale: float = 1.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """n noise levels in (0, 1), float32, on the CPU (move them where needed)."""
    if method == "uniform":
        sigma = torch.rand(n, generator=generator)
    elif method == "sigmoid":
        sigma = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator))
    elif method == "shift":
        u = torch.rand(n, generator=generator)
        sigma = shift * u / (1 + (shift - 1) * u)
    else:
        raise ValueError(f"unknown timestep sampling {method!r} (uniform, sigmoid, shift)")
    return sigma.clamp(1e-4, 1.0 - 1e-4)


def noisy_latents(
    x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for clean latents x0 (batch first) at noise levels sigma."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0
