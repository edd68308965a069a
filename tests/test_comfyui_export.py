"""`lora_comfyui.safetensors` in ComfyUI's own loader (ComfyUI fe25114, from ../shared/comfyui).

For each family the tiny facelora model's transformer and ComfyUI's model of the same config
share their base weights (ComfyUI's, put into diffusers' names by diffusers' own FLUX.2
single-file converter; Qwen-Image has the same names on both sides). A LoRA written by
facelora's save paths (a training checkpoint, a merged file) is then applied twice:

- diffusers: `pipe.load_lora_weights(pytorch_lora_weights.safetensors)` + `fuse_lora`;
- ComfyUI: what the LoraLoader node does (`comfy.utils.load_torch_file`, then
  `comfy.sd.load_lora_for_models`), then the weights ComfyUI computes for its model
  (`ModelPatcher.patch_weight_to_device`).

Every module of the file must load (no "lora key not loaded"), at scale alpha / rank, and
every ComfyUI weight, converted to diffusers' names, must equal the fused diffusers weight:
for FLUX.2 that checks the to_q / to_k / to_v deltas land on the right slices of the fused
qkv weights, and the single blocks' to_qkv_mlp_proj / to_out on linear1 / linear2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from facelora.config import LoraParams
from facelora.models import exports, lora_io
from facelora.models.adapters import load_adapter
from facelora.release import merge
from facelora.train import checkpoint

CPU = torch.device("cpu")
RANK = 4
CASES = [  # (family, preset, how the files were written)
    ("qwen_image_edit", None, "checkpoint"),  # the family's default preset (full)
    ("qwen_image_edit", None, "merged"),
    ("flux2_klein", None, "checkpoint"),  # double_stream
    ("flux2_klein", "all_blocks", "checkpoint"),
    ("flux2_klein", "all_blocks", "merged"),
]
NOT_LOADED = ("lora key not loaded", "NOT LOADED")


# --- the two models with the same base weights ----------------------------------------------


def comfy_model(comfy, family: str, model_path: Path):
    """ComfyUI's model (a ModelPatcher, as its loaders return) for the tiny transformer's
    config, with random weights."""
    c = SimpleNamespace(**json.loads((model_path / "transformer" / "config.json").read_text()))
    if family == "flux2_klein":
        unet = {  # the flags comfy/model_detection.py sets for FLUX.2, sizes from the config
            "image_model": "flux2",
            "in_channels": c.in_channels,
            "out_channels": c.out_channels or c.in_channels,
            "patch_size": c.patch_size,
            "vec_in_dim": None,
            "context_in_dim": c.joint_attention_dim,
            "hidden_size": c.num_attention_heads * c.attention_head_dim,
            "num_heads": c.num_attention_heads,
            "mlp_ratio": c.mlp_ratio,
            "depth": c.num_layers,
            "depth_single_blocks": c.num_single_layers,
            "axes_dim": list(c.axes_dims_rope),
            "theta": c.rope_theta,
            "guidance_embed": c.guidance_embeds,
            "qkv_bias": False,
            "ops_bias": False,
            "global_modulation": True,
            "mlp_silu_act": True,
            "default_ref_method": "index",
            "ref_index_scale": 10.0,
            "txt_ids_dims": [3],
        }
        config = comfy.supported_models.Flux2(unet)
    else:
        unet = {
            "image_model": "qwen_image",
            "patch_size": c.patch_size,
            "in_channels": c.in_channels,
            "out_channels": c.out_channels,
            "num_layers": c.num_layers,
            "attention_head_dim": c.attention_head_dim,
            "num_attention_heads": c.num_attention_heads,
            "joint_attention_dim": c.joint_attention_dim,
            "axes_dims_rope": tuple(c.axes_dims_rope),
            "default_ref_method": "index_timestep_zero",  # 2511
        }
        config = comfy.supported_models.QwenImage(unet)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return comfy.model_patcher.CoreModelPatcher(model, load_device=CPU, offload_device=CPU)


def to_diffusers_names(family: str, comfy_state: dict) -> dict[str, torch.Tensor]:
    """ComfyUI's diffusion-model weights under diffusers' names, by diffusers' own converter
    (FLUX.2: BFL names, fused qkv split in three), not by ComfyUI's map under test;
    Qwen-Image has diffusers' names in ComfyUI too."""
    state = {k: v.detach().clone() for k, v in comfy_state.items()}
    if family == "flux2_klein":
        from diffusers.loaders.single_file_utils import (
            convert_flux2_transformer_checkpoint_to_diffusers,
        )

        return convert_flux2_transformer_checkpoint_to_diffusers(state)
    state.pop("__index_timestep_zero__", None)  # ComfyUI's marker of 2511 (zero_cond_t)
    return state


def models(comfy, family: str, model_path: Path):
    """ComfyUI's model and its base weights under diffusers' names."""
    model = comfy_model(comfy, family, model_path)
    return model, to_diffusers_names(family, model.model.diffusion_model.state_dict())


def diffusers_adapter(family: str, model_path: Path, state: dict):
    adapter = load_adapter(family, model_path, "float32", CPU)
    missing, unexpected = adapter.transformer.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return adapter


# --- the LoRA files, written by facelora -----------------------------------------------------


def write_lora(family: str, preset: str | None, how: str, model_path: Path, state, out: Path):
    """A LoRA with random A and B (B != 0) on the preset's modules, saved by facelora's own
    code: a training checkpoint (checkpoint.save) or a merged + compressed file (save_merged).
    Returns the folder (both files in it) and the scale each module should get."""
    adapter = diffusers_adapter(family, model_path, state)
    params = LoraParams(rank=RANK, preset=preset).for_family(family)
    lora_io.add_lora(adapter.transformer, family, params)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    tensors = lora_io.lora_state(adapter.transformer)
    folder = checkpoint.save(
        out / "train",
        1,
        type(adapter.pipe),
        tensors,
        lora_io.adapter_metadata(adapter.transformer),
        params.scale_alpha,
        state={},
        meta={"family": family},
        family=family,
    )
    if how == "checkpoint":
        return folder, params.scale_alpha / params.rank
    merged = merge.merge_loras([(folder, 2.0), (folder, 1.0)], family=family)
    merged, _ = merge.compress(merged, RANK + 1)  # rank 8 -> 5, alpha = rank: scale 1
    merge.save_merged(merged, out / "merged", type(adapter.pipe))
    return out / "merged", 1.0


def diffusers_fused(family: str, model_path: Path, state: dict, folder: Path) -> dict:
    """The transformer's weights with the diffusers file fused in by diffusers/peft."""
    adapter = diffusers_adapter(family, model_path, state)
    adapter.pipe.load_lora_weights(str(folder), weight_name=lora_io.DIFFUSERS_WEIGHTS)
    adapter.pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    adapter.pipe.unload_lora_weights()
    return {k: v.detach().clone() for k, v in adapter.transformer.state_dict().items()}


def comfy_load(comfy, model, lora: dict, caplog):
    """The LoraLoader node's path; returns the patched ModelPatcher, the loaded patches and
    the loader's warnings about keys it did not load."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith(NOT_LOADED)]
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map, False)
    return patched, patches, warnings


def comfy_weights(patched) -> dict[str, torch.Tensor]:
    """Every diffusion-model weight as ComfyUI computes it with the patches applied."""
    out = {}
    for key in patched.model.diffusion_model.state_dict():
        full = f"diffusion_model.{key}"
        out[key] = patched.patch_weight_to_device(full, device_to=CPU, return_weight=True)
    return {k: v.detach().clone() for k, v in out.items()}


def modules_of(lora: dict, prefix: str) -> set[str]:
    """The diffusers modules of a ComfyUI-layout file."""
    suffix = ".lora_A.weight"
    return {k.removeprefix(prefix).removesuffix(suffix) for k in lora if k.endswith(suffix)}


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "preset", "how"), CASES)
def test_comfyui_loads_every_module_at_its_scale_onto_the_right_weights(
    comfyui, tiny_models, tmp_path, caplog, family, preset, how
):
    model, base = models(comfyui, family, tiny_models[family])
    folder, scale = write_lora(family, preset, how, tiny_models[family], base, tmp_path)
    path = folder / exports.COMFYUI_WEIGHTS
    lora = comfyui.utils.load_torch_file(str(path), safe_load=True)  # as the LoraLoader node
    prefix = exports.comfyui_layout(family).prefix
    assert all(k.startswith(prefix) for k in lora)

    patched, patches, warnings = comfy_load(comfyui, model, lora, caplog)
    assert warnings == []  # every key of the file was loaded, every patch found its weight
    modules = modules_of(lora, prefix)
    assert len(patches) == len(modules)  # one patch per module of the file
    for adapter in patches.values():
        _, down, alpha = adapter.weights[:3]
        assert alpha is not None and alpha / down.shape[0] == pytest.approx(scale)
    expected = diffusers_fused(family, tiny_models[family], base, folder)
    got = to_diffusers_names(family, comfy_weights(patched))
    assert got.keys() == expected.keys()
    changed = {k for k in expected if not torch.equal(expected[k], base[k])}
    assert len(changed) == len(modules)  # the diffusers side: one weight per module
    for key, weight in expected.items():
        assert torch.allclose(got[key], weight, atol=1e-5, rtol=1e-5), key
    # and each delta is B @ A * alpha / r from the file itself, on the module's weight
    for module in modules:
        a, b = lora[f"{prefix}{module}.lora_A.weight"], lora[f"{prefix}{module}.lora_B.weight"]
        file_alpha = float(lora[f"{prefix}{module}.alpha"])
        delta = (b.double() @ a.double()) * (file_alpha / a.shape[0])
        weight = f"{module}.weight"
        assert torch.allclose((got[weight] - base[weight]).double(), delta, atol=1e-5), module


def test_the_old_klein_layout_loads_nothing_in_comfyui_but_is_still_read(
    comfyui, tiny_models, tmp_path, caplog
):
    family = "flux2_klein"
    model, base = models(comfyui, family, tiny_models[family])
    folder, _ = write_lora(family, "all_blocks", "checkpoint", tiny_models[family], base, tmp_path)
    new = load_file(folder / exports.COMFYUI_WEIGHTS)
    old = {"diffusion_model." + k.removeprefix("transformer."): v for k, v in new.items()}
    _, patches, warnings = comfy_load(comfyui, model, old, caplog)
    assert patches == {} and len(warnings) == len(old)  # what the issue saw: 0 of 32 modules
    save_file(old, str(tmp_path / "old.safetensors"))
    assert exports.from_comfyui(old)[0].keys() == exports.from_comfyui(new)[0].keys()
    back, meta = lora_io.read_lora(tmp_path / "old.safetensors")
    now, now_meta = lora_io.read_lora(folder / exports.COMFYUI_WEIGHTS)
    diffusers_side, diffusers_meta = lora_io.read_lora(folder / lora_io.DIFFUSERS_WEIGHTS)
    assert back.keys() == now.keys() == diffusers_side.keys()
    assert all(torch.equal(back[k], diffusers_side[k]) for k in back)
    assert all(torch.equal(now[k], diffusers_side[k]) for k in now)
    assert meta["lora_alpha"] == now_meta["lora_alpha"] == diffusers_meta["lora_alpha"]


@pytest.mark.parametrize("family", ["qwen_image_edit", "flux2_klein"])
def test_the_diffusers_file_is_not_for_comfyui(comfyui, tiny_models, tmp_path, caplog, family):
    """ComfyUI maps the diffusers file's `transformer.` keys too, but without `.alpha`
    tensors it applies scale 1 (it ignores the header): half the trained strength for the
    Qwen recipe (alpha / rank 2), double for Klein's (0.5). diffusers' loader refuses
    `.alpha` tensors, so the file keeps none and the card says which file is ComfyUI's."""
    model, base = models(comfyui, family, tiny_models[family])
    folder, scale = write_lora(family, None, "checkpoint", tiny_models[family], base, tmp_path)
    diffusers_file = load_file(folder / lora_io.DIFFUSERS_WEIGHTS)
    assert not any(k.endswith(".alpha") for k in diffusers_file)
    _, patches, _ = comfy_load(comfyui, model, diffusers_file, caplog)
    assert len(patches) == len(diffusers_file) // 2
    assert all(p.weights[2] is None for p in patches.values()) and scale != 1.0
