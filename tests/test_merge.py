"""LoRA merging: exactness of the rank concatenation, SVD compression, the saved files as the
pipeline loads them, fusing into the base, and refusal of LoRAs for different base models."""

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, QwenImageEditPlusPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from facelora.config import validate_params
from facelora.io.safetensors_io import write
from facelora.models import lora_io
from facelora.models.adapters import load_adapter
from facelora.models.lora_targets import target_modules_for
from facelora.models.tiny import make_tiny_model
from facelora.release import merge
from facelora.train.checkpoint import list_checkpoints
from facelora.train.loop import Trainer

from helpers import write_pairs

FAMILY = "qwen_image_edit"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory) -> Path:
    return make_tiny_model(FAMILY, tmp_path_factory.mktemp("models") / FAMILY)


@pytest.fixture(scope="module")
def transformer(qwen_model):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(qwen_model, subfolder="transformer")


def random_state(model, family, preset, rank: int, seed: int, widen: dict | None = None):
    """Random A/B for the preset's modules (module-keyed); `widen` changes some in_features."""
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in target_modules_for(model, family, preset):
        fan_in = (widen or {}).get(name, modules[name].in_features)
        state[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.2
        state[f"{name}.lora_B.weight"] = torch.randn(modules[name].out_features, rank, generator=g)
    return state


def deltas(state: dict, scale: dict | float) -> dict[str, torch.Tensor]:
    """ΔW per module of a module-keyed state, computed independently of facelora.release.merge."""
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            s = scale if isinstance(scale, float) else scale.get(name, scale["*"])
            out[name] = s * (state[f"{name}.lora_B.weight"].double() @ a.double())
    return out


@pytest.fixture(scope="module")
def loras(tmp_path_factory, transformer):
    """Three LoRAs of different ranks, alphas, target sets and layouts, with their ΔW."""
    root = tmp_path_factory.mktemp("loras")
    one = random_state(transformer, FAMILY, "full", rank=4, seed=1)
    names = sorted({k.rsplit(".lora_", 1)[0] for k in one})
    (root / "one").mkdir()
    lora_io.save_diffusers(
        root / "one",
        QwenImageEditPlusPipeline,
        one,
        {"r": 4, "lora_alpha": 8.0, "target_modules": names},
    )
    two = random_state(transformer, FAMILY, "image_stream", rank=2, seed=2)
    (root / "two").mkdir()
    lora_io.save_comfyui(root / "two", two, alpha=1.0, family=FAMILY)
    custom = ["transformer_blocks.0.img_mod.1", "transformer_blocks.1.attn.to_q"]
    three = random_state(transformer, FAMILY, custom, rank=3, seed=3)
    (root / "three").mkdir()
    lora_io.save_diffusers(
        root / "three",
        QwenImageEditPlusPipeline,
        three,
        {
            "r": 3,
            "lora_alpha": 3.0,
            "alpha_pattern": {"transformer_blocks.0.img_mod.1": 6.0},
            "target_modules": custom,
        },
    )
    return {
        "paths": [
            root / "one" / lora_io.DIFFUSERS_WEIGHTS,
            root / "two" / lora_io.COMFYUI_WEIGHTS,
            root / "three" / lora_io.DIFFUSERS_WEIGHTS,
        ],
        "deltas": [
            deltas(one, 2.0),
            deltas(two, 0.5),
            deltas(three, {"transformer_blocks.0.img_mod.1": 2.0, "*": 1.0}),
        ],
    }


def weighted_sum(parts: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for part, w in zip(parts, weights, strict=True):
        for name, d in part.items():
            total[name] = total.get(name, 0) + w * d
    return total


def max_error(merged: merge.MergedLora, expected: dict) -> float:
    assert merged.modules.keys() == expected.keys()
    return max(float((merged.delta(n) - expected[n]).abs().max()) for n in expected)


# --- merging -------------------------------------------------------------------------------


def test_merge_is_exact_across_ranks_alphas_targets_and_layouts(loras):
    paths, parts = loras["paths"], loras["deltas"]
    merged = merge.merge_loras([(paths[0], 2), (paths[1], 1), (paths[2], 1)])
    assert merged.report["weights"] == [0.5, 0.25, 0.25]
    assert max_error(merged, weighted_sum(parts, [0.5, 0.25, 0.25])) < 1e-5
    ranks = merged.ranks()
    assert ranks["transformer_blocks.1.attn.to_q"] == 4 + 2 + 3  # in all three
    assert ranks["transformer_blocks.0.attn.to_q"] == 4 + 2
    assert ranks["transformer_blocks.0.attn.add_q_proj"] == 4  # only in the first
    assert ranks["transformer_blocks.0.img_mod.1"] == 3  # only in the third
    assert merged.family == FAMILY  # from the module names (img_mlp, img_mod: Qwen only)
    assert [i["layout"] for i in merged.report["inputs"]] == ["diffusers", "comfyui", "diffusers"]

    pair = merge.merge_loras([(paths[0], 2), (paths[1], 1)])
    assert pair.report["weights"] == pytest.approx([2 / 3, 1 / 3])
    assert max_error(pair, weighted_sum(parts[:2], [2 / 3, 1 / 3])) < 1e-5

    raw = merge.merge_loras([(paths[0], 2), (paths[1], 1), (paths[2], 1)], normalize=False)
    assert raw.report["weights"] == [2.0, 1.0, 1.0]
    assert max_error(raw, weighted_sum(parts, [2.0, 1.0, 1.0])) < 1e-5
    with pytest.raises(ValueError, match="cannot normalise"):
        merge.merge_loras([(paths[0], 1), (paths[1], -1)])


def test_svd_compression_reports_its_true_error(loras):
    paths, parts = loras["paths"], loras["deltas"]
    merged = merge.merge_loras([(p, 1) for p in paths])
    exact = weighted_sum(parts, [1 / 3] * 3)
    overall = []
    for rank in (1, 2, 4, 6, 9, 16):
        small, report = merge.compress(merged, rank)
        assert max(small.ranks().values()) <= rank
        tails = norms = 0.0
        for name, info in report["modules"].items():
            residual = float(torch.linalg.matrix_norm(exact[name] - small.delta(name)))
            norm = float(torch.linalg.matrix_norm(exact[name]))
            assert info["relative_error"] == pytest.approx(residual / norm, abs=1e-5)
            assert info["energy_kept"] == pytest.approx(1 - (residual / norm) ** 2, abs=1e-5)
            if info["rank_before"] <= rank:  # already small enough: kept exactly
                assert info["relative_error"] == 0.0 and torch.equal(
                    small.modules[name][0], merged.modules[name][0]
                )
            tails, norms = tails + residual**2, norms + norm**2
        assert report["overall"]["relative_error"] == pytest.approx(
            math.sqrt(tails / norms), abs=1e-5
        )
        assert small.report["svd"] == report
        overall.append(report["overall"]["relative_error"])
    assert overall[0] > overall[1] > overall[2] > overall[3] > 0
    assert overall[4] == overall[5] == 0.0  # 9 = the largest total rank: nothing cut
    assert max_error(merge.compress(merged, 9)[0], exact) < 1e-5


# --- files ---------------------------------------------------------------------------------


def test_pipeline_loads_the_merged_file_exactly_and_fusing_matches(tmp_path, loras, qwen_model):
    merged = merge.merge_loras([(p, w) for p, w in zip(loras["paths"], (2, 1, 1), strict=True)])
    folder = tmp_path / "merged"
    paths = merge.save_merged(merged, folder, QwenImageEditPlusPipeline)
    assert len(set(merged.ranks().values())) > 1  # per-module ranks need rank/alpha patterns
    with safe_open(str(paths["diffusers"]), "pt") as f:
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert header["transformer.rank_pattern"] == header["transformer.alpha_pattern"]
    assert header["transformer.rank_pattern"]["^transformer_blocks.1.attn.to_q"] == 9

    g = torch.Generator().manual_seed(0)
    x, control = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    text, sigma = [torch.randn(5, 32, generator=g)], torch.tensor([0.6])

    def output(adapter):
        with torch.no_grad():
            return adapter.predict(x, [control], text, sigma)

    loaded = load_adapter(FAMILY, qwen_model, "float32", CPU)
    loaded.pipe.load_lora_weights(str(folder), weight_name=lora_io.DIFFUSERS_WEIGHTS)
    layers = {
        n: m for n, m in loaded.transformer.named_modules() if hasattr(m, "lora_A") and m.lora_A
    }
    assert layers.keys() == merged.modules.keys()
    for name, layer in layers.items():
        (adapter_name,) = layer.lora_A.keys()
        assert layer.r[adapter_name] == merged.ranks()[name]
        assert layer.scaling[adapter_name] == 1.0
    with_lora = output(loaded)

    manual = load_adapter(FAMILY, qwen_model, "float32", CPU)
    base = output(manual)
    modules = dict(manual.transformer.named_modules())
    with torch.no_grad():
        for name in merged.modules:
            modules[name].weight += merged.delta(name).float()
    assert torch.allclose(with_lora, output(manual), atol=1e-5)
    assert not torch.allclose(with_lora, base, atol=1e-3)  # the LoRA does change the output

    fused = load_adapter(FAMILY, qwen_model, "float32", CPU)
    assert merge.fuse_into_base(fused.transformer, folder) == len(merged.modules)
    assert torch.allclose(output(fused), with_lora, atol=1e-5)

    # `facelora merge --fuse-into`: the saved transformer loads as the pipeline's and matches
    report = merge.merge_main(
        [f"{p}:{w}" for p, w in zip(loras["paths"], (2, 1, 1), strict=True)],
        tmp_path / "deploy",
        family=FAMILY,
        fuse_into=qwen_model,
    )
    saved = Path(report["written"]["fused_transformer"])
    deployed = load_adapter(FAMILY, qwen_model, "float32", CPU)
    deployed.pipe.transformer = deployed.transformer = type(deployed.transformer).from_pretrained(
        saved
    )
    assert torch.allclose(output(deployed), with_lora, atol=1e-5)

    # an unmerged file (alpha 8, rank 4): the same scale as the pipeline gives it
    single = load_adapter(FAMILY, qwen_model, "float32", CPU)
    single.pipe.load_lora_weights(str(loras["paths"][0].parent))
    fused_single = load_adapter(FAMILY, qwen_model, "float32", CPU)
    merge.fuse_into_base(fused_single.transformer, loras["paths"][0], scale=1.0)
    assert torch.allclose(output(fused_single), output(single), atol=1e-5)


def test_comfyui_file_carries_the_same_delta_and_files_are_reproducible(tmp_path, loras):
    merged = merge.merge_loras([(p, 1) for p in loras["paths"]])
    merged, _ = merge.compress(merged, 5)  # ranks 4 and 5 both occur
    a = merge.save_merged(merged, tmp_path / "a", QwenImageEditPlusPipeline)
    b = merge.save_merged(merged, tmp_path / "b", QwenImageEditPlusPipeline)
    for kind in ("diffusers", "comfyui"):
        assert a[kind].read_bytes() == b[kind].read_bytes()
        back = merge.read_input(a[kind])
        assert back.layout == kind and back.declared_family == FAMILY
        assert all(s == 1.0 for _, _, s in back.modules.values())
        assert max(float((back.delta(n) - merged.delta(n)).abs().max()) for n in merged.modules) < (
            1e-6
        )
    raw = load_file(a["comfyui"])
    alphas = {
        k.removeprefix("diffusion_model.").removesuffix(".alpha"): float(v)
        for k, v in raw.items()
        if k.endswith(".alpha")
    }
    assert alphas == {n: float(r) for n, r in merged.ranks().items()}
    report = json.loads(a["report"].read_text())
    assert report["weights"] == pytest.approx([1 / 3] * 3) and report["svd"]["rank"] == 5
    assert report["ranks"] == merged.ranks()


# --- refusals ------------------------------------------------------------------------------


def klein_transformer():
    """A Klein-shaped transformer (same widths as the tiny Qwen one: names tell them apart)."""
    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
    )


def test_loras_for_different_base_models_are_refused(tmp_path, loras, transformer):
    qwen = loras["paths"][0]
    klein = random_state(klein_transformer(), "flux2_klein", "all_blocks", rank=4, seed=5)
    (tmp_path / "klein").mkdir()
    lora_io.save_diffusers(tmp_path / "klein", Flux2KleinPipeline, klein, {"r": 4})
    with pytest.raises(lora_io.LoraMismatch, match="different base model"):
        merge.merge_loras([(qwen, 1), (tmp_path / "klein", 1)])
    with pytest.raises(lora_io.LoraMismatch, match="flux2_klein"):
        merge.merge_loras([(qwen, 1)], family="flux2_klein")
    with pytest.raises(lora_io.LoraMismatch, match="this transformer is qwen_image_edit"):
        merge.fuse_into_base(transformer, tmp_path / "klein")

    # the same module names with other widths: another size of the same family
    wide = random_state(
        transformer, FAMILY, "full", 4, seed=6, widen={"transformer_blocks.0.img_mlp.net.2": 160}
    )
    write(tmp_path / "wide.safetensors", {f"transformer.{k}": v for k, v in wide.items()})
    with pytest.raises(lora_io.LoraMismatch, match=r"128 -> 32 layer .* but 160 -> 32"):
        merge.merge_loras([(qwen, 1), (tmp_path / "wide.safetensors", 1)])
    with pytest.raises(lora_io.LoraMismatch, match="160 -> 32 in the LoRA but 128 -> 32"):
        merge.fuse_into_base(transformer, tmp_path / "wide.safetensors")
    hidden = random_state(
        transformer, FAMILY, ["attn.to_q"], 2, seed=7, widen={"transformer_blocks.2.attn.to_q": 48}
    )
    hidden = {k: v for k, v in hidden.items() if "blocks.2." in k}
    write(tmp_path / "hidden.safetensors", hidden)  # no module in common with `qwen`'s to_q
    one_block = random_state(transformer, FAMILY, ["attn.to_q"], 2, seed=8)
    write(tmp_path / "block0.safetensors", {k: v for k, v in one_block.items() if ".0." in k})
    with pytest.raises(lora_io.LoraMismatch, match="attention input sizes"):
        merge.merge_loras(
            [(tmp_path / "block0.safetensors", 1), (tmp_path / "hidden.safetensors", 1)]
        )

    # attention-only LoRAs look alike in both families: the checkpoint's meta.json tells
    (tmp_path / "ckpt").mkdir()
    attention = {k: v for k, v in klein.items() if ".attn.to_q." in k and "single" not in k}
    write(tmp_path / "ckpt" / lora_io.DIFFUSERS_WEIGHTS, attention)
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps({"family": "flux2_klein"}))
    with pytest.raises(lora_io.LoraMismatch, match="different base model"):
        merge.merge_loras([(qwen, 1), (tmp_path / "ckpt", 1)])


# --- real training files, command line -----------------------------------------------------


def test_trained_checkpoints_merge_and_the_command_writes_both_layouts(tmp_path, loras, qwen_model):
    params = validate_params(
        {
            "seed": 3,
            "lr": 1e-3,
            "model": {"family": FAMILY, "path": str(qwen_model)},
            "lora": {"rank": 4, "preset": "attention"},
            "train": {"resolution": 64, "save_every": 3},
            "phases": [{"name": "one", "steps": 1}],
        }
    )
    out = tmp_path / "out"
    Trainer("one", write_pairs(tmp_path / "data", n=2), out, params, cache_dir=tmp_path / "c").run(
        show_progress=False
    )
    checkpoint = list_checkpoints(out)[-1][1]
    trained, meta = lora_io.read_lora(checkpoint / lora_io.DIFFUSERS_WEIGHTS)
    scale = meta["lora_alpha"] / meta["r"]
    trained_delta = deltas(trained, float(scale))
    assert any(float(d.abs().max()) > 0 for d in trained_delta.values())

    # the same LoRA in its two layouts, 1:1, is that LoRA
    both = merge.merge_loras(
        [(checkpoint, 1), (checkpoint / lora_io.COMFYUI_WEIGHTS, 1)], family=FAMILY
    )
    assert both.family == FAMILY and max_error(both, trained_delta) < 1e-6
    assert {i["family"] for i in both.report["inputs"]} == {FAMILY}  # from meta.json

    report = merge.merge_main([f"{checkpoint}:3", str(loras["paths"][1])], tmp_path / "m", None)
    assert report["weights"] == [0.75, 0.25] and report["family"] == FAMILY
    back = merge.merge_loras([(tmp_path / "m" / lora_io.COMFYUI_WEIGHTS, 1)])
    assert max_error(back, weighted_sum([trained_delta, loras["deltas"][1]], [0.75, 0.25])) < 1e-5

    small = merge.merge_main([str(checkpoint), str(loras["paths"][0])], tmp_path / "s", rank=2)
    assert set(small["ranks"].values()) == {2} and small["svd"]["overall"]["relative_error"] > 0
    assert (tmp_path / "s" / lora_io.DIFFUSERS_WEIGHTS).is_file()
    assert json.loads((tmp_path / "s" / merge.REPORT_NAME).read_text())["svd"]["rank"] == 2


def test_input_weights_parse():
    assert merge.parse_input("a/b.safetensors:0.5") == (Path("a/b.safetensors"), 0.5)
    assert merge.parse_input("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert merge.parse_input("odd:name") == (Path("odd:name"), 1.0)
