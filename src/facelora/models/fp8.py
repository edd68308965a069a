"""The frozen transformer's block weights stored in float8 (model.quantize: fp8).

Each nn.Linear inside the transformer blocks keeps its weight as float8_e4m3fn with one
float32 scale per output row (the row's largest magnitude maps to e4m3's largest value, 448,
so small weights do not fall into e4m3's coarse subnormal range as a plain cast would), and
computes in the input's dtype: the weight is dequantized for the matmul and dropped after it.
Storage halves against bf16 (a quarter of fp32); the matmuls are not faster. Unlike
bitsandbytes' nf4/int8 this runs on any device, the CPU included.

The backward pass saves the float8 weight, not the dequantized copy, so activations kept for
the LoRA gradients do not hold a full-precision copy of every frozen weight.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale per row) with weight ~= float8.float() * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale).to(FP8_DTYPE), scale


def dequantize_rows(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * scale).to(dtype)


class _Float8Matmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly in both passes (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        return F.linear(x, dequantize_rows(weight, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        grad_x = grad_out @ dequantize_rows(weight, scale, grad_out.dtype)
        return grad_x, None, None, None


class Float8Linear(nn.Linear):
    """A frozen nn.Linear with its weight in float8 (a subclass, so peft wraps it as usual)."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        super().__init__(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta"
        )
        weight, scale = quantize_rows(linear.weight)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        # peft creates the LoRA matrices in this dtype instead of the float8 weight's
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _Float8Matmul.apply(x, self.weight, self.weight_scale, bias)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale, self.compute_dtype)


def store_blocks_in_fp8(
    transformer: nn.Module, device: torch.device, compute_dtype: torch.dtype
) -> int:
    """Replace every nn.Linear of the transformer blocks by a Float8Linear on `device`.

    Layer by layer, so a model that fits the device only in float8 never sits there in full
    precision. Returns how many layers were converted.
    """
    targets = [
        name
        for name, module in transformer.named_modules()
        if type(module) is nn.Linear and name.startswith(BLOCK_PREFIXES)
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        linear = getattr(parent, child).to(device)
        setattr(parent, child, Float8Linear(linear, compute_dtype))
    return len(targets)
