"""The ComfyUI-layout LoRA file (`lora_comfyui.safetensors`): key layouts per model family.

ComfyUI's LoraLoader (`comfy.sd.load_lora_for_models` -> `comfy.lora.model_lora_keys_unet` +
`comfy.lora.load_lora`) reads neither the adapter config in the header nor diffusers' module
names for every model: each module of the file must be named the way `model_lora_keys_unet`
maps it onto the ComfyUI model's weights, and its strength comes from a `<module>.alpha`
tensor beside `<module>.lora_A.weight` / `<module>.lora_B.weight` (scale alpha / rank; with no
`.alpha` ComfyUI applies scale 1, whatever the header says). So every module gets its alpha.

Layouts (what ComfyUI fe25114's comfy/lora.py reads natively, checked by
tests/test_comfyui_export.py with ComfyUI's own code):

- "diffusion_model": `diffusion_model.<diffusers module>` (qwen_image_edit). ComfyUI's
  Qwen-Image model uses diffusers' module names, and `model_lora_keys_unet` maps every weight
  of the model's state dict by its own name (`diffusion_model.transformer_blocks.0.attn.to_q`).
- "transformer": `transformer.<diffusers module>` (flux2_klein). ComfyUI's FLUX.2 model uses
  BFL names (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`); its Flux branch maps
  diffusers names with the `transformer.` prefix through `comfy.utils.flux_to_diffusers`:
  attn.to_q / to_k / to_v (add_q/k/v_proj) onto their slices of the fused img (txt) qkv weight,
  to_out.0 / to_add_out onto img/txt_attn.proj, ff(_context).linear_in / linear_out onto
  img/txt_mlp.0 / .2, and the single blocks' attn.to_qkv_mlp_proj / attn.to_out onto linear1 /
  linear2 whole. The LoRA stays exactly as trained (no fusing of q/k/v into one rank-3r LoRA).
  `diffusion_model.<diffusers module>` (the old layout) is in no map for FLUX.2: ComfyUI
  loaded none of it.

The diffusers-layout file (`pytorch_lora_weights.safetensors`) carries no `.alpha` tensors:
diffusers 0.42's `load_lora_weights` refuses them (Klein: "Invalid adapter checkpoint", its
keys must all contain "lora"; Qwen: `.alpha` sends the file through its non-diffusers
converter, which then finds none of the modules). Its scale is in the adapter metadata.

Which layout a family's files use is a family fact (`comfyui_layout` of its record in
facelora.registry.families); the layouts are keyed by that name here. `from_comfyui` reads
every layout here (including the old `diffusion_model.` files of Klein checkpoints) and the
diffusers layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from facelora.io import safetensors_io
from facelora.registry.families import family as get_family

COMFYUI_WEIGHTS = "lora_comfyui.safetensors"
ALPHA_SUFFIX = ".alpha"
_A_SUFFIX = ".lora_A.weight"


@dataclass(frozen=True)
class Layout:
    """One ComfyUI key layout: module-keyed tensors `<module>.<x>` become `<prefix><module>.<x>`."""

    name: str
    prefix: str
    reads_it: str  # what in ComfyUI maps these keys onto the model's weights


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "diffusion_model",
            "diffusion_model.",
            "comfy.lora.model_lora_keys_unet: the model's own state-dict names "
            "(ComfyUI's Qwen-Image uses diffusers' module names)",
        ),
        Layout(
            "transformer",
            "transformer.",
            "comfy.lora.model_lora_keys_unet, Flux branch: comfy.utils.flux_to_diffusers "
            "(diffusers names onto BFL weights and their qkv slices)",
        ),
    )
}

# Prefixes `from_comfyui` strips: every ComfyUI layout's (old files included), and the
# diffusers file's (`transformer.`, also the Klein layout's).
_READ_PREFIXES = tuple(dict.fromkeys([*(x.prefix for x in LAYOUTS.values()), "transformer."]))


def comfyui_layout(family: str) -> Layout:
    """The ComfyUI key layout of `family`'s LoRA files (its registry record says which)."""
    return LAYOUTS[get_family(family).comfyui_layout]


def to_comfyui(
    state: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float], family: str
) -> dict[str, torch.Tensor]:
    """Module-keyed LoRA tensors (`<module>.lora_A.weight`) -> `family`'s ComfyUI keys, with
    one `.alpha` per module: `alpha` for all, or a module -> alpha mapping (merged files)."""
    prefix = comfyui_layout(family).prefix
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        out[prefix + key] = value
        if key.endswith(_A_SUFFIX):
            module = key[: -len(_A_SUFFIX)]
            value_alpha = alpha[module] if isinstance(alpha, Mapping) else alpha
            out[f"{prefix}{module}{ALPHA_SUFFIX}"] = torch.tensor(float(value_alpha))
    return out


def _strip(key: str) -> str:
    for prefix in _READ_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def from_comfyui(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A ComfyUI-layout (any layout here, old or new) or diffusers-layout state ->
    (module-keyed LoRA tensors, module -> alpha from its `.alpha` tensor; empty when none)."""
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, value in state.items():
        name = _strip(key)
        if name.endswith(ALPHA_SUFFIX):
            alphas[name[: -len(ALPHA_SUFFIX)]] = float(value)
        else:
            tensors[name] = value
    return tensors, alphas


def is_comfyui(keys: Iterable[str]) -> bool:
    """Whether these file keys are a ComfyUI-layout LoRA (`.alpha` tensors, or the
    `diffusion_model.` prefix), rather than the diffusers layout."""
    return any(k.endswith(ALPHA_SUFFIX) or k.startswith("diffusion_model.") for k in keys)


def save_comfyui(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float],
    family: str,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `folder/lora_comfyui.safetensors` in `family`'s ComfyUI layout (reproducible
    bytes); `metadata` adds header entries (ComfyUI ignores the header)."""
    path = Path(folder) / COMFYUI_WEIGHTS
    header = {"format": "pt", **(metadata or {})}
    safetensors_io.write(path, to_comfyui(state, alpha, family), metadata=header)
    return path
