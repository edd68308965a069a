"""eval.lora_scales: every checkpoint scored at several LoRA strengths with one pipeline load,
the choice of (checkpoint, strength), and the strength in the final LoRA's records."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_evaluate import portrait_pairs

import facelora.models.inference as inference
from facelora.config import ParamsError, validate_params
from facelora.evaluate import report
from facelora.evaluate.run import COLUMNS, evaluate_group
from facelora.models.tiny import make_tiny_model
from facelora.registry.layout import Layout
from facelora.release.final import build_final
from facelora.train.loop import train_phase

SCALES = [0.0, 0.5, 1.0, 1.5]


@pytest.fixture(scope="module")
def phase_one(tmp_path_factory, astronaut_portrait):
    """A tiny Qwen model with phase `one` trained (checkpoints 2 and 4) and validation pairs.
    The learning rate is high so that the LoRA visibly changes the images."""
    root = tmp_path_factory.mktemp("scales")
    model = make_tiny_model("qwen_image_edit", root / "model")
    data = portrait_pairs(root / "data", astronaut_portrait)
    validation = portrait_pairs(root / "validation", astronaut_portrait)
    params = validate_params(
        {
            "seed": 1,
            "lr": 2e-2,
            "model": {"family": "qwen_image_edit", "path": str(model)},
            "lora": {"rank": 4},
            "train": {"resolution": 64, "save_every": 2},
            "eval": {"resolution": 64, "steps": 2, "guidance": None, "checkpoints_per_job": 2},
            "phases": [{"name": "one", "steps": 4}],
        }
    )
    train_phase(
        "one", data, root / "train" / "one", params, cache_dir=root / "cache", show_progress=False
    )
    return root, params, validation


def _with_scales(params, scales, **final):
    update = {"eval": params.eval.model_copy(update={"lora_scales": scales})}
    if final:
        update["final"] = params.final.model_copy(update=final)
    return params.model_copy(update=update)


def _pixels(folder: Path, image: str) -> np.ndarray:
    with Image.open(folder / image) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_every_scale_is_scored_with_one_pipeline_load(phase_one, tmp_path, monkeypatch):
    root, params, validation = phase_one
    calls = {"load_pipeline": 0, "apply_lora": 0}
    for name in calls:
        real = getattr(inference, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(inference, name, counted)
    many = _with_scales(params, SCALES)
    out = tmp_path / "many"
    rows = evaluate_group(many, "one", [2, 4], validation, root / "train" / "one", out)
    # one pipeline for the job, one LoRA load per checkpoint, re-weighted per strength
    assert calls == {"load_pipeline": 1, "apply_lora": 2}
    keys = set(zip(rows["step"], rows["scale"], rows["pair_id"], strict=True))
    pairs = sorted(set(rows["pair_id"]))
    assert len(pairs) == 2
    assert keys == {(s, c, p) for s in (2, 4) for c in SCALES for p in pairs}
    assert len(rows) == len(keys) == 16 and list(rows.columns) == COLUMNS
    assert rows["image"].is_unique  # each strength's images in their own folder

    def image(step, scale, pair=pairs[0]):
        hit = rows[(rows["step"] == step) & (rows["scale"] == scale) & (rows["pair_id"] == pair)]
        return _pixels(out, hit.iloc[0]["image"])

    # strength 0 is the model alone; other strengths change the image
    base_out = tmp_path / "base"
    base = evaluate_group(params, "base", [], validation, None, base_out)
    assert set(base["scale"]) == {0.0}
    for pair in pairs:
        hit = base[base["pair_id"] == pair].iloc[0]
        assert np.array_equal(_pixels(base_out, hit["image"]), image(4, 0.0, pair))
    assert np.abs(image(4, 0.5) - image(4, 1.5)).max() > 0
    assert np.abs(image(4, 1.0) - image(4, 1.5)).max() > 0

    # strength 1 among several gives exactly what evaluating at lora_scale 1 alone gives
    single_out = tmp_path / "single"
    single = evaluate_group(params, "one", [2, 4], validation, root / "train" / "one", single_out)
    assert set(single["scale"]) == {1.0}
    at_one = rows[rows["scale"] == 1.0].reset_index(drop=True)
    metrics = ["identity_sim", "lpips", "bg_ssim", "clip_score"]
    assert np.isfinite(single["bg_ssim"]).all()  # something real to compare
    np.testing.assert_array_equal(at_one[metrics].to_numpy(float), single[metrics].to_numpy(float))
    for a, b in zip(at_one["image"], single["image"], strict=True):
        assert np.array_equal(_pixels(out, a), _pixels(single_out, b))


def test_lora_scales_contradicting_lora_scale_are_refused():
    with pytest.raises(ParamsError, match="lora_scale 1.0 is not in eval.lora_scales"):
        validate_params({"eval": {"lora_scales": [1.5, 2.0]}})
    with pytest.raises(ParamsError, match="listed twice"):
        validate_params({"eval": {"lora_scales": [1.0, 1.0]}})
    with pytest.raises(ParamsError, match="eval.lora_scales"):
        validate_params({"eval": {"lora_scales": [1.0, -0.5]}})
    assert validate_params({}).eval.scales == [1.0]
    assert validate_params({"eval": {"lora_scale": 1.2}}).eval.scales == [1.2]
    assert validate_params({"eval": {"lora_scales": [1.5, 1.0]}}).eval.scales == [1.0, 1.5]


# identity only: (step, strength) -> identity_sim of both pairs. The best is step 2 at 1.5;
# at strength 1 alone step 4 wins, and the mean over strengths also picks step 2 (no strength).
TABLE = {
    (2, 1.0): 0.90,
    (2, 1.5): 0.95,
    (4, 1.0): 0.92,
    (4, 1.5): 0.80,  # below the identity constraint
}


def _write_tables(layout: Layout, params) -> None:
    """The base rows and phase one's rows (one evaluation job) as evaluation writes them."""

    def rows(phase, step, scale, identity):
        return [
            {
                **dict.fromkeys(COLUMNS),
                "phase": phase,
                "step": step,
                "scale": scale,
                "pair_id": pair,
                "status": "ok",
                "identity_sim": identity,
                "lpips": 0.3,
                "bg_ssim": 0.9,
                "clip_score": np.nan,
            }
            for pair in ("v0000", "v0001")
        ]

    base = pd.DataFrame(rows("base", 0, 0.0, 0.99), columns=COLUMNS)
    Path(layout.base_metrics()).parent.mkdir(parents=True, exist_ok=True)
    base.to_csv(layout.base_metrics(), index=False)
    phase = [r for (step, scale), v in TABLE.items() for r in rows("one", step, scale, v)]
    (group,) = report.group_tables(layout, params, "one")
    group.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(phase, columns=COLUMNS).to_csv(group, index=False)


def _choice_params(params):
    objective = {"constraints": {"identity_sim": {"min": 0.85}}, "weights": {"identity_sim": 1.0}}
    raw = {**params.model_dump(mode="json"), "objective": objective}
    raw["eval"]["lora_scales"] = [1.0, 1.5]
    return validate_params(raw)


def test_the_choice_picks_the_strength_that_scores_best(phase_one, tmp_path):
    _, params, _ = phase_one
    params = _choice_params(params)
    layout = Layout(str(tmp_path / "results"))
    _write_tables(layout, params)
    choice = report.write_choice("one", params, layout, Path(layout.best("one")))
    assert (choice["step"], choice["scale"]) == (2, 1.5)
    written = json.loads(Path(layout.best("one")).read_text())
    assert (written["step"], written["scale"]) == (2, 1.5)
    assert "3 of 4 (checkpoint, strength)s" in choice["reason"]
    scored = {(t["step"], t["scale"]): t for t in choice["checkpoints"]}
    assert set(scored) == set(TABLE)  # means per (step, strength)
    assert scored[(4, 1.5)]["violations"] == ["identity_sim 0.800 < 0.85"]
    assert scored[(2, 1.0)]["identity_sim"] == pytest.approx(0.90)
    # the next phase starts from the file as trained: the strength is not in it
    assert written["lora"].endswith("step-000002/pytorch_lora_weights.safetensors")


def test_the_final_lora_records_its_strength(phase_one, tmp_path):
    root, params, validation = phase_one
    params = _choice_params(params)
    results = tmp_path / "results"
    shutil.copytree(root / "train", results / "train")
    shutil.copytree(validation, results / "validation")
    layout = Layout(str(results))
    _write_tables(layout, params)
    report.write_choice("one", params, layout, Path(layout.best("one")))
    summary = report.write_report(
        params,
        layout,
        validation,
        Path(layout.eval_metrics()),
        Path(layout.eval_summary()),
        {"one": Path(layout.eval_plot("one"))},
        {"one": Path(layout.contact_sheet("one"))},
    )
    assert summary["chosen"]["one"]["scale"] == 1.5
    assert summary["chosen"]["one"]["identity_sim"] == pytest.approx(0.95)
    assert set(summary["one"]["2"]) == {"1", "1.5"} and set(summary["base"]["0"]) == {"0"}
    info = build_final(params, results, results / "final")
    final = json.loads((results / "final" / "final.json").read_text())
    assert info["scale"] == final["scale"] == 1.5
    assert final["choices"]["one"]["scale"] == 1.5
    assert final["metrics"]["identity_sim"] == pytest.approx(0.95)  # those of (2, 1.5)
    card = (results / "final" / "README.md").read_text()
    assert "Load with strength 1.5" in card
    assert "`strength_model` to 1.5" in card and "adapter_weights=[1.5]" in card
    assert "step 2 (raw) at strength 1.5" in card


def test_the_fused_transformer_carries_the_chosen_strength(phase_one, tmp_path):
    """A fused model has no strength to set later: final.fuse adds S x the LoRA's delta."""
    from safetensors.torch import load_file

    root, params, _ = phase_one
    params = _choice_params(params).model_copy(
        update={"final": params.final.model_copy(update={"fuse": True})}
    )
    results = tmp_path / "results"
    shutil.copytree(root / "train", results / "train")
    layout = Layout(str(results))
    _write_tables(layout, params)
    best = Path(layout.best("one"))
    report.write_choice("one", params, layout, best)

    def fused(folder: str) -> dict:
        build_final(params, results, tmp_path / folder)
        return load_file(
            tmp_path / folder / "transformer_fused" / "diffusion_pytorch_model.safetensors"
        )

    at_chosen = fused("chosen")
    choice = json.loads(best.read_text())
    best.write_text(json.dumps({**choice, "scale": 1.0}))  # (2, 1.0) is in the table too
    at_one = fused("one")
    base = load_file(
        Path(params.model.path) / "transformer" / "diffusion_pytorch_model.safetensors"
    )
    changed = 0
    for key, weight in base.items():
        delta = at_one[key].double() - weight.double()
        np.testing.assert_allclose(
            (at_chosen[key].double() - weight.double()).numpy(), 1.5 * delta.numpy(), atol=1e-6
        )
        changed += bool(delta.abs().max() > 0)
    assert changed  # the LoRA did touch the weights
