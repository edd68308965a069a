"""train.distributed: fsdp - two CPU processes (torchrun, gloo) sharding the tiny Klein model."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from facelora.config import ParamsError, validate_params
from facelora.train.checkpoint import list_checkpoints

from helpers import BIN, write_pairs

WEIGHTS = ("pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors")


def train(root, model, data, name, distributed, quantize="none", losses=None):
    """`facelora train one --processes 2` into root/name; returns (out folder, train.json)."""
    params_file = root / f"{name}.yaml"
    params_file.write_text(
        json.dumps(
            {
                "seed": 2,
                "lr": 1e-3,
                "model": {"family": "flux2_klein", "path": str(model), "quantize": quantize},
                "lora": {"rank": 4, "preset": "all_blocks"},
                "train": {
                    "resolution": 64,
                    "save_every": 3,
                    "ema_decay": 0.9,
                    "distributed": distributed,
                    "keep_states": None,  # the resume test restarts from the older one
                    "losses": losses or {},
                },
                "phases": [{"name": "one", "steps": 6}],
            }
        )
    )
    out = root / name
    command = [str(BIN / "facelora"), "--params", str(params_file), "train", "one"]
    command += ["--data", str(data), "--out", str(out), "--cache", str(root / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    run = subprocess.run(
        [*command, "--processes", "2"], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out, json.loads((out / "train.json").read_text())


def last_weights(out):
    folder = list_checkpoints(out)[-1][1]
    return {name: load_file(folder / name) for name in WEIGHTS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("fsdp")
    data = write_pairs(root / "data", n=4)
    model = tiny_models["flux2_klein"]
    return {
        "root": root,
        "data": data,
        "model": model,
        "ddp": train(root, model, data, "ddp", "ddp"),
        "fsdp": train(root, model, data, "fsdp", "fsdp"),
    }


def test_fsdp_trains_the_same_lora_as_ddp_holding_half_the_model(runs):
    (ddp_out, ddp), (fsdp_out, sharded) = runs["ddp"], runs["fsdp"]
    assert sharded["distributed"] == "fsdp" and sharded["in_sync"]
    assert sharded["final_loss"] == pytest.approx(ddp["final_loss"], rel=1e-5)
    for name, tensors in last_weights(fsdp_out).items():
        expected = last_weights(ddp_out)[name]
        assert tensors.keys() == expected.keys()
        for key, value in tensors.items():
            assert torch.allclose(value, expected[key], atol=1e-6), (name, key)
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if ".lora_B." in k)
    whole = ddp["parameters_per_process"]
    assert whole[0] == whole[1] > 0
    # each process holds its half (+ padding of uneven splits) of every parameter
    assert all(n <= 0.55 * whole[0] for n in sharded["parameters_per_process"])


def test_fsdp_resumes_exactly(runs):
    original, _ = runs["fsdp"]
    copy = runs["root"] / "fsdp-resumed"
    shutil.copytree(original, copy)
    shutil.rmtree(list_checkpoints(copy)[-1][1])  # as if killed just before step 6's save
    (copy / "train.json").unlink()
    out, summary = train(runs["root"], runs["model"], runs["data"], copy.name, "fsdp")
    assert summary["resumed"] is True
    for name in WEIGHTS:
        folder = list_checkpoints(out)[-1][1]
        assert (folder / name).read_bytes() == (
            list_checkpoints(original)[-1][1] / name
        ).read_bytes()


def test_fsdp_over_a_float8_base(runs):
    _, summary = train(runs["root"], runs["model"], runs["data"], "fsdp-fp8", "fsdp", "fp8")
    assert summary["in_sync"] and summary["final_loss"] == pytest.approx(
        runs["fsdp"][1]["final_loss"], rel=0.05
    )
    assert all(
        n <= 0.55 * runs["ddp"][1]["parameters_per_process"][0]
        for n in summary["parameters_per_process"]
    )


def test_fsdp_settings_that_cannot_work_are_refused(params):
    base = params.model_dump(mode="json")
    with pytest.raises(ParamsError, match="optimizer: adamw"):
        validate_params(
            {**base, "train": {**base["train"], "distributed": "fsdp", "optimizer": "prodigy"}}
        )
    with pytest.raises(ParamsError, match="lora.train_text_encoder: false"):
        validate_params(
            {
                **base,
                "train": {**base["train"], "distributed": "fsdp"},
                "lora": {**base["lora"], "train_text_encoder": True},
            }
        )
    with pytest.raises(ParamsError, match="bitsandbytes"):
        validate_params(
            {
                **base,
                "train": {**base["train"], "distributed": "fsdp"},
                "model": {**base["model"], "quantize": "nf4"},
            }
        )


def test_fsdp_over_a_float8_base_with_a_decoded_image_term(runs, tmp_path):
    """The LPIPS term (decoding through the unsharded VAE) under FSDP on a float8 base: both
    processes log it and end in sync."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    backbone = tmp_path / "squeezenet_random.pth"  # a random loss network: a test fixture
    torch.save(tvm.squeezenet1_1(weights=None).state_dict(), backbone)
    losses = {"lpips": {"weight": 0.5, "net": "squeeze", "backbone": str(backbone)}}
    out, summary = train(
        runs["root"], runs["model"], runs["data"], "fsdp-lpips", "fsdp", "fp8", losses
    )
    assert summary["in_sync"] and summary["processes"] == 2
    header, *rows = (out / "log.csv").read_text().splitlines()
    assert header.split(",")[-2:] == ["flow_matching", "lpips"]
    assert len(rows) == 6 and all(row.split(",")[-1] != "" for row in rows)
