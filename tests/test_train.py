"""LoRA training on the tiny models of both families: conventions, checkpoints, resume."""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from facelora.config import validate_params
from facelora.io.live import read_series
from facelora.models import lora_io
from facelora.models.adapters import ModelRefused, check_model_folder, load_adapter
from facelora.registry.layout import Layout
from facelora.train.checkpoint import list_checkpoints
from facelora.train.loop import Trainer, TrainingDiverged, train_phase
from facelora.train.optim import lr_lambda
from facelora.train.sampling import noisy_latents, sample_sigmas

from helpers import BIN, FAMILIES, settings, write_pairs

# --- conventions --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_matching_matches_the_pipeline_scheduler(tiny_models, family):
    """The velocity target, stepped by the pipeline's own scheduler, lands on the training
    interpolation at the next sigma; and the pipeline's timestep / 1000 is that sigma."""
    adapter = load_adapter(family, tiny_models[family], "float32", torch.device("cpu"))
    scheduler = adapter.pipe.scheduler
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.1, 5).tolist(), mu=0.5)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    sigmas = scheduler.sigmas
    assert torch.allclose(scheduler.timesteps / 1000, sigmas[:-1].to(scheduler.timesteps.dtype))
    for i, t in enumerate(scheduler.timesteps):
        xt, velocity = noisy_latents(x0, noise, sigmas[i : i + 1])
        stepped = scheduler.step(velocity, t, xt, return_dict=False)[0]
        expected, _ = noisy_latents(x0, noise, sigmas[i + 1 : i + 2])
        assert torch.allclose(stepped, expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_predicts_exactly_what_the_pipeline_computes(tmp_path, tiny_models, family):
    """The transformer call of training (cached start latents and prompt, packing, position
    ids, sigma as the timestep) gives the pipeline's own call at inference, for the same noisy
    latents at the pipeline's first sigma: a wrong timestep scale, conditioning or packing
    would differ."""
    from facelora.models.inference import generate

    data = write_pairs(tmp_path / "data", n=1)
    params = settings(family, tiny_models[family], steps=1)
    trainer = Trainer("one", data, tmp_path / "out", params, cache_dir=tmp_path / "cache")
    trainer.cache.prepare(trainer.samples)
    sample, pipe = trainer.samples[0], trainer.adapter.pipe
    calls = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True
    )
    width, height = sample.size
    start = Image.open(sample.controls[0])
    with torch.no_grad():
        generate(pipe, start, [], sample.caption, width=width, height=height, steps=3, seed=0,
                 output_type="latent")  # fmt: skip
    handle.remove()
    inputs, output = calls[0]  # the first step: at the schedule's first sigma
    sigma = pipe.scheduler.sigmas[:1].float()

    target = trainer.cache.latents(sample.target, sample.size)[None]
    b, c, h, w = target.shape
    n = h * w // 4 if family == "qwen_image_edit" else h * w  # the target's tokens come first

    def unpack(x: torch.Tensor) -> torch.Tensor:
        x = x[:, :n]
        if family == "qwen_image_edit":  # undo the 2x2 packing
            x = x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
            return x.reshape(b, c, h, w)
        return x.permute(0, 2, 1).reshape(b, c, h, w)

    noisy = unpack(inputs["hidden_states"])
    controls = [trainer.cache.latents(sample.controls[0], sample.size)[None]]
    text = [trainer.cache.text(sample)]
    with torch.no_grad():
        predicted = trainer.adapter.predict(noisy, controls, text, sigma)
    assert float(inputs["timestep"][0]) == pytest.approx(float(sigma[0]), abs=1e-6)
    assert torch.allclose(predicted, unpack(output), atol=1e-4), float(
        (predicted - unpack(output)).abs().max()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_default_shift_is_the_pipelines_own_at_each_resolution(tiny_models, family):
    """Shift sampling with the model's default shift draws sigmas exactly as the pipeline's
    own resolution-dependent schedule shifts them (its mu, its scheduler's time shift)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    adapter = load_adapter(family, tiny_models[family], "float32", torch.device("cpu"))
    config = adapter.pipe.scheduler.config
    latents_64 = adapter.encode_latents(torch.zeros(1, 3, 64, 64))
    channels, side = latents_64.shape[1], latents_64.shape[2]
    shifts = []
    for pixels in (256, 1024):
        latents = torch.zeros(1, channels, side * pixels // 64, side * pixels // 64)
        tokens = (pixels // 16) ** 2  # what the pipeline's packed latents hold at this size
        if family == "qwen_image_edit":
            mu = calculate_shift(
                tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        else:
            mu = compute_empirical_mu(image_seq_len=tokens, num_steps=50)
        shift = adapter.default_shift(latents)
        drawn = sample_sigmas(64, "shift", torch.Generator().manual_seed(0), shift=shift)
        uniform = torch.rand(64, generator=torch.Generator().manual_seed(0))  # the same draws
        expected = adapter.pipe.scheduler.time_shift(mu, 1.0, uniform).clamp(1e-4, 1 - 1e-4)
        assert torch.allclose(drawn, expected, atol=1e-5)
        shifts.append(shift)
    assert shifts[1] > shifts[0] > 1.0  # more tokens, more noise


def test_sigma_sampling():
    g = torch.Generator().manual_seed(0)
    uniform = sample_sigmas(20000, "uniform", g)
    logit = sample_sigmas(20000, "sigmoid", g, sigmoid_scale=1.0)
    shifted = sample_sigmas(20000, "shift", g, shift=3.0)
    assert abs(float(uniform.mean()) - 0.5) < 0.01
    assert abs(float(logit.mean()) - 0.5) < 0.01 and float(logit.std()) < float(uniform.std())
    assert float(shifted.mean()) > 0.65  # pushed towards noise
    assert float(torch.cat([uniform, logit, shifted]).min()) > 0
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_sigmas(1, "cosine", g)


def test_learning_rate_schedules():
    params = validate_params({"train": {"schedule": "cosine", "warmup_fraction": 0.1}})
    cosine = lr_lambda(params.train, 100, 1e-4)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(55) == pytest.approx(0.5, abs=0.02) and cosine(100) == pytest.approx(0.0)
    params = validate_params({"train": {"schedule": "polynomial", "lr_end": 1e-4}})
    poly = lr_lambda(params.train, 100, 1e-3)
    assert poly(100) * 1e-3 == pytest.approx(1e-4)
    constant = lr_lambda(validate_params({}).train, 100, 1e-4)
    assert constant(0) == constant(99) == 1.0


def test_min_snr_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="flow matching"):
        validate_params({"train": {"min_snr_gamma": 5.0}})


# --- training -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_training_writes_loadable_checkpoints(tmp_path, tiny_models, family):
    data = write_pairs(tmp_path / "data")
    out = tmp_path / "out"
    params = settings(family, tiny_models[family], ema_decay=0.9)
    trainer = Trainer("one", data, out, params, cache_dir=tmp_path / "cache")
    summary = trainer.run(show_progress=False)
    assert [s for s, _ in list_checkpoints(out)] == [3, 6]
    assert np.isfinite(summary["final_loss"]) and summary["trainable_params"] > 0
    log_rows = (out / "log.csv").read_text().splitlines()
    assert len(log_rows) == 7 and log_rows[0].startswith("step,loss,lr,grad_norm")
    last = list_checkpoints(out)[-1][1]
    for name in (
        "pytorch_lora_weights.safetensors",
        "lora_comfyui.safetensors",
        "state.pt",
        "meta.json",
        "ema/pytorch_lora_weights.safetensors",
    ):
        assert (last / name).is_file(), name
    weights = load_file(last / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("transformer.") and ".lora_" in k for k in weights)
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if ".lora_B." in k)
    ema = load_file(last / "ema" / "pytorch_lora_weights.safetensors")
    assert ema.keys() == weights.keys()
    assert any(not torch.equal(ema[k], weights[k]) for k in weights)

    # the pipeline's own loader reads the file back and gives the trained adapter's output
    trained = trainer.adapter.transformer
    fresh = load_adapter(family, tiny_models[family], "float32", torch.device("cpu"))
    fresh.pipe.load_lora_weights(str(last), weight_name="pytorch_lora_weights.safetensors")
    batch = trainer.samples[:1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, *trainer.cache.latents(batch[0].target, batch[0].size).shape, generator=g)
    controls = [trainer.cache.latents(batch[0].controls[0], batch[0].size)[None]]
    text = [trainer.cache.text(batch[0])]
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        expected = trainer.adapter.predict(x, controls, text, sigma)
        got = fresh.predict(x, controls, text, sigma)
        base = load_adapter(family, tiny_models[family], "float32", torch.device("cpu"))
        untrained = base.predict(x, controls, text, sigma)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(untrained, expected, atol=1e-4)  # the LoRA changed the output
    assert trained is trainer.adapter.transformer


@pytest.mark.parametrize("keep", [1, 2, None])
def test_only_the_newest_checkpoints_keep_the_resume_state(tmp_path, tiny_models, keep):
    data = write_pairs(tmp_path / "data", n=2)
    params = settings("qwen_image_edit", tiny_models["qwen_image_edit"], steps=6, save_every=2)
    params.train.keep_states = keep
    out = tmp_path / "out"
    train_phase("one", data, out, params, cache_dir=tmp_path / "cache", show_progress=False)
    found = list_checkpoints(out)
    assert [s for s, _ in found] == [2, 4, 6]
    with_state = [s for s, d in found if (d / "state.pt").is_file()]
    assert with_state == {1: [6], 2: [4, 6], None: [2, 4, 6]}[keep]
    assert all((d / lora_io.DIFFUSERS_WEIGHTS).is_file() for _, d in found)  # for evaluation
    # resuming uses the newest checkpoint that has its state
    again = train_phase("one", data, out, params, cache_dir=tmp_path / "cache", show_progress=False)
    assert again["resumed"] is True


def test_comfyui_layout_carries_the_same_weights(tmp_path, tiny_models):
    data = write_pairs(tmp_path / "data", n=2)
    out = tmp_path / "out"
    params = settings("qwen_image_edit", tiny_models["qwen_image_edit"], steps=3)
    train_phase("one", data, out, params, cache_dir=tmp_path / "cache", show_progress=False)
    last = list_checkpoints(out)[-1][1]
    diffusers_side, meta = lora_io.read_lora(last / "pytorch_lora_weights.safetensors")
    comfy_side, comfy_meta = lora_io.read_lora(last / "lora_comfyui.safetensors")
    assert diffusers_side.keys() == comfy_side.keys()
    assert all(torch.equal(diffusers_side[k], comfy_side[k]) for k in diffusers_side)
    assert meta["lora_alpha"] == comfy_meta["lora_alpha"] == 8.0  # 2 x rank 4
    raw = load_file(last / "lora_comfyui.safetensors")
    assert all(k.startswith("diffusion_model.") for k in raw)
    assert sum(k.endswith(".alpha") for k in raw) == len(diffusers_side) // 2


def test_cache_is_reused_across_runs(tmp_path, tiny_models):
    data = write_pairs(tmp_path / "data", n=3)
    params = settings("flux2_klein", tiny_models["flux2_klein"], steps=2)
    first = Trainer("one", data, tmp_path / "a", params, cache_dir=tmp_path / "cache")
    first.run(show_progress=False)
    assert first.cache.misses > 0
    second = Trainer("one", data, tmp_path / "b", params, cache_dir=tmp_path / "cache")
    second.cache.prepare(second.samples)
    assert second.cache.misses == 0 and second.cache.hits == first.cache.misses

    # once cached, the encoders leave the training device; a later miss still encodes
    assert first.adapter.encoders_aside
    sample = first.samples[0]
    cached, misses = first.cache.latents(sample.target, sample.size), first.cache.misses
    shutil.rmtree(tmp_path / "cache" / "latents")
    assert torch.equal(first.cache.latents(sample.target, sample.size), cached)
    assert first.adapter.encoders_aside and first.cache.misses == misses + 1


def test_next_phase_starts_from_the_previous_lora(tmp_path, tiny_models):
    from facelora.train.init import resolve_init

    data = write_pairs(tmp_path / "data")
    params = settings("qwen_image_edit", tiny_models["qwen_image_edit"], steps=3)
    train_phase(
        "one",
        data,
        tmp_path / "train" / "one",
        params,
        cache_dir=tmp_path / "c",
        show_progress=False,
    )
    init = resolve_init(params, "two", Layout(str(tmp_path)))
    assert init == list_checkpoints(tmp_path / "train" / "one")[-1][1] / lora_io.DIFFUSERS_WEIGHTS
    second = Trainer(
        "two", data, tmp_path / "train" / "two", params, init_lora=init, cache_dir=tmp_path / "c"
    )
    expected, _ = lora_io.read_lora(init)
    now = lora_io.lora_state(second.adapter.transformer)
    assert all(torch.equal(now[k], expected[k]) for k in expected)
    with pytest.raises(FileNotFoundError, match="train one first"):
        resolve_init(params, "two", Layout(str(tmp_path / "nowhere")))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_models, monkeypatch):
    data = write_pairs(tmp_path / "data", n=2)
    params = settings("qwen_image_edit", tiny_models["qwen_image_edit"], steps=6)
    trainer = Trainer("one", data, tmp_path / "out", params, cache_dir=tmp_path / "cache")
    real_predict = trainer.adapter.predict
    calls = []

    def predict_then_fail(*args):  # injects the failure; the loop's handling is under test
        calls.append(1)
        out = real_predict(*args)
        return out * float("nan") if len(calls) == 5 else out

    monkeypatch.setattr(trainer.adapter, "predict", predict_then_fail)
    with pytest.raises(TrainingDiverged, match="at step 5.*step-000003"):
        trainer.run(show_progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [3]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_models):
    data = write_pairs(tmp_path / "data", n=4)
    model = tiny_models["qwen_image_edit"]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        json.dumps(
            {
                "seed": 5,
                "lr": 1e-3,
                "model": {"family": "qwen_image_edit", "path": str(model)},
                "lora": {"rank": 4, "dropout": 0.1},
                "train": {
                    "resolution": 64,
                    "save_every": 5,
                    "noise_offset": 0.05,
                    "schedule": "cosine",
                    "ema_decay": 0.9,
                },
                "phases": [{"name": "one", "steps": 40}],
            }
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}

    def command(out):
        return [
            str(BIN / "facelora"),
            "--params",
            str(params_file),
            "train",
            "one",
            "--data",
            str(data),
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
        ]

    subprocess.run(command(tmp_path / "straight"), env=env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 10 for s, _ in list_checkpoints(killed)):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_at_kill = [s for s, _ in list_checkpoints(killed)]
    assert steps_at_kill and max(steps_at_kill) < 40, steps_at_kill
    resumed = subprocess.run(command(killed), env=env, check=True, capture_output=True, text=True)
    assert '"resumed": true' in resumed.stdout
    a = load_file(tmp_path / "straight/checkpoints/step-000040/pytorch_lora_weights.safetensors")
    b = load_file(killed / "checkpoints/step-000040/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = load_file(
        tmp_path / "straight/checkpoints/step-000040/ema/pytorch_lora_weights.safetensors"
    )
    eb = load_file(killed / "checkpoints/step-000040/ema/pytorch_lora_weights.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    log_a = (tmp_path / "straight" / "log.csv").read_text().splitlines()
    log_b = (killed / "log.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in log_a] == [r.split(",")[:3] for r in log_b]
    # the DVCLive series (default OUT/dvclive) was cut back with the log: each step once
    losses = [(int(r.split(",")[0]), float(r.split(",")[1])) for r in log_b[1:]]
    assert read_series(killed / "dvclive")["loss"] == losses
    assert [s for s, _ in losses] == list(range(1, 41))


# --- refusals -----------------------------------------------------------------------------


def test_distilled_klein_and_wrong_folders_are_refused(tmp_path, tiny_models):
    distilled = tmp_path / "distilled"
    shutil.copytree(tiny_models["flux2_klein"], distilled)
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    with pytest.raises(ModelRefused, match="step-distilled"):
        check_model_folder(distilled, "flux2_klein")
    with pytest.raises(ModelRefused, match="not the QwenImageEditPlusPipeline"):
        check_model_folder(tiny_models["flux2_klein"], "qwen_image_edit")
    with pytest.raises(FileNotFoundError, match="model.path"):
        check_model_folder(tmp_path / "nothing", "qwen_image_edit")


def test_a_lora_of_another_size_or_architecture_is_refused(tmp_path, tiny_models):
    adapter = load_adapter(
        "flux2_klein", tiny_models["flux2_klein"], "float32", torch.device("cpu")
    )
    params = settings("flux2_klein", tiny_models["flux2_klein"])
    lora_io.add_lora(adapter.transformer, "flux2_klein", params.lora)
    state = lora_io.lora_state(adapter.transformer)
    key = next(k for k in state if ".lora_A." in k)
    wider = {**state, key: torch.zeros(4, state[key].shape[1] + 16)}  # another hidden size
    save_file({f"transformer.{k}": v for k, v in wider.items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(lora_io.LoraMismatch, match="another model size"):
        lora_io.load_into(adapter.transformer, tmp_path / "wide.safetensors", rank=4)
    other = {"transformer.blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 8)}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(lora_io.LoraMismatch, match="another architecture"):
        lora_io.load_into(adapter.transformer, tmp_path / "other.safetensors", rank=4)
    save_file({f"transformer.{k}": v for k, v in state.items()}, str(tmp_path / "ok.safetensors"))
    with pytest.raises(lora_io.LoraMismatch, match="rank"):
        lora_io.load_into(adapter.transformer, tmp_path / "ok.safetensors", rank=8)


def test_safetensors_files_are_byte_reproducible(tmp_path):
    from facelora.io import safetensors_io

    tensors = {
        "b.weight": torch.arange(6.0).reshape(2, 3),
        "a.weight": torch.ones(3, dtype=torch.bfloat16),
    }
    metadata = {"z": "1", "format": "pt", "lora_adapter_metadata": "{}"}
    safetensors_io.write(tmp_path / "one.safetensors", tensors, metadata)
    safetensors_io.write(
        tmp_path / "two.safetensors",
        dict(reversed(tensors.items())),
        dict(reversed(metadata.items())),
    )
    assert (tmp_path / "one.safetensors").read_bytes() == (
        tmp_path / "two.safetensors"
    ).read_bytes()
    back = load_file(tmp_path / "one.safetensors")
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "one.safetensors"), "pt") as f:
        assert f.metadata() == metadata


@pytest.mark.parametrize(
    ("optimizer", "lr"), [("adamw", 1e-3), ("adamw8bit", 1e-3), ("prodigy", 1.0)]
)
def test_every_optimizer_trains(tmp_path, tiny_models, optimizer, lr):
    from facelora.train.optim import make_optimizer

    data = write_pairs(tmp_path / "data", n=2)
    params = settings(
        "qwen_image_edit", tiny_models["qwen_image_edit"], steps=3, optimizer=optimizer
    )
    params = params.model_copy(update={"lr": lr})
    trainer = Trainer("one", data, tmp_path / "out", params, cache_dir=tmp_path / "cache")
    kind = type(make_optimizer([torch.nn.Parameter(torch.zeros(1))], lr, params.train)).__name__
    expected = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "prodigy": "Prodigy"}[optimizer]
    assert type(trainer.optimizer).__name__ == kind == expected
    before = [p.detach().clone() for p in trainer.trainable]
    summary = trainer.run(show_progress=False)
    assert np.isfinite(summary["final_loss"])
    assert any(
        not torch.equal(a, p.detach()) for a, p in zip(before, trainer.trainable, strict=True)
    )
    if optimizer == "prodigy":
        group = trainer.optimizer.param_groups[0]
        assert (
            group["weight_decay"] == 0.05 and group["decouple"] and not group["use_bias_correction"]
        )


@pytest.mark.parametrize(
    ("quantize", "text_encoder"), [("none", False), ("fp8", False), ("none", True)]
)
def test_two_processes_stay_in_sync(tmp_path, tiny_models, quantize, text_encoder):
    """Data-parallel training on the CPU (torchrun, gloo): both processes end with the same
    LoRA, having trained on different batches (also over a float8 base, which DDP must not
    try to broadcast, and with a text encoder LoRA, whose gradients are averaged by hand)."""
    data = write_pairs(tmp_path / "data", n=4)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        json.dumps(
            {
                "seed": 2,
                "lr": 1e-3,
                "model": {
                    "family": "flux2_klein",
                    "path": str(tiny_models["flux2_klein"]),
                    "quantize": quantize,
                },
                "lora": {"rank": 4, "preset": "all_blocks", "train_text_encoder": text_encoder},
                "train": {"resolution": 64, "save_every": 3},
                "phases": [{"name": "one", "steps": 6}],
            }
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    out = tmp_path / "out"
    run = subprocess.run(
        [
            str(BIN / "facelora"),
            "--params",
            str(params_file),
            "train",
            "one",
            "--data",
            str(data),
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
            "--processes",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "train.json").read_text())
    assert summary["processes"] == 2 and summary["in_sync"] is True
    assert len(summary["rank_checksums"]) == 2
    assert [s for s, _ in list_checkpoints(out)] == [3, 6]
    state = torch.load(list_checkpoints(out)[-1][1] / "state.pt", weights_only=False)
    assert len(state["rng"]) == 2  # each process's random state, for exact resume
    assert state["position"]["item"] == 12  # 6 steps x 2 processes, one batch each
    if text_encoder:  # trained in step by both processes (in_sync covers its weights too)
        text = load_file(list_checkpoints(out)[-1][1] / "text_encoder_lora.safetensors")
        assert any(float(v.abs().max()) > 0 for k, v in text.items() if ".lora_B." in k)


def test_diptych_mode_trains_on_side_by_side_pairs(tmp_path, tiny_models):
    data = write_pairs(tmp_path / "data", n=2)
    params = settings("qwen_image_edit", tiny_models["qwen_image_edit"], steps=2, diptych=True)
    trainer = Trainer("one", data, tmp_path / "out", params, cache_dir=tmp_path / "cache")
    sample = trainer.samples[0]
    assert [p.name for p in sample.target] == [
        f"{sample.pair_id}_start.png",
        f"{sample.pair_id}_end.png",
    ]
    assert sample.controls == [] and sample.caption.startswith(params.train.diptych_prefix)
    assert sample.size[0] == 2 * sample.size[1]  # two squares side by side
    latents = trainer.cache.latents(sample.target, sample.size)
    assert latents.shape[-1] == 2 * latents.shape[-2]
    assert np.isfinite(trainer.run(show_progress=False)["final_loss"])


def test_regularization_images_are_mixed_in_at_the_ratio(tmp_path, tiny_models):
    data = write_pairs(tmp_path / "data", n=3)
    reg = tmp_path / "reg"
    reg.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 60 * (i + 1), np.uint8)).save(reg / f"r{i}.png")
    params = settings(
        "qwen_image_edit",
        tiny_models["qwen_image_edit"],
        steps=3,
        regularization={"folder": str(reg), "ratio": 2},
    )
    trainer = Trainer("one", data, tmp_path / "out", params, cache_dir=tmp_path / "cache")
    kinds = [trainer._next_batch()[0][0].pair_id.startswith("reg:") for _ in range(9)]
    assert kinds == [False, False, True] * 3
    reg_sample = trainer.regularization[0]
    assert (
        reg_sample.target == reg_sample.controls
        and reg_sample.caption == params.train.regularization.caption
    )
    missing = settings(
        "qwen_image_edit",
        tiny_models["qwen_image_edit"],
        regularization={"folder": str(tmp_path / "none")},
    )
    with pytest.raises(FileNotFoundError, match="train.regularization.folder"):
        Trainer("one", data, tmp_path / "o2", missing, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoder_lora_is_trained_and_saved(tmp_path, tiny_models, family):
    data = write_pairs(tmp_path / "data", n=2)
    params = settings(family, tiny_models[family], steps=3)
    params = params.model_copy(
        update={"lora": params.lora.model_copy(update={"train_text_encoder": True})}
    )
    trainer = Trainer("one", data, tmp_path / "out", params, cache_dir=tmp_path / "cache")
    assert len(trainer.trainable) > trainer.n_transformer
    trainer.run(show_progress=False)
    assert not trainer.adapter.encoders_aside  # the text encoder trains: it stays
    last = list_checkpoints(tmp_path / "out")[-1][1]
    text = load_file(last / "text_encoder_lora.safetensors")
    assert text and all(k.startswith("text_encoder.") and "self_attn" in k for k in text)
    assert any(float(v.abs().max()) > 0 for k, v in text.items() if ".lora_B." in k)
    transformer = load_file(last / "pytorch_lora_weights.safetensors")
    assert not any(k.startswith("text_encoder.") for k in transformer)


def test_buckets_keep_aspect_and_never_mix_in_a_batch(tmp_path):
    from facelora.models.adapters import bucket_size
    from facelora.train.data import Sample
    from facelora.train.loop import epoch_batches

    assert bucket_size(1024, 1024, 1024) == (1024, 1024)
    w, h = bucket_size(1536, 1024, 1024)
    assert (
        w % 16 == 0
        and h % 16 == 0
        and abs(w / h - 1.5) < 0.05
        and abs(w * h - 1024**2) < 0.05 * 1024**2
    )
    sizes = [(64, 64) if i % 3 else (96, 48) for i in range(12)]
    samples = [
        Sample(f"p{i}", [tmp_path / "x"], [tmp_path / "y"], "c", size=s)
        for i, s in enumerate(sizes)
    ]
    batches = epoch_batches(samples, 3, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(12))
    assert all(len({samples[i].size for i in b}) == 1 for b in batches)
    assert epoch_batches(samples, 3, seed=0, epoch=0) == batches
    assert epoch_batches(samples, 3, seed=0, epoch=1) != batches


def test_gradient_checkpointing_trains(tmp_path, tiny_models):
    data = write_pairs(tmp_path / "data", n=2)
    params = settings(
        "flux2_klein", tiny_models["flux2_klein"], steps=2, gradient_checkpointing=True
    )
    trainer = Trainer("one", data, tmp_path / "out", params, cache_dir=tmp_path / "cache")
    assert trainer.module.is_gradient_checkpointing
    assert np.isfinite(trainer.run(show_progress=False)["final_loss"])


def test_gradient_accumulation_steps_once_per_group_of_batches(tmp_path, tiny_models):
    data = write_pairs(tmp_path / "data", n=4)
    params = settings("qwen_image_edit", tiny_models["qwen_image_edit"], steps=3, grad_accum=2)
    trainer = Trainer("one", data, tmp_path / "out", params, cache_dir=tmp_path / "cache")
    seen = []
    next_batch = trainer._next_batch
    trainer._next_batch = lambda: seen.append(trainer.position.item) or next_batch()
    assert np.isfinite(trainer.run(show_progress=False)["final_loss"])
    assert seen == [0, 1, 2, 3, 4, 5]  # two batches per optimizer step
    assert trainer.step == 3 and trainer.scheduler.last_epoch == 3
    assert len((tmp_path / "out" / "log.csv").read_text().splitlines()) == 1 + 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_quantized_base_needs_a_gpu_and_says_so(tiny_models):
    with pytest.raises(ModelRefused, match="model.quantize = nf4 needs a CUDA GPU"):
        load_adapter(
            "qwen_image_edit",
            tiny_models["qwen_image_edit"],
            "float32",
            torch.device("cpu"),
            quantize="nf4",
        )
