"""LoRA target names (on tiny real diffusers transformers, through peft) and the LoRA plan."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from facelora.models.lora_targets import describe_block, target_modules, target_modules_for
from facelora.models.plan import (
    adapter_metadata_allowance,
    format_plan,
    lora_shapes,
    plan,
    safetensors_header_bytes,
)
from facelora.models.real_configs import KLEIN_9B_CONFIG, QWEN_IMAGE_CONFIG
from facelora.registry.families import FAMILIES

PRESETS = {name: record.presets for name, record in FAMILIES.items()}

# Tiny configs: 2 double blocks (+ 3 single blocks for Flux2, a different count so that a mix-up
# of the two stacks shows), width 2 heads x 16 = 32. Qwen's rope axes must sum to the head dim.
QWEN_TINY = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "axes_dims_rope": [4, 6, 6],
}
FLUX2_TINY = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "timestep_guidance_channels": 16,
    "axes_dims_rope": [4, 4, 4, 4],
    "guidance_embeds": False,
}

TINY = {"qwen_image_edit": QWEN_TINY, "flux2_klein": FLUX2_TINY}
CLASSES = {"qwen_image_edit": QwenImageTransformer2DModel, "flux2_klein": Flux2Transformer2DModel}
# global indices: Flux2 tiny has double 0-1 and single 2-4 -> double 1, single 0 and 2
TINY_BLOCKS = [1, 2, 4]
CASES = [(f, p) for f, presets in PRESETS.items() for p in presets]


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    return CLASSES[family](**TINY[family])


def _blocks(family: str, preset: str) -> list[int] | None:
    return TINY_BLOCKS if PRESETS[family][preset].needs_blocks else None


RECIPE = {
    "qwen_image_edit": {
        "full": [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
            "img_mlp.net.0.proj",
            "img_mlp.net.2",
            "txt_mlp.net.0.proj",
            "txt_mlp.net.2",
        ],
        "attention": [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
        ],
        "image_stream": ["to_q", "to_k", "to_v", "img_mlp.net.0.proj", "img_mlp.net.2"],
    },
}
FLUX2_D = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
]
FLUX2_S = ["attn.to_qkv_mlp_proj", "attn.to_out"]


def test_presets_are_the_recipes():
    assert set(PRESETS) == {"qwen_image_edit", "flux2_klein"}
    for preset, short in RECIPE["qwen_image_edit"].items():
        spec = PRESETS["qwen_image_edit"][preset]
        assert [n.removeprefix("attn.") for n in spec.double] == short, preset
        assert spec.single == ()
    assert set(PRESETS["qwen_image_edit"]) == set(RECIPE["qwen_image_edit"])
    flux = PRESETS["flux2_klein"]
    assert set(flux) == {"all_blocks", "double_stream", "single_stream", "blocks"}
    assert (list(flux["all_blocks"].double), list(flux["all_blocks"].single)) == (FLUX2_D, FLUX2_S)
    assert (list(flux["double_stream"].double), flux["double_stream"].single) == (FLUX2_D, ())
    assert (flux["single_stream"].double, list(flux["single_stream"].single)) == ((), FLUX2_S)
    assert (list(flux["blocks"].double), list(flux["blocks"].single)) == (FLUX2_D, FLUX2_S)
    assert flux["blocks"].needs_blocks
    assert not any(s.needs_blocks for p, s in flux.items() if p != "blocks")


@pytest.mark.parametrize(("family", "preset"), CASES)
def test_preset_names_exist_and_are_linear(family, preset):
    model = tiny(family)
    names = target_modules_for(model, family, preset, blocks=_blocks(family, preset))
    modules = dict(model.named_modules())
    assert names and len(names) == len(set(names))
    for name in names:
        assert isinstance(modules[name], nn.Linear), name
    spec = PRESETS[family][preset]
    if spec.needs_blocks:
        stacks = {n.rsplit(".attn", 1)[0].split(".ff")[0] for n in names}
        assert stacks == {
            "transformer_blocks.1",
            "single_transformer_blocks.0",
            "single_transformer_blocks.2",
        }
    else:
        cfg = TINY[family]
        expected = cfg["num_layers"] * len(spec.double) + cfg.get("num_single_layers", 0) * len(
            spec.single
        )
        assert len(names) == expected


@pytest.mark.parametrize(("family", "preset"), CASES)
def test_peft_adapter_matches_names_and_plan_count(family, preset):
    model = tiny(family)
    blocks = _blocks(family, preset)
    names = target_modules_for(model, family, preset, blocks=blocks)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=names))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == set(names)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = plan(TINY[family], family, [preset], ranks=[4], blocks=blocks)[0]
    assert row["lora_params"] == trainable
    assert row["modules"] == len(names)
    assert row["base_params"] == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" not in n
    )


def test_bare_to_out_is_the_trap_full_names_avoid():
    # why names are fully qualified: peft cannot wrap the double block's attn.to_out ModuleList
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        tiny("flux2_klein").add_adapter(LoraConfig(r=4, target_modules=["to_out"]))
    names = target_modules("flux2_klein", ["to_out"], 2, 3)
    assert names == [f"single_transformer_blocks.{i}.attn.to_out" for i in range(3)]


def test_qwen_full_rank64_is_about_850_mb():
    rows = plan(QWEN_IMAGE_CONFIG, "qwen_image_edit", ["full"], ranks=[64])
    row = rows[0]
    print(f"\nQwen-Image full rank 64 bf16: {row['lora_params']:,} params, {row['lora_mb']:.2f} MB")
    # per block: 8 attention Linears 3072->3072, 4 MLP Linears 3072<->12288
    assert row["lora_params"] == 60 * 64 * (8 * (3072 + 3072) + 4 * (3072 + 12288))
    assert row["lora_mb"] == pytest.approx(850, rel=0.02)
    assert 20.0e9 < row["base_params"] < 21.0e9  # "20B" Qwen-Image
    assert 40 < row["train_gib"] < 64  # bf16 weights alone are 38 GiB


def test_klein_9b_config_and_block_convention():
    rows = plan(KLEIN_9B_CONFIG, "flux2_klein", ranks=[32], blocks=[7, 12, 16, 20])
    by = {r["preset"]: r for r in rows}
    assert list(by) == ["all_blocks", "double_stream", "single_stream", "blocks"]
    assert 8.5e9 < by["all_blocks"]["base_params"] < 9.5e9  # "9B"
    assert by["all_blocks"]["modules"] == 8 * 12 + 24 * 2
    assert (
        by["all_blocks"]["lora_params"]
        == by["double_stream"]["lora_params"] + by["single_stream"]["lora_params"]
    )
    names = target_modules("flux2_klein", "blocks", 8, 24, blocks=[20, 7, 12, 16])
    assert names[:12] == [
        f"transformer_blocks.7.{r}" for r in PRESETS["flux2_klein"]["blocks"].double
    ]
    assert names[12:] == [
        f"single_transformer_blocks.{i}.attn.{r}"
        for i in (4, 8, 12)
        for r in ("to_qkv_mlp_proj", "to_out")
    ]
    assert describe_block(12, 8, 24) == "single_transformer_blocks.4"
    assert describe_block(7, 8, 24) == "transformer_blocks.7"
    text = format_plan(rows)
    assert "double_stream" in text and "train GiB" in text and len(text.splitlines()) == 6


def test_file_size_header_is_exact_and_diffusers_save_within_allowance(tmp_path):
    from diffusers import QwenImagePipeline
    from diffusers.training_utils import _collate_lora_metadata

    model = tiny("qwen_image_edit")
    names = target_modules_for(model, "qwen_image_edit", "full")
    shapes = lora_shapes(model, names)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=names))
    sd = {k: v.to(torch.bfloat16) for k, v in get_peft_model_state_dict(model).items()}

    synthetic = {}
    for name, i, o in shapes:
        synthetic[f"{name}.lora_A.weight"] = torch.zeros(4, i, dtype=torch.bfloat16)
        synthetic[f"{name}.lora_B.weight"] = torch.zeros(o, 4, dtype=torch.bfloat16)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in synthetic.items()}
    for rank in (1, 2, 3, 4, 5, 17):  # several ranks: the JSON length, so its padding, varies
        plain = tmp_path / f"plain{rank}.safetensors"
        tensors = {}
        for name, i, o in shapes:
            tensors[f"transformer.{name}.lora_A.weight"] = torch.zeros(
                rank, i, dtype=torch.bfloat16
            )
            tensors[f"transformer.{name}.lora_B.weight"] = torch.zeros(
                o, rank, dtype=torch.bfloat16
            )
        save_file(tensors, plain, metadata={"format": "pt"})
        header = safetensors_header_bytes(shapes, rank, 2, metadata={"format": "pt"})
        data = sum(t.numel() for t in tensors.values()) * 2
        assert os.path.getsize(plain) == data + header, rank

    QwenImagePipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=sd, **_collate_lora_metadata({"transformer": model})
    )
    actual = os.path.getsize(tmp_path / "pytorch_lora_weights.safetensors")
    predicted = plan(QWEN_TINY, "qwen_image_edit", ["full"], ranks=[4])[0]["lora_mb"] * 1e6
    assert actual <= predicted <= actual + adapter_metadata_allowance(names)


def test_custom_lists():
    assert target_modules("qwen_image_edit", ["to_q", "img_mlp.net.2"], 2) == [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.img_mlp.net.2",
        "transformer_blocks.1.attn.to_q",
        "transformer_blocks.1.img_mlp.net.2",
    ]
    assert target_modules("flux2_klein", ["linear_out"], 2, 3, blocks=[1, 4]) == [
        "transformer_blocks.1.ff.linear_out",
        "transformer_blocks.1.ff_context.linear_out",
    ]
    assert target_modules("flux2_klein", ["single_transformer_blocks.2.attn.to_out"], 2, 3) == [
        "single_transformer_blocks.2.attn.to_out"
    ]
    model = tiny("flux2_klein")
    names = target_modules_for(model, "flux2_klein", ["to_out.0", "to_qkv_mlp_proj"])
    assert len(names) == 2 + 3
    model.add_adapter(LoraConfig(r=2, target_modules=names))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "sdxl", "preset": "full", "num_layers": 2}, r"unknown model family 'sdxl'"),
        (
            {"family": "qwen_image_edit", "preset": "everything", "num_layers": 2},
            r"unknown LoRA preset 'everything'.*full, attention, image_stream",
        ),
        (
            {
                "family": "flux2_klein",
                "preset": "blocks",
                "num_layers": 8,
                "num_single_layers": 24,
                "blocks": [7, 32],
            },
            r"block index 32 is out of range: valid 0-31 \(8 double-stream \(0-7\) then 24 "
            r"single-stream \(8-31\) blocks\)",
        ),
        (
            {"family": "flux2_klein", "preset": "blocks", "num_layers": 8, "blocks": [-1]},
            r"block index -1 is out of range: valid 0-7",
        ),
        (
            {"family": "flux2_klein", "preset": "blocks", "num_layers": 8},
            r"preset 'blocks' needs blocks=",
        ),
        (
            {"family": "flux2_klein", "preset": "all_blocks", "num_layers": 8, "blocks": [1]},
            r"blocks= is not used by preset 'all_blocks'",
        ),
        (
            {"family": "qwen_image_edit", "preset": ["to_qkv"], "num_layers": 2},
            r"custom module name 'to_qkv' matches no LoRA-able Linear of qwen_image_edit",
        ),
        (
            {"family": "qwen_image_edit", "preset": ["to_out"], "num_layers": 2},
            r"matches no LoRA-able Linear.*did you mean 'attn.to_out.0'",
        ),
        (
            {
                "family": "flux2_klein",
                "preset": ["single_transformer_blocks.5.attn.to_out"],
                "num_layers": 2,
                "num_single_layers": 3,
            },
            r"single_transformer_blocks index 5 is out of range \(valid 0-2\)",
        ),
        (
            {"family": "flux2_klein", "preset": "single_stream", "num_layers": 2},
            r"preset 'single_stream' targets no module",
        ),
        ({"family": "flux2_klein", "preset": [], "num_layers": 2}, r"custom list .* is empty"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        target_modules(**kwargs)


def test_target_modules_for_checks_the_model():
    model = tiny("qwen_image_edit")
    with pytest.raises(ValueError, match=r"QwenImageTransformer2DModel .*not a Flux2"):
        target_modules_for(model, "flux2_klein", "all_blocks")
    del model.transformer_blocks[1]  # the config still says 2 layers
    with pytest.raises(ValueError, match=r"module 'transformer_blocks.1.attn.to_q' is not in"):
        target_modules_for(model, "qwen_image_edit", "full")
    model = tiny("qwen_image_edit")
    model.transformer_blocks[0].attn.to_k = nn.Identity()
    with pytest.raises(ValueError, match=r"'transformer_blocks.0.attn.to_k' is a Identity, not an"):
        target_modules_for(model, "qwen_image_edit", "attention")


def test_plan_validation():
    with pytest.raises(ValueError, match=r"config is for Flux2Transformer2DModel"):
        plan(KLEIN_9B_CONFIG, "qwen_image_edit")
    with pytest.raises(ValueError, match=r"rank 0 is not a positive integer"):
        plan(QWEN_TINY, "qwen_image_edit", ["full"], ranks=[0])
    with pytest.raises(
        ValueError, match=r"unknown LoRA preset 'double_stream' for qwen_image_edit"
    ):
        plan(QWEN_TINY, "qwen_image_edit", ["double_stream"])
