"""Evaluation of checkpoints, the choice of the best, and the final LoRA."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from facelora.config import validate_params
from facelora.evaluate import report
from facelora.evaluate.run import Evaluator, evaluate_group
from facelora.models.tiny import make_tiny_model
from facelora.registry.layout import Layout
from facelora.release.final import build_final
from facelora.train.checkpoint import list_checkpoints
from facelora.train.loop import train_phase

from helpers import write_phase_folder


def portrait_pairs(folder: Path, portrait: np.ndarray, n: int = 2) -> Path:
    """Validation pairs cut around the sample portrait's face (256 px: dlib finds it)."""
    h, w = portrait.shape[:2]
    pairs = []
    for i in range(n):
        x0 = w // 4 + 40 * i
        crop = Image.fromarray(portrait[h // 8 : h // 8 + w // 2, x0 : x0 + w // 2]).resize(
            (256, 256)
        )
        end = np.asarray(crop).copy()
        end[100:140, 100:140] = (250, 240, 40)
        pairs.append((crop, end))
    return write_phase_folder(folder, pairs, prefix="v")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, astronaut_portrait):
    """A tiny Qwen model, two short phases trained (checkpoints 2 and 4), validation pairs."""
    root = tmp_path_factory.mktemp("eval")
    model = make_tiny_model("qwen_image_edit", root / "model")
    train_data = root / "train_data"
    train_data.mkdir()
    shutil.copytree(portrait_pairs(root / "v0", astronaut_portrait), train_data, dirs_exist_ok=True)
    validation = portrait_pairs(root / "validation", astronaut_portrait)
    params = validate_params(
        {
            "seed": 1,
            "lr": 1e-3,
            "model": {"family": "qwen_image_edit", "path": str(model)},
            "lora": {"rank": 4},
            "train": {"resolution": 64, "save_every": 2},
            "eval": {"resolution": 64, "steps": 2, "guidance": None, "checkpoints_per_job": 2},
            "phases": [
                {"name": "one", "steps": 4},
                {"name": "two", "steps": 2, "init_from": "best"},
            ],
        }
    )
    train_phase(
        "one",
        train_data,
        root / "train" / "one",
        params,
        cache_dir=root / "cache",
        show_progress=False,
    )
    return root, params, validation


def test_every_checkpoint_and_the_base_are_scored_and_failures_recorded(trained):
    root, params, validation = trained
    evaluator = Evaluator(params)
    base = evaluate_group(
        params, "base", [], validation, None, root / "eval" / "phases" / "base", evaluator
    )
    rows = evaluate_group(
        params,
        "one",
        [2, 4],
        validation,
        root / "train" / "one",
        root / "eval" / "phases" / "one" / "group-0",
        evaluator,
    )
    assert len(base) == 2 and len(rows) == 4
    assert set(rows["step"]) == {2, 4} and (rows["weights"] == "raw").all()
    for row in rows.itertuples():
        assert (root / "eval" / "phases" / "one" / "group-0" / row.image).is_file()
    # the tiny random model draws no face: identity is a recorded failure, never dropped
    assert (rows["status"] == "failed").all()
    assert rows["note"].str.contains("no face in output").all()
    assert np.isfinite(rows["bg_ssim"]).all()  # the source's face was found
    assert (rows["identity_sim_backend"] == "dlib-resnet128").all()
    assert (rows["lpips_backend"] == "unavailable").all()  # no backbone weights here
    backends = json.loads((root / "eval/phases/one/group-0/metrics_backends.json").read_text())
    assert "eval.lpips_backbone" in backends["lpips"]["reason"]


def test_missing_corrupt_and_foreign_checkpoints_become_failed_rows(trained, tmp_path):
    root, params, validation = trained
    train_dir = tmp_path / "train"
    shutil.copytree(root / "train" / "one", train_dir)
    checkpoints = dict(list_checkpoints(train_dir))
    (checkpoints[2] / "pytorch_lora_weights.safetensors").unlink()
    weights = checkpoints[4] / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rows = evaluate_group(
        params, "one", [2, 4], validation, train_dir, tmp_path / "out", Evaluator(params)
    )
    notes = dict(zip(rows["step"], rows["note"], strict=False))
    assert notes[2].startswith("checkpoint file missing")
    assert notes[4].startswith("checkpoint unreadable")
    assert (rows["status"] == "failed").all() and len(rows) == 4

    klein = make_tiny_model("flux2_klein", tmp_path / "klein")
    other = validate_params(
        {
            **params.model_dump(mode="json"),
            "model": {"family": "flux2_klein", "path": str(klein)},
            "lora": {"rank": 4, "preset": "all_blocks"},
        }
    )
    data = tmp_path / "kdata"
    shutil.copytree(validation, data)
    train_phase(
        "one", data, tmp_path / "ktrain", other, cache_dir=tmp_path / "kcache", show_progress=False
    )
    rows = evaluate_group(
        params, "one", [2], validation, tmp_path / "ktrain", tmp_path / "kout", Evaluator(params)
    )
    assert rows["note"].str.contains("another architecture|another model size").all()


def test_nan_images_are_failures(trained, tmp_path, monkeypatch):
    import facelora.models.inference as sample

    _, params, validation = trained
    evaluator = Evaluator(params)
    monkeypatch.setattr(sample, "generate", lambda *a, **k: np.full((64, 64, 3), np.nan))
    rows = evaluate_group(params, "base", [], validation, None, tmp_path / "out", evaluator)
    assert (rows["status"] == "failed").all()
    assert rows["note"].str.contains("NaN").all()


def _summary(steps: dict[int, dict]) -> dict:
    out = {"one": {}}
    for step, values in steps.items():  # at one strength, 1
        out["one"][str(step)] = {
            "1": {
                "identity_sim": None,
                "lpips": None,
                "bg_ssim": None,
                "clip_score": None,
                "pairs": 4,
                "failed": 0,
                **values,
            }
        }
    return out


def test_summary_means_use_every_row_where_the_metric_was_computed():
    frame = pd.DataFrame(
        [
            # the output has no face: no identity, but the background was still scored
            {"phase": "one", "step": 2, "status": "failed", "identity_sim": np.nan, "bg_ssim": 0.5},
            {"phase": "one", "step": 2, "status": "ok", "identity_sim": 0.9, "bg_ssim": 0.7},
            {
                "phase": "one",
                "step": 4,
                "status": "failed",
                "identity_sim": np.nan,
                "bg_ssim": np.nan,
            },
        ]
    ).assign(lpips=np.nan, clip_score=np.nan, scale=1.0)
    summary = report.summarize(frame)
    two, four = summary["one"]["2"]["1"], summary["one"]["4"]["1"]
    assert two["bg_ssim"] == pytest.approx(0.6)
    assert two["identity_sim"] == pytest.approx(0.9)
    assert two["failed"] == 1 and two["pairs"] == 2
    assert four["bg_ssim"] is None and four["failed"] == 1


def test_choice_is_non_monotonic_and_constraints_come_first(tmp_path):
    params = validate_params(
        {
            "objective": {
                "constraints": {"identity_sim": {"min": 0.85}},
                "weights": {"identity_sim": 1.0, "lpips": -1.0},
            }
        }
    )
    summary = _summary(
        {
            6: {"identity_sim": 0.90, "lpips": 0.20},
            8: {"identity_sim": 0.80, "lpips": 0.05},  # best score, but below the constraint
            10: {"identity_sim": 0.92, "lpips": 0.18},
        }
    )
    choice = report.choose("one", summary, params, tmp_path / "one")
    assert choice["step"] == 10
    assert "2 of 3 checkpoints that meet every constraint" in choice["reason"]
    assert choice["lora"].endswith("one/checkpoints/step-000010/pytorch_lora_weights.safetensors")
    steps = {t["step"]: t for t in choice["checkpoints"]}
    assert steps[8]["violations"] == ["identity_sim 0.800 < 0.85"]


def test_failures_count_against_a_checkpoint_and_none_meeting_is_said(tmp_path):
    params = validate_params({"eval": {"use_ema": True}})
    summary = _summary(
        {
            2: {"identity_sim": 0.95, "failed": 3},  # 1 of 4 pairs worked
            4: {"identity_sim": 0.90, "failed": 0},
        }
    )
    choice = report.choose("one", summary, params, tmp_path / "one")
    assert choice["step"] == 4 and choice["weights"] == "ema"
    assert "/ema/" in choice["lora"]
    lows = _summary({2: {"identity_sim": 0.5}, 4: {"identity_sim": 0.6}})
    choice = report.choose("one", lows, params, tmp_path / "one")
    assert choice["step"] == 4 and choice["reason"].startswith("no checkpoint meets")


def test_reports_choice_and_final_lora(trained, tmp_path):
    root, params, validation = trained
    results = tmp_path / "results"
    shutil.copytree(root / "train", results / "train")
    shutil.copytree(validation, results / "validation")
    evaluator = Evaluator(params)
    runs = results / "eval" / "phases"
    evaluate_group(params, "base", [], validation, None, runs / "base", evaluator)
    evaluate_group(
        params,
        "one",
        [2, 4],
        validation,
        results / "train" / "one",
        runs / "one" / "group-0",
        evaluator,
    )
    layout = Layout(str(results))
    choice = report.write_choice("one", params, layout, Path(layout.best("one")))
    assert (runs / "one" / "best.json").is_file() and choice["step"] in (2, 4)
    one_phase = params.model_copy(update={"phases": params.phases[:1]})
    summary = report.write_report(
        one_phase,
        layout,
        validation,
        Path(layout.eval_metrics()),
        Path(layout.eval_summary()),
        {"one": Path(layout.eval_plot("one"))},
        {"one": Path(layout.contact_sheet("one"))},
    )
    assert set(summary) >= {"base", "one", "metrics", "chosen"}
    assert summary["chosen"]["one"]["step"] == choice["step"]
    assert summary["one"]["2"]["1"]["failed"] == 2 and summary["one"]["4"]["1"]["pairs"] == 2
    frame = pd.read_csv(results / "eval" / "metrics.csv")
    assert len(frame) == 6
    for path in ("plots/one.png", "contact/one.png"):
        with Image.open(results / "eval" / path) as im:
            assert im.width > 200
    info = build_final(one_phase, results, results / "final")
    final = results / "final"
    for name in (
        "pytorch_lora_weights.safetensors",
        "lora_comfyui.safetensors",
        "README.md",
        "final.json",
    ):
        assert (final / name).is_file(), name
    card = (final / "README.md").read_text()
    assert "EDITFACE" in card and "qwen_image_edit" in card and f"step {choice['step']}" in card
    assert info["data"]["validation"] != "absent"
    # apply reads the trigger word and the generation settings of the choice from final.json
    assert info["trigger"] == one_phase.captions.trigger
    assert info["inference"]["steps"] == one_phase.eval.steps
    from facelora.apply.lora import resolve

    assert resolve(final).trigger == one_phase.captions.trigger
    compressed = one_phase.model_copy(
        update={"final": one_phase.final.model_copy(update={"merge_rank": 2})}
    )
    info = build_final(compressed, results, tmp_path / "final2")
    assert 0 < info["compression"]["energy_kept"] <= 1
    assert set(info["base_metrics"]) == set(info["metrics"])  # the card compares with the base
    fused = one_phase.model_copy(
        update={"final": one_phase.final.model_copy(update={"fuse": True})}
    )
    build_final(fused, results, tmp_path / "final3")
    assert (tmp_path / "final3" / "transformer_fused" / "config.json").is_file()
    assert "transformer_fused" in (tmp_path / "final3" / "README.md").read_text()


def test_the_evaluation_table_marks_the_choice_and_unavailable_metrics(tmp_path):
    from facelora.workflow.cli import format_evaluation

    params = validate_params({"phases": [{"name": "one", "steps": 4}]})
    entry = {"identity_sim": 0.9, "lpips": None, "bg_ssim": 0.95, "clip_score": None}
    summary = {
        "base": {"0": {"0": {**entry, "pairs": 2, "failed": 0}}},
        "one": {
            "2": {"1": {**entry, "pairs": 2, "failed": 1}},
            "4": {"1": {**entry, "pairs": 2, "failed": 0}},
        },
        "metrics": {"lpips": {"available": False, "reason": "no backbone"}},
        "chosen": {"one": {"step": 4, "scale": 1.0}},
    }
    text = format_evaluation(summary, tmp_path, params)
    assert "one @ 4 *" in text and "one @ 2 *" not in text and "1/2" in text
    assert "lpips unavailable: no backbone" in text and "0.9500" in text
