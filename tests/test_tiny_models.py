"""Tiny offline pipelines (facelora.models.tiny): built deterministically in the real repository
layout, loaded by the real diffusers pipeline classes with the network cut, and run end to end.

Training and evaluation tests build on these models, so every property they rely on (offline
loading, the Qwen 64-token prefix, zero_cond_t, Klein's base-model flag and default text layers,
reproducible outputs) is checked here once.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facelora.models import tiny
from facelora.models.tiny import MARKER, make_tiny_model, small_reference_sizes
from facelora.registry.families import FAMILY_NAMES as FAMILIES

COMPONENTS = {
    "qwen_image_edit": (
        "processor",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "transformer",
        "vae",
    ),
    "flux2_klein": ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"),
}
PIPELINES = {"qwen_image_edit": "QwenImageEditPlusPipeline", "flux2_klein": "Flux2KleinPipeline"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Each family built once (seed 0) for the read-only tests."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture
def offline(monkeypatch) -> None:
    """No network: HF offline mode, and any socket connection attempt fails loudly."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _reference(side: int = 64) -> Image.Image:
    pixels = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _load(family: str, path: Path):
    import diffusers

    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(family: str, pipe, seed: int) -> np.ndarray:
    """Two steps at 64x64 with one reference image; returns the (1, 64, 64, 3) array."""
    common = {
        "image": _reference(),
        "prompt": "open the eyes wider",
        "height": 64,
        "width": 64,
        "num_inference_steps": 2,
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "np",
    }
    if family == "qwen_image_edit":
        with small_reference_sizes():
            return pipe(**common, negative_prompt=" ", true_cfg_scale=4.0).images
    return pipe(**common, guidance_scale=4.0).images


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_and_marker(built, family):
    out = built[family]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family]
    assert sorted(k for k in index if not k.startswith("_") and k != "is_distilled") == sorted(
        COMPONENTS[family]
    )
    for component in COMPONENTS[family]:
        assert (out / component).is_dir(), component
    for component in ("transformer", "vae"):
        assert (out / component / "diffusion_pytorch_model.safetensors").is_file()
        assert (out / component / "config.json").is_file()
    assert (out / "text_encoder" / "model.safetensors").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    assert tiny.read_marker(out) == {
        "family": family,
        "seed": 0,
        "random_weights": True,
        "note": "facelora tiny test model: random weights, NOT a real model",
        "pipeline": PIPELINES[family],
    }
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size < 5_000_000, size


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in {".safetensors", ".json", ".jinja"}
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, family):
    a = _files(make_tiny_model(family, tmp_path / "a", seed=0))
    b = _files(make_tiny_model(family, tmp_path / "b", seed=0))
    c = _files(make_tiny_model(family, tmp_path / "c", seed=1))
    assert any(name.endswith(".safetensors") for name in a)
    assert a.keys() == b.keys() == c.keys()
    assert a == b
    weights = [name for name in a if name.endswith(".safetensors")]
    assert len(weights) == 3  # text encoder, transformer, vae
    for name in weights:
        assert a[name] != c[name], name
    assert json.loads(c[MARKER])["seed"] == 1


def test_building_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model("flux2_klein", tmp_path / "k")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_pipeline_loads_offline_and_runs(built, offline, family):
    pipe = _load(family, built[family])
    assert type(pipe).__name__ == PIPELINES[family]
    first = _run(family, pipe, seed=0)
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert first.std() > 1e-3  # a real image, not a constant
    again = _run(family, pipe, seed=0)
    np.testing.assert_array_equal(first, again)
    other = _run(family, pipe, seed=1)
    assert not np.array_equal(first, other)


def test_real_classes(built, offline):
    from diffusers import (
        AutoencoderKLFlux2,
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
        Qwen2VLProcessor,
        Qwen3ForCausalLM,
    )

    qwen = _load("qwen_image_edit", built["qwen_image_edit"])
    assert isinstance(qwen.transformer, QwenImageTransformer2DModel)
    assert isinstance(qwen.vae, AutoencoderKLQwenImage)
    assert isinstance(qwen.text_encoder, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(qwen.tokenizer, Qwen2Tokenizer)
    assert isinstance(qwen.processor, Qwen2VLProcessor)
    assert qwen.processor.image_processor is not None
    assert qwen.processor.video_processor is not None
    assert isinstance(qwen.scheduler, FlowMatchEulerDiscreteScheduler)
    assert qwen.scheduler.config.shift_terminal == 0.02
    assert qwen.scheduler.config.max_image_seq_len == 8192

    klein = _load("flux2_klein", built["flux2_klein"])
    assert isinstance(klein.transformer, Flux2Transformer2DModel)
    assert isinstance(klein.vae, AutoencoderKLFlux2)
    assert isinstance(klein.text_encoder, Qwen3ForCausalLM)
    assert isinstance(klein.tokenizer, Qwen2Tokenizer)
    assert isinstance(klein.scheduler, FlowMatchEulerDiscreteScheduler)


def test_qwen_config_zero_cond_t_and_shapes(built):
    out = built["qwen_image_edit"]
    transformer = json.loads((out / "transformer" / "config.json").read_text())
    assert transformer["zero_cond_t"] is True
    assert 2 <= transformer["num_layers"] <= 4
    vae = json.loads((out / "vae" / "config.json").read_text())
    # 16 latent channels packed 2x2 into the transformer's 64 inputs, 8x spatial downsampling
    assert transformer["in_channels"] == 4 * vae["z_dim"] == 64
    assert 2 ** len(vae["temperal_downsample"]) == 8
    text = json.loads((out / "text_encoder" / "config.json").read_text())
    assert transformer["joint_attention_dim"] == text["text_config"]["hidden_size"]


def test_klein_base_model_index_and_layers(built):
    out = built["flux2_klein"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["is_distilled"] is False
    transformer = json.loads((out / "transformer" / "config.json").read_text())
    assert transformer["num_layers"] >= 2 and transformer["num_single_layers"] >= 2
    assert transformer["in_channels"] == 128
    text = json.loads((out / "text_encoder" / "config.json").read_text())
    # The pipeline's default text_encoder_out_layers=(9, 18, 27) must be intermediate layers.
    assert text["num_hidden_layers"] > 27
    assert transformer["joint_attention_dim"] == 3 * text["hidden_size"]
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert vae["latent_channels"] * 4 == transformer["in_channels"]


def test_qwen_system_prefix_is_exactly_the_dropped_tokens(built, offline):
    pipe = _load("qwen_image_edit", built["qwen_image_edit"])
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    assert drop == 64
    prefix = template.split("{}")[0]
    for tokenizer in (pipe.tokenizer, pipe.processor.tokenizer):
        assert len(tokenizer(prefix)["input_ids"]) == 64
        # What the pipeline keeps after dropping 64 tokens starts exactly at the user text.
        ids = tokenizer(template.format("Picture 1: open the eyes wider"))["input_ids"]
        kept = tokenizer.decode(ids[drop:])
        assert kept.startswith("Picture 1: open the eyes wider<|im_end|>"), kept


def test_build_refuses_a_wrong_prefix(tmp_path, monkeypatch):
    template, drop = tiny.qwen_prompt_template()
    monkeypatch.setattr(tiny, "qwen_prompt_template", lambda: (template, drop + 1))
    with pytest.raises(RuntimeError, match="system prefix 64 tokens"):
        make_tiny_model("qwen_image_edit", tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_klein_chat_template_matches_qwen3(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built["flux2_klein"] / "tokenizer")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a face"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert (
        text == "<|im_start|>user\na face<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<think>") in ids


def test_small_reference_sizes_restores_constants():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    def sizes() -> tuple[int, int]:
        return module.VAE_IMAGE_SIZE, module.CONDITION_IMAGE_SIZE

    before = sizes()
    assert before == (1024 * 1024, 384 * 384)
    with small_reference_sizes(96, 64):
        assert sizes() == (96 * 96, 64 * 64)
    assert sizes() == before
    with pytest.raises(KeyError), small_reference_sizes():
        raise KeyError("boom")
    assert sizes() == before
    with pytest.raises(ValueError, match="multiple of 32"), small_reference_sizes(vae_side=48):
        pass
    assert sizes() == before


def test_output_folder_rules(tmp_path):
    with pytest.raises(ValueError, match="family"):
        make_tiny_model("flux1", tmp_path / "x")
    real = tmp_path / "real"
    real.mkdir()
    (real / "model_index.json").write_text("{}")
    with pytest.raises(FileExistsError):
        make_tiny_model("flux2_klein", real)
    assert (real / "model_index.json").read_text() == "{}"
    # An earlier tiny build is replaced as a whole (no stale component folders remain).
    out = make_tiny_model("qwen_image_edit", tmp_path / "t")
    assert (out / "processor").is_dir()
    make_tiny_model("flux2_klein", out, seed=3)
    assert not (out / "processor").exists()
    assert tiny.read_marker(out)["family"] == "flux2_klein"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("family", FAMILIES)
def test_real_width_stand_in_has_the_released_blocks(family):
    """The benchmark's stand-in: blocks parameter-for-parameter as in the released model."""
    from facelora.models.plan import meta_model
    from facelora.models.real_configs import REAL_CONFIGS, full_depth, real_width_transformer

    args = real_width_transformer(family, 2)
    config = {**REAL_CONFIGS[family], **args, "joint_attention_dim": 48}
    stand_in, released = meta_model(config, family), meta_model(REAL_CONFIGS[family], family)
    for stack in ("transformer_blocks", "single_transformer_blocks"):
        if not hasattr(released, stack):
            continue
        ours, theirs = getattr(stand_in, stack), getattr(released, stack)
        assert 0 < len(ours) < len(theirs)
        assert {n: p.shape for n, p in ours[0].named_parameters()} == {
            n: p.shape for n, p in theirs[0].named_parameters()
        }
    assert full_depth(family) == len(released.transformer_blocks) + len(
        getattr(released, "single_transformer_blocks", [])
    )
    with pytest.raises(ValueError, match="blocks must be"):
        real_width_transformer(family, 0)


def test_transformer_args_change_only_the_transformer(tmp_path):
    out = make_tiny_model("qwen_image_edit", tmp_path / "q", transformer_args={"num_layers": 1})
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["num_layers"] == 1 and config["zero_cond_t"] is True
    assert json.loads((out / MARKER).read_text())["transformer_args"] == {"num_layers": 1}
