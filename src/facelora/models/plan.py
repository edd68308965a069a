"""Size a LoRA run from a transformer config.json alone: LoRA parameters, file size, memory.

The transformer is built from the config on PyTorch's ``meta`` device (no memory, no weights),
with the real diffusers class, so the Linear shapes and the base parameter count cannot drift
from diffusers. Units: file sizes in MB (10^6 bytes), memory in GiB (2^30 bytes).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facelora.errors import SettingsError
from facelora.models.lora_targets import check_family, target_modules_for
from facelora.registry.families import family as get_family

MB = 10**6
GIB = 2**30

# One latent token per 16x16 pixels in both families: an 8x VAE, then 2x2 patches (Qwen-Image's
# patch_size 2; FLUX.2 packs 2x2 latents into its 128 input channels, patch_size 1).
PIXELS_PER_TOKEN = 16
ADAMW_TRAIN_BYTES = 16  # per trainable fp32 parameter: weight 4 + grad 4 + AdamW exp_avg/sq 8
BLOCK_ACTIVATION_BYTES = 34  # per token per hidden unit for one recomputed block (see plan())
OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS workspaces, allocator fragmentation
SAFETENSORS_DTYPES = {1: "F8_E4M3", 2: "BF16", 4: "F32", 8: "F64"}
# Bytes per weight of the transformer blocks' Linears by model.quantize, and per output row
# (scales): bf16; float8 + an fp32 scale per row (facelora.models.fp8); LLM.int8 + an fp32
# absmax per row; nf4 at 4 bits + an absmax per 64 weights (bitsandbytes' default blocks).
QUANTIZED_WEIGHT_BYTES = {"none": 2.0, "fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
QUANTIZED_ROW_BYTES = {"none": 0, "fp8": 4, "int8": 4, "nf4": 0}
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def load_config(config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A transformer config as a dict (given as a dict, or the path of a config.json)."""
    if isinstance(config, Mapping):
        return dict(config)
    return json.loads(Path(config).read_text())


@functools.lru_cache(maxsize=8)
def _meta_model(family: str, config_json: str) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, get_family(family).transformer_class)
    with torch.device("meta"):
        return cls.from_config(json.loads(config_json))


def meta_model(config: Mapping[str, Any] | str | Path, family: str) -> nn.Module:
    """The family's transformer built from `config` on the meta device (cached; do not edit)."""
    check_family(family)
    cfg = load_config(config)
    name = cfg.get("_class_name")
    expected = get_family(family).transformer_class
    if name is not None and name != expected:
        raise SettingsError(f"config is for {name}, but family {family} uses {expected}")
    return _meta_model(family, json.dumps(cfg, sort_keys=True, default=list))


def lora_shapes(model: nn.Module, names: Sequence[str]) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of each targeted Linear."""
    modules = dict(model.named_modules())
    return [(n, modules[n].in_features, modules[n].out_features) for n in names]


def lora_param_count(shapes: Sequence[tuple[str, int, int]], rank: int) -> int:
    """LoRA parameters: rank x (in + out) per Linear (lora_A: rank x in, lora_B: out x rank)."""
    return sum(rank * (i + o) for _, i, o in shapes)


def safetensors_header_bytes(
    shapes: Sequence[tuple[str, int, int]],
    rank: int,
    dtype_bytes: int = 2,
    prefix: str = "transformer.",
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Exact size of the safetensors header (8-byte length + JSON, padded to 8) for the LoRA.

    Keys are diffusers' (``transformer.<module>.lora_A.weight``); safetensors lays tensors out
    sorted by name when they share a dtype, which fixes the data offsets written in the header.
    """
    dtype = SAFETENSORS_DTYPES.get(dtype_bytes, "BF16")
    tensors = []
    for name, i, o in shapes:
        tensors.append((f"{prefix}{name}.lora_A.weight", [rank, i]))
        tensors.append((f"{prefix}{name}.lora_B.weight", [o, rank]))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, shape in sorted(tensors):
        size = shape[0] * shape[1] * dtype_bytes
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    n = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + n + (-n) % 8


def adapter_metadata_allowance(names: Sequence[str]) -> int:
    """Upper bound on the bytes diffusers' ``save_lora_weights`` adds to the header for the LoRA
    config (``lora_adapter_metadata``: LoraConfig as indented, JSON-escaped JSON): about 1.7 KB
    of fields plus each target name with its quotes and indent (peft may shorten a long list
    to fewer suffixes, so the real figure is often lower)."""
    return 2048 + sum(len(n) + 11 for n in names)


def frozen_weight_bytes(model: nn.Module, quantize: str = "none") -> float:
    """Bytes of the frozen transformer: bf16, except the blocks' Linear weights, stored as
    model.quantize stores them (biases, norms and embeddings stay bf16)."""
    if quantize not in QUANTIZED_WEIGHT_BYTES:
        raise SettingsError(f"quantize {quantize!r}: use one of {sorted(QUANTIZED_WEIGHT_BYTES)}")
    total = 2.0 * sum(p.numel() for p in model.parameters())
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.startswith(BLOCK_PREFIXES):
            n = module.weight.numel()
            total += (QUANTIZED_WEIGHT_BYTES[quantize] - 2.0) * n
            total += QUANTIZED_ROW_BYTES[quantize] * module.out_features
    return total


def estimate_train_bytes(
    weight_bytes: float,
    lora_params: int,
    hidden: int,
    num_blocks: int,
    tokens: int,
    batch_size: int = 1,
) -> dict[str, float]:
    """The memory estimate of plan(), in bytes, by part (see plan() for the formula)."""
    weights = weight_bytes
    lora = ADAMW_TRAIN_BYTES * lora_params
    act = batch_size * tokens * hidden * (2 * num_blocks + BLOCK_ACTIVATION_BYTES)
    overhead = OVERHEAD_GIB * GIB
    return {
        "weights": weights,
        "lora": lora,
        "activations": act,
        "overhead": overhead,
        "total": weights + lora + act + overhead,
    }


def _preset_label(preset: str | Sequence[str]) -> str:
    if isinstance(preset, str):
        return preset
    text = ",".join(preset)
    return text if len(text) <= 40 else f"custom({len(preset)} names)"


def plan(
    config: Mapping[str, Any] | str | Path,
    family: str,
    presets: Sequence[str | Sequence[str]] | None = None,
    ranks: Sequence[int] = (16, 32, 64, 128),
    dtype_bytes: int = 2,
    *,
    blocks: Sequence[int] | None = None,
    resolution: int = 1024,
    batch_size: int = 1,
    text_tokens: int = 512,
    reference_images: int = 1,
    quantize: str = "none",
) -> list[dict[str, Any]]:
    """One row per preset x rank: LoRA size and an ESTIMATE of training memory.

    `config` is a transformer config.json (dict or path). `presets` defaults to the family's
    named presets (``blocks`` only when `blocks` is given); an entry may be a custom list of
    module names. `dtype_bytes` is the LoRA file's dtype (2: bf16/fp16, 4: fp32).

    Row fields:
      - ``lora_params``: sum over targeted Linears of rank x (in_features + out_features).
      - ``lora_mb``: (lora_params x dtype_bytes + header) / 10^6, where the header is the
        exact safetensors tensor table with diffusers' keys and ``{"format": "pt"}`` metadata,
        plus an allowance for the LoRA config that diffusers' ``save_lora_weights`` also stores
        (``adapter_metadata_allowance``; a few tens of KB at most).
      - ``base_params``: every parameter of the transformer, counted on the meta device.
      - ``train_gib``: the estimate below, in GiB; also by part (``weights_gib``, ...).

    Training memory (an estimate, not a measurement; text encoder and VAE not loaded, their
    outputs cached; batch b; sequence S = text_tokens + (1 + reference_images) x
    (resolution / 16)^2, i.e. 4608 + 512 = 8704 tokens for an edit pair at 1024x1024; hidden D;
    L blocks)::

        2 x base_params                 frozen bf16 transformer weights (`quantize`: the
                                        blocks' Linear weights as model.quantize stores them,
                                        frozen_weight_bytes)
      + 16 x lora_params                fp32 LoRA weights 4 + grads 4 + AdamW moments 8
      + b x S x D x 2 x L               gradient checkpointing: each block's bf16 input kept
      + b x S x D x 34                  one block recomputed in backward: ~34 bytes per token
                                        and hidden unit (Korthikanti et al. 2022, 16-bit
                                        activations; SDPA/flash attention stores no S x S scores)
      + 1 GiB                           CUDA context, workspaces, fragmentation

    Not included: EMA copies, 8-bit optimisers (smaller or extra), quantisation's
    dequantised copy of the one layer being computed, the LoRA's own rank-sized activations
    (negligible), and peaks from other processes.
    """
    check_family(family)
    cfg = load_config(config)
    model = meta_model(cfg, family)
    if presets is None:
        presets = [
            p
            for p, spec in get_family(family).presets.items()
            if blocks is not None or not spec.needs_blocks
        ]
    base_params = sum(p.numel() for p in model.parameters())
    weight_bytes = frozen_weight_bytes(model, quantize)
    mc = model.config
    hidden = int(mc["num_attention_heads"]) * int(mc["attention_head_dim"])
    num_blocks = int(mc["num_layers"]) + int(mc.get("num_single_layers", 0) or 0)
    tokens = text_tokens + (1 + reference_images) * (resolution // PIXELS_PER_TOKEN) ** 2
    rows: list[dict[str, Any]] = []
    for preset in presets:
        # blocks= goes to the `blocks` preset and to custom lists; other presets take all blocks
        spec = get_family(family).presets.get(preset) if isinstance(preset, str) else None
        use_blocks = None if spec is not None and not spec.needs_blocks else blocks
        names = target_modules_for(model, family, preset, blocks=use_blocks)
        shapes = lora_shapes(model, names)
        for rank in ranks:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise SettingsError(f"rank {rank!r} is not a positive integer")
            params = lora_param_count(shapes, rank)
            header = safetensors_header_bytes(
                shapes, rank, dtype_bytes, metadata={"format": "pt"}
            ) + adapter_metadata_allowance(names)
            mem = estimate_train_bytes(weight_bytes, params, hidden, num_blocks, tokens, batch_size)
            rows.append(
                {
                    "family": family,
                    "preset": _preset_label(preset),
                    "rank": rank,
                    "modules": len(names),
                    "lora_params": params,
                    "lora_mb": (params * dtype_bytes + header) / MB,
                    "base_params": base_params,
                    "quantize": quantize,
                    "weights_gib": mem["weights"] / GIB,
                    "lora_train_gib": mem["lora"] / GIB,
                    "activations_gib": mem["activations"] / GIB,
                    "train_gib": mem["total"] / GIB,
                }
            )
    return rows


def format_plan(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of plan() rows."""
    head = (
        "family",
        "preset",
        "rank",
        "modules",
        "LoRA params",
        "LoRA MB",
        "base params",
        "frozen GiB",
        "train GiB (est.)",
    )
    body = [
        (
            str(r["family"]),
            str(r["preset"]),
            str(r["rank"]),
            str(r["modules"]),
            f"{r['lora_params'] / 1e6:,.1f}M",
            f"{r['lora_mb']:,.1f}",
            f"{r['base_params'] / 1e9:.2f}B",
            f"{r['weights_gib']:.1f}" + ("" if r["quantize"] == "none" else f" {r['quantize']}"),
            f"{r['train_gib']:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]
    right = {2, 3, 4, 5, 6, 7, 8}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *(line(b) for b in body)])
