"""The released transformers' configs, and real-width stand-ins with fewer blocks.

Used by `facelora plan` tests (parameter counts and LoRA sizes of the real models, on the meta
device) and by the training benchmark, which trains a random model of the real block width at
real resolutions to measure seconds per step and GPU memory without the real weights.
"""

from __future__ import annotations

from typing import Any

from facelora.errors import SettingsError

# Qwen-Image(-Edit-2511) transformer: every QwenImageTransformer2DModel.__init__ argument of
# diffusers 0.42.1 with its default, which are the released model's values (60 layers,
# 24 heads x 128 = 3072, joint_attention_dim 3584 = Qwen2.5-VL-7B hidden, in 64, out 16,
# patch 2, rope axes 16/56/56); zero_cond_t is true in Qwen-Image-Edit-2511's config.
QWEN_IMAGE_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
    "zero_cond_t": True,
    "use_additional_t_cond": False,
    "use_layer3d_rope": False,
}

# FLUX.2 [klein] 9B (and klein-base-9B, same architecture) transformer. Not read from the hub
# (no network): hidden 4096 = 32 heads x 128, 8 double + 24 single blocks, context 12288,
# in_channels 128, rope 4 x 32, theta 2000, mlp_ratio 3, no guidance embedding come from BFL's
# reference `Klein9BParams` (hidden_size, num_heads, depth, depth_single_blocks, context_in_dim,
# use_guidance_embed=False) as reproduced in several public trainers, and agree with a diffusers
# config for FLUX.2-klein embedded in a public repo. 12288 = 3 stacked Qwen3-8B hidden states
# (4096; Flux2KleinPipeline stacks layers 9, 18, 27). The rest are Flux2Transformer2DModel
# defaults (patch_size 1, timestep_guidance_channels 256, eps 1e-6).
KLEIN_9B_CONFIG = {
    "_class_name": "Flux2Transformer2DModel",
    "patch_size": 1,
    "in_channels": 128,
    "out_channels": None,
    "num_layers": 8,
    "num_single_layers": 24,
    "attention_head_dim": 128,
    "num_attention_heads": 32,
    "joint_attention_dim": 12288,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}


REAL_CONFIGS = {"qwen_image_edit": QWEN_IMAGE_CONFIG, "flux2_klein": KLEIN_9B_CONFIG}
# The transformer arguments the tiny builder ties to its tiny text encoder (its hidden size):
# the real-width stand-in keeps them, so only the context projection is narrower than real.
TEXT_TIED = ("joint_attention_dim",)


def real_width_transformer(family: str, blocks: int, single_blocks: int | None = None) -> dict:
    """Transformer arguments of the real model with `blocks` blocks (Klein: double-stream
    blocks, and `single_blocks` single-stream ones, by default 3 per double as in the 9B's
    8 + 24), everything else as released except TEXT_TIED."""
    if family not in REAL_CONFIGS:
        raise SettingsError(f"family must be one of {sorted(REAL_CONFIGS)}, not {family!r}")
    if blocks < 1:
        raise SettingsError(f"blocks must be >= 1, not {blocks}")
    config: dict[str, Any] = {
        k: v for k, v in REAL_CONFIGS[family].items() if k != "_class_name" and k not in TEXT_TIED
    }
    config["num_layers"] = blocks
    if family == "flux2_klein":
        config["num_single_layers"] = 3 * blocks if single_blocks is None else single_blocks
    elif single_blocks is not None:
        raise SettingsError("qwen_image_edit has one kind of block: leave single_blocks out")
    return config


def full_depth(family: str) -> int:
    """The released model's number of blocks (double + single for Klein)."""
    config = REAL_CONFIGS[family]
    return int(config["num_layers"]) + int(config.get("num_single_layers", 0) or 0)
