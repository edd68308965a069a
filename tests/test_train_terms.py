"""Training's loss terms on decoded predictions (train.losses.lpips / contrastive / identity)
on the tiny models: each lowers its own term on held-out pairs more than training without it,
the contrastive sampler's pairs share noise and sigma, and missing networks are refused."""

import csv
import math

import numpy as np
import pytest
import torch
import torchvision.models as tvm

from facelora.errors import SettingsError
from facelora.registry.families import family as get_family
from facelora.train.data import read_phase
from facelora.train.loop import Trainer, paired_epoch_batches, start_groups
from facelora.train.objectives import DecodedTerms, predicted_x0

from helpers import CAPTION, FAMILIES, settings, smooth_image, tiny_clip, write_phase_folder

# a visible change in a dozen steps: the tiny Klein LoRA moves about 10x slower than Qwen's
LR = {"qwen_image_edit": 1e-3, "flux2_klein": 1e-2}


def paint(start: np.ndarray, where: str) -> np.ndarray:
    """One of two edits of a start image: a yellow square at the top left or a blue one at
    the bottom right."""
    end = start.copy()
    h, w = start.shape[:2]
    if where == "a":
        end[h // 8 : h // 2, w // 8 : w // 2] = (250, 240, 40)
    else:
        end[h // 2 : 7 * h // 8, w // 2 : 7 * w // 8] = (30, 60, 230)
    return end


def two_edit_pairs(folder, n_starts=3, seed=0, prefix="p"):
    """n_starts start images, each with both edits: 2 x n_starts pairs."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_starts):
        start = smooth_image(rng, 64)
        pairs += [(start, paint(start, "a")), (start, paint(start, "b"))]
    return write_phase_folder(folder, pairs, prefix=prefix)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def squeeze_backbone(tmp_path_factory):
    """torchvision SqueezeNet 1.1 with RANDOM weights, as a file: a loss network for the
    tests only (never a metric)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "squeezenet_random.pth"
    torch.save(tvm.squeezenet1_1(weights=None).state_dict(), path)
    return path


def params_with(family, model, steps, losses, **extra):
    params = settings(family, model, steps=steps, losses=losses)
    params = params.model_copy(update={"lr": LR[family]})
    return params.model_copy(update={"eval": params.eval.model_copy(update=extra)})


def term_on_held_out(trainer, params_on, folder, name, repeats=3):
    """The mean of term `name` (weight 1) on the pairs in folder, with the trainer's weights,
    at fixed noise and sigma draws."""
    trainer.terms = DecodedTerms(params_on, trainer.adapter, trainer.device)
    samples = read_phase(folder, 64, get_family(params_on.model.family).max_references)
    groups = start_groups(samples)
    trainer.noise = torch.Generator().manual_seed(1234)
    values = []
    with torch.no_grad():
        for _ in range(repeats):
            if name == "contrastive":
                for batch, paired in paired_epoch_batches(samples, groups, 1, 0, 0):
                    _, _, parts = trainer._loss([samples[i] for i in batch], paired)
                    if parts.get(name) is not None:
                        values.append(parts[name])
            else:
                for s in samples:
                    _, _, parts = trainer._loss([s])
                    if parts.get(name) is not None:
                        values.append(parts[name])
    assert values
    return float(np.mean(values))


def train_and_measure(tmp_path, family, model, name, losses_on, extra, steps=12):
    data = two_edit_pairs(tmp_path / "data")
    held_out = two_edit_pairs(tmp_path / "held_out", seed=7, prefix="h")
    on = params_with(family, model, steps, losses_on, **extra)
    off = params_with(family, model, steps, {}, **extra)
    results = {}
    for label, params in (("on", on), ("off", off), ("none", None)):
        run = params or off.model_copy(
            update={"phases": [off.phases[0].model_copy(update={"steps": 1}), off.phases[1]]}
        )
        trainer = Trainer("one", data, tmp_path / label, run, cache_dir=tmp_path / "cache")
        if params is not None:
            trainer.run(show_progress=False)
        results[label] = term_on_held_out(trainer, on, held_out, name)
    return results, tmp_path / "on" / "log.csv"


@pytest.mark.parametrize("family", FAMILIES)
def test_lpips_term_lowers_lpips_on_held_out_pairs(tmp_path, tiny_models, family, squeeze_backbone):
    losses = {"lpips": {"weight": 10.0}}
    extra = {"lpips_net": "squeeze", "lpips_backbone": str(squeeze_backbone)}
    results, log_csv = train_and_measure(
        tmp_path, family, tiny_models[family], "lpips", losses, extra
    )
    assert results["on"] < results["off"], results
    with log_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert {"flow_matching", "lpips"} <= set(rows[0])
    for row in rows:  # total = flow matching + weight x lpips, every step
        expected = float(row["flow_matching"]) + 10.0 * float(row["lpips"])
        assert float(row["loss"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_contrastive_term_lowers_it_on_held_out_pairs(tmp_path, tiny_models, family, clip_folder):
    losses = {"contrastive": {"weight": 1.0, "temperature": 0.07}}
    results, log_csv = train_and_measure(
        tmp_path,
        family,
        tiny_models[family],
        "contrastive",
        losses,
        {"clip_model": str(clip_folder)},
    )
    assert results["on"] < results["off"], results
    with log_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert all(row["contrastive"] != "" for row in rows)  # every batch here is a pair of edits


def test_paired_batches_share_noise_and_sigma(tmp_path, tiny_models, clip_folder):
    family = "qwen_image_edit"
    params = params_with(
        family,
        tiny_models[family],
        4,
        {"contrastive": {"weight": 0.5}},
        clip_model=str(clip_folder),
    )
    data = two_edit_pairs(tmp_path / "data", n_starts=3)
    trainer = Trainer("one", data, tmp_path / "out", params, cache_dir=tmp_path / "cache")
    # every sample is used once per epoch, and each paired batch is two edits of one start
    batches = paired_epoch_batches(trainer.samples, trainer.groups, 1, 3, 0)
    assert sorted(i for b, _ in batches for i in b) == list(range(6))
    assert all(paired and trainer.groups[b[0]] == trainer.groups[b[1]] for b, paired in batches)
    seen = []
    predict = trainer.adapter.predict

    def spy(noisy, controls, text, sigma):
        seen.append((noisy.detach().clone(), sigma.clone()))
        return predict(noisy, controls, text, sigma)

    trainer.adapter.predict = spy
    batch, paired = trainer._next_batch()
    assert paired and len(batch) == 2 and batch[0].pair_id != batch[1].pair_id
    trainer._loss(batch, paired)
    noisy, sigma = seen[-1]
    assert sigma[0] == sigma[1]
    x0 = torch.stack([trainer.cache.latents(s.target, s.size) for s in batch]).float()
    noise = (noisy - (1 - sigma[0]) * x0) / sigma[0]
    assert torch.allclose(noise[0], noise[1], atol=1e-5)
    assert not torch.allclose(x0[0], x0[1])  # two different edits


def test_the_prediction_of_x0_inverts_the_noising():
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = torch.tensor([0.2, 0.9])
    s = sigma.view(-1, 1, 1, 1)
    noisy, velocity = (1 - s) * x0 + s * noise, noise - x0
    assert torch.allclose(predicted_x0(noisy, velocity, sigma), x0, atol=1e-6)


def test_terms_refused_with_the_setting_to_change(tmp_path, tiny_models, clip_folder, monkeypatch):
    family = "qwen_image_edit"
    model = tiny_models[family]
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty-hub"))
    data = two_edit_pairs(tmp_path / "data", n_starts=2)
    no_clip = params_with(family, model, 2, {"contrastive": {"weight": 0.05}})
    with pytest.raises(SettingsError, match="eval.clip_model"):
        Trainer("one", data, tmp_path / "a", no_clip)
    single = write_phase_folder(
        tmp_path / "single",
        [(s, paint(s, "a")) for s in (smooth_image(np.random.default_rng(i)) for i in range(2))],
        caption=CAPTION,
    )
    no_groups = params_with(
        family, model, 2, {"contrastive": {"weight": 0.05}}, clip_model=str(clip_folder)
    )
    with pytest.raises(SettingsError, match="share a start image"):
        Trainer("one", single, tmp_path / "b", no_groups)
    no_backbone = params_with(family, model, 2, {"lpips": {"weight": 0.1}})
    with pytest.raises(SettingsError, match="eval.lpips_backbone"):
        Trainer("one", data, tmp_path / "c", no_backbone)


def test_a_term_that_is_not_finite_is_left_out(tmp_path, tiny_models, squeeze_backbone):
    family = "flux2_klein"
    params = params_with(
        family,
        tiny_models[family],
        3,
        {"lpips": {"weight": 1.0}},
        lpips_net="squeeze",
        lpips_backbone=str(squeeze_backbone),
    )
    data = two_edit_pairs(tmp_path / "data", n_starts=2)
    trainer = Trainer("one", data, tmp_path / "out", params, cache_dir=tmp_path / "cache")
    real = trainer.terms.lpips
    calls = []

    def broken(a, b):
        calls.append(1)
        value = real(a, b)
        return value * float("nan") if len(calls) == 2 else value

    trainer.terms.lpips = broken
    summary = trainer.run(show_progress=False)
    assert math.isfinite(summary["final_loss"])
    with (tmp_path / "out" / "log.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows[1]["lpips"] == "" or math.isnan(float(rows[1]["lpips"] or "nan"))
    assert float(rows[1]["loss"]) == pytest.approx(float(rows[1]["flow_matching"]))
    assert rows[0]["lpips"] != "" and rows[2]["lpips"] != ""
