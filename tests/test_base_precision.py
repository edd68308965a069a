"""The frozen base in less memory: model.dtype bfloat16 and model.quantize (fp8 anywhere; nf4,
int8 and fp8 on a GPU when there is one)."""

import csv
import json
import math

import diffusers
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from facelora.models.adapters import load_adapter
from facelora.models.fp8 import (
    FP8_DTYPE,
    Float8Linear,
    dequantize_rows,
    quantize_rows,
    store_blocks_in_fp8,
)
from facelora.models.lora_io import DIFFUSERS_WEIGHTS
from facelora.models.plan import GIB, plan
from facelora.registry.families import FAMILIES as FAMILY_RECORDS
from facelora.train.checkpoint import list_checkpoints
from facelora.train.loop import Trainer

from helpers import FAMILIES, settings, write_pairs


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_row_scales_keep_small_weights_accurate():
    torch.manual_seed(0)
    # real transformer weights are small (std ~0.01-0.02): mostly subnormal in plain e4m3
    weight = torch.randn(256, 512) * 0.005
    stored, scale = quantize_rows(weight)
    assert stored.dtype == FP8_DTYPE and stored.element_size() == 1
    ours = relative_error(dequantize_rows(stored, scale, torch.float32), weight)
    plain = relative_error(weight.to(FP8_DTYPE).float(), weight)
    assert ours < 0.04  # e4m3: 3 mantissa bits
    assert plain > 3 * ours


def test_float8_linear_matches_and_backpropagates_to_its_input():
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    fp8 = Float8Linear(linear, torch.float32)
    assert isinstance(fp8, nn.Linear) and fp8.weight.dtype == FP8_DTYPE
    assert not fp8.weight.requires_grad and not fp8.bias.requires_grad

    x = torch.randn(5, 64, requires_grad=True)
    y = fp8(x)
    with torch.no_grad():
        assert relative_error(y, linear(x)) < 0.04
    y.square().sum().backward()
    # the gradient is exactly that of the dequantized weight
    x_ref = x.detach().clone().requires_grad_(True)
    nn.functional.linear(x_ref, fp8.dequantized_weight(), fp8.bias).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert fp8.weight.grad is None


def block_linears(transformer: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [
        (name, m)
        for name, m in transformer.named_modules()
        if isinstance(m, nn.Linear) and "blocks." in name and ".lora_" not in name
    ]


def train_tiny(tmp_path, tiny_models, family, name, **model):
    """3 steps on two pairs with `model` settings changed: (trainer, summary, out folder)."""
    data = tmp_path / "data"
    if not data.exists():
        write_pairs(data, n=2)
    params = settings(family, tiny_models[family], steps=3)
    for key, value in model.items():
        setattr(params.model, key, value)
    out = tmp_path / name
    trainer = Trainer("one", data, out, params, cache_dir=tmp_path / f"cache-{name}")
    return trainer, trainer.run(show_progress=False), out


def first_loss(out) -> float:
    with (out / "log.csv").open() as fh:
        return float(next(csv.DictReader(fh))["loss"])


@pytest.mark.parametrize("family", FAMILIES)
def test_training_on_a_float8_base(tmp_path, tiny_models, family):
    runs = {q: train_tiny(tmp_path, tiny_models, family, q, quantize=q) for q in ("none", "fp8")}

    plain, fp8 = runs["none"][0], runs["fp8"][0]
    bases = block_linears(fp8.module)
    assert bases and all(isinstance(m, Float8Linear) for _, m in bases)
    assert not any(isinstance(m, Float8Linear) for _, m in block_linears(plain.module))
    stored = sum(m.weight.numel() * m.weight.element_size() for _, m in bases)
    full = sum(m.weight.numel() * m.weight.element_size() for _, m in block_linears(plain.module))
    assert stored == full // 4  # float8 vs the tiny model's float32

    # the same LoRA is trained, in fp32, and the run starts from (nearly) the same loss
    assert runs["fp8"][1]["trainable_params"] == runs["none"][1]["trainable_params"]
    assert all(p.dtype == torch.float32 for p in fp8.trainable)
    assert abs(first_loss(runs["fp8"][2]) - first_loss(runs["none"][2])) < 0.05 * first_loss(
        runs["none"][2]
    )

    # its checkpoints are ordinary LoRAs: the full-precision pipeline loads them
    last = list_checkpoints(runs["fp8"][2])[-1][1]
    weights = load_file(last / "pytorch_lora_weights.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if ".lora_B." in k)
    fresh = load_adapter(family, tiny_models[family], "float32", torch.device("cpu"))
    fresh.pipe.load_lora_weights(str(last), weight_name="pytorch_lora_weights.safetensors")
    loaded = {n for n, _ in fresh.transformer.named_parameters() if "lora_" in n}
    assert len(loaded) == len(weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_counts_the_float8_weights_exactly(tiny_models, family):
    folder = tiny_models[family] / "transformer"
    cls = getattr(diffusers, FAMILY_RECORDS[family].transformer_class)
    transformer = cls.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True)
    assert store_blocks_in_fp8(transformer, torch.device("cpu"), torch.bfloat16) > 0
    stored = sum(p.numel() * p.element_size() for p in transformer.parameters())
    scales = [b for n, b in transformer.named_buffers() if n.endswith("weight_scale")]
    stored += sum(b.numel() * b.element_size() for b in scales)
    config = json.loads((folder / "config.json").read_text())
    rows = {
        q: plan(config, family, ranks=[4], quantize=q)[0]["weights_gib"] * GIB
        for q in ("none", "fp8")
    }
    assert rows["fp8"] == stored
    assert rows["fp8"] < rows["none"]


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes: CUDA only)"
)
@pytest.mark.parametrize("quantize", ["nf4", "int8", "fp8"])
def test_quantized_base_trains_on_a_gpu(tmp_path, tiny_models, quantize):
    trainer, summary, out = train_tiny(
        tmp_path,
        tiny_models,
        "qwen_image_edit",
        "out",
        quantize=quantize,
        device="cuda",
        dtype="bfloat16",
    )
    assert math.isfinite(summary["final_loss"])
    assert all(p.dtype == torch.float32 and p.is_cuda for p in trainer.trainable)
    for encoder in (trainer.adapter.pipe.vae, trainer.adapter.pipe.text_encoder):
        assert next(encoder.parameters()).device.type == "cpu"  # set aside once cached
    weights = load_file(list_checkpoints(out)[-1][1] / DIFFUSERS_WEIGHTS)
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if ".lora_B." in k)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bf16_base_trains_an_fp32_lora(tmp_path, tiny_models, family):
    """What GPUs run (model.dtype bfloat16), here on the CPU: the base computes in bf16, the
    LoRA, its gradients and optimizer state stay fp32, and the loss matches fp32 closely."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        trainer, summary, out = train_tiny(tmp_path, tiny_models, family, dtype, dtype=dtype)
        assert math.isfinite(summary["final_loss"])
        losses[dtype] = first_loss(out)
    frozen = {p.dtype for n, p in trainer.module.named_parameters() if "lora_" not in n}
    assert frozen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.trainable)
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)
    weights = load_file(list_checkpoints(tmp_path / "bfloat16")[-1][1] / DIFFUSERS_WEIGHTS)
    assert all(v.dtype == torch.float32 for v in weights.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_samples_on_the_float8_base_it_trained_on(tmp_path, tiny_models, family):
    """Evaluation loads the base as training stored it (model.quantize): the saved LoRA goes
    onto the float8 layers and samples close to the full-precision base with the same LoRA."""
    from PIL import Image

    from facelora.models.inference import apply_lora, generate, load_pipeline

    _, _, out = train_tiny(tmp_path, tiny_models, family, "fp8", quantize="fp8")
    lora = list_checkpoints(out)[-1][1] / DIFFUSERS_WEIGHTS
    start = Image.open(next((tmp_path / "data").glob("*_start.png")))
    latents = {}
    for quantize in ("none", "fp8"):
        pipe = load_pipeline(family, tiny_models[family], "float32", "cpu", quantize)
        assert any(isinstance(m, Float8Linear) for m in pipe.transformer.modules()) == (
            quantize == "fp8"
        )
        for scale in (0.0, 1.0):
            apply_lora(pipe, lora, scale=scale)
            latents[quantize, scale] = generate(
                pipe, start, [], "EDITFACE paint a yellow square", width=64, height=64,
                steps=4, seed=0, output_type="latent",
            )  # fmt: skip
    # the LoRA moves the samples the same way on either base
    moved = {q: latents[q, 1.0] - latents[q, 0.0] for q in ("none", "fp8")}
    assert float(moved["fp8"].abs().max()) > 0
    assert relative_error(moved["fp8"], moved["none"]) < 0.2
    assert relative_error(latents["fp8", 1.0], latents["none", 1.0]) < 0.05
