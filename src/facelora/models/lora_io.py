"""LoRA adapters on the transformer: creation, saving in two key layouts, checked loading.

Files:
- diffusers layout (`pytorch_lora_weights.safetensors`): keys `transformer.<module>.lora_A.weight`
  / `.lora_B.weight`, the adapter config (rank, alpha, targets) in the header, written by the
  pipeline class's own `save_lora_weights`, so `pipe.load_lora_weights(...)` reads it back.
- ComfyUI layout (`lora_comfyui.safetensors`): the same tensors under the family's ComfyUI key
  layout (`diffusion_model.<module>` for Qwen-Image, `transformer.<module>` for FLUX.2 Klein)
  plus one `<module>.alpha` per module, which is where ComfyUI takes the strength from; written
  by facelora.models.exports (see there why each family has its layout, and why the diffusers
  file has no `.alpha` tensors).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from facelora.config import LoraParams
from facelora.errors import MissingInput, SettingsError
from facelora.io import safetensors_io
from facelora.models.exports import COMFYUI_WEIGHTS as COMFYUI_WEIGHTS
from facelora.models.exports import from_comfyui
from facelora.models.exports import save_comfyui as save_comfyui
from facelora.models.lora_targets import target_modules_for

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_PREFIX = "transformer."


class LoraMismatch(SettingsError):
    """A LoRA file that does not fit this model (another architecture or size)."""


def add_lora(transformer: torch.nn.Module, family: str, lora: LoraParams) -> list[str]:
    from peft import LoraConfig

    names = target_modules_for(transformer, family, lora.preset, blocks=lora.blocks)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.scale_alpha,
        lora_dropout=lora.dropout,
        target_modules=names,
        init_lora_weights=True,  # B = 0: training starts from the base model exactly
    )
    transformer.add_adapter(config)
    return names


TEXT_ENCODER_WEIGHTS = "text_encoder_lora.safetensors"
TEXT_ENCODER_TARGETS = re.compile(
    r"^(model\.language_model|model)\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$"
)


def add_text_encoder_lora(text_encoder: torch.nn.Module, lora: LoraParams) -> list[str]:
    """A LoRA on the text model's attention projections (Qwen2.5-VL's language model, Qwen3)."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, _ in text_encoder.named_modules() if TEXT_ENCODER_TARGETS.match(n)]
    if not names:
        raise LoraMismatch("lora.train_text_encoder: no attention projections found to adapt")
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.scale_alpha,
        lora_dropout=lora.dropout,
        target_modules=names,
        init_lora_weights=True,
    )
    # peft directly: transformers' own add_adapter wants a newer peft than diffusers pins
    inject_adapter_in_model(config, text_encoder)
    return names


def module_lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors of a module with injected adapters, keyed like peft's state dicts."""
    return {
        name.replace(".default.", "."): p.detach().to("cpu", torch.float32).clone()
        for name, p in module.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }


def save_text_encoder(folder: Path, state: dict[str, torch.Tensor], alpha: float) -> Path:
    """The text encoder's LoRA (the pipelines' loaders take transformer LoRAs only)."""
    path = folder / TEXT_ENCODER_WEIGHTS
    tensors = {f"text_encoder.{k}": v for k, v in state.items()}
    safetensors_io.write(path, tensors, metadata={"format": "pt", "lora_alpha": str(alpha)})
    return path


def lora_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed by module (`<module>.lora_A.weight`), detached copies."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer)
    return {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in state.items()}


def adapter_metadata(transformer: torch.nn.Module) -> dict:
    config = transformer.peft_config["default"].to_dict()
    return json.loads(
        json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    )


def save_diffusers(
    folder: Path, pipeline_class, state: dict[str, torch.Tensor], metadata: dict
) -> Path:
    pipeline_class.save_lora_weights(
        folder,
        transformer_lora_layers=state,
        weight_name=DIFFUSERS_WEIGHTS,
        transformer_lora_adapter_metadata=metadata,
    )
    safetensors_io.rewrite(folder / DIFFUSERS_WEIGHTS)  # diffusers' keys, reproducible bytes
    return folder / DIFFUSERS_WEIGHTS


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file of either layout -> (module-keyed tensors, adapter metadata or {})."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"LoRA file not found: {path}")
    raw = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    meta = {}
    if "lora_adapter_metadata" in header:  # what diffusers' save_lora_weights writes
        stored = json.loads(header["lora_adapter_metadata"])
        meta = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in stored.items()}
    tensors, alphas = from_comfyui(raw)  # either layout; ComfyUI's alphas when it has them
    if len(set(alphas.values())) > 1:
        raise LoraMismatch(f"{path}: different alphas per module (a merged file?): not supported")
    if alphas:
        meta.setdefault("lora_alpha", next(iter(alphas.values())))
    return tensors, meta


def check_compatible(
    tensors: dict[str, torch.Tensor], transformer: torch.nn.Module, source: str
) -> None:
    """Refuse a LoRA made for another architecture or size, saying which and why."""
    modules = dict(transformer.named_modules())
    hidden = getattr(transformer.config, "num_attention_heads", 0) * getattr(
        transformer.config, "attention_head_dim", 0
    )
    missing = sorted(
        {k.rsplit(".lora_", 1)[0] for k in tensors if k.rsplit(".lora_", 1)[0] not in modules}
    )
    if missing:
        raise LoraMismatch(
            f"{source}: {len(missing)} of its modules do not exist in this model (e.g. "
            f"{missing[0]}): it was made for another architecture"
        )
    for key, value in tensors.items():
        module = modules[key.rsplit(".lora_", 1)[0]]
        base = getattr(module, "base_layer", module)
        expected = base.in_features if ".lora_A." in key else base.out_features
        got = value.shape[1] if ".lora_A." in key else value.shape[0]
        if got != expected:
            raise LoraMismatch(
                f"{source}: {key} expects a layer of {got} features, this model has {expected} "
                f"(model hidden size {hidden}): the LoRA is for another model size or family, "
                f"e.g. FLUX.1 (hidden 3072) vs FLUX.2 Klein 9B (4096), or Klein 4B vs 9B"
            )


def load_into(transformer: torch.nn.Module, path: str | Path, rank: int) -> dict:
    """Initialise the transformer's adapter from a LoRA file (init_from), after the checks."""
    from peft.utils import set_peft_model_state_dict

    tensors, meta = read_lora(path)
    check_compatible(tensors, transformer, str(path))
    ranks = {v.shape[0] for k, v in tensors.items() if ".lora_A." in k}
    if ranks != {rank}:
        raise LoraMismatch(
            f"{path}: rank {sorted(ranks)} but lora.rank is {rank}: phases continue one adapter, "
            f"so they share its rank"
        )
    result = set_peft_model_state_dict(transformer, tensors)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise LoraMismatch(f"{path}: tensors the adapter has no place for: {unexpected[:3]}")
    return meta
