"""Shared fixtures: the tiny models and the sample dataset (built once), real photos from
../shared/faces, the data half run on the sample; where ../shared/comfyui is. Helpers live in
helpers.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facelora.config import Params

from helpers import SHARED_COMFYUI, SHARED_FACES, run_data_half


@pytest.fixture(scope="module")
def offline():
    """No download may be attempted from the hub (local loads use local_files_only too)."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Both tiny edit models (seed 0), built once for the session: treat them as read-only."""
    from facelora.models.tiny import make_tiny_model
    from facelora.registry.families import FAMILY_NAMES

    root = tmp_path_factory.mktemp("tiny-models")
    return {family: make_tiny_model(family, root / family) for family in FAMILY_NAMES}


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    if not (SHARED_FACES / "same_person").is_dir():
        pytest.skip(f"real photos not found at {SHARED_FACES} (set FACELORA_SHARED_FACES)")
    return SHARED_FACES


COMFYUI_ARCHIVE = "comfyui-fe25114.tar.xz"
COMFYUI_NEEDS = ("einops", "torchsde", "trampoline", "comfy_aimdo")  # the `dev` extra has them


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """ComfyUI's `comfy` package, imported from the archive in ../shared/comfyui, extracted
    into a temporary folder (CPU only). Its modules stay imported for the session."""
    import importlib
    import sys
    import tarfile

    archive = SHARED_COMFYUI / COMFYUI_ARCHIVE
    if not archive.is_file():
        pytest.skip(f"ComfyUI source not found at {archive} (set FACELORA_SHARED_COMFYUI)")
    for name in COMFYUI_NEEDS:
        pytest.importorskip(name, reason=f"ComfyUI needs {name}: pip install -e '.[dev]'")
    root = tmp_path_factory.mktemp("comfyui")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    source = root / "ComfyUI"
    if not (source / "comfy" / "lora.py").is_file():
        pytest.fail(f"{archive} holds no ComfyUI/comfy/lora.py")
    sys.path.append(str(source))  # appended: its top-level modules shadow nothing installed
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    used = ("model_management", "lora", "lora_convert", "model_patcher", "sd", "supported_models")
    for module in (*used, "utils"):
        importlib.import_module(f"comfy.{module}")
    where = Path(comfy.lora.__file__).resolve()  # `comfy` is a namespace package: no __file__
    if not where.is_relative_to(source.resolve()):
        pytest.fail(f"imported another ComfyUI ({where}), not the one from {archive}")
    return comfy


@pytest.fixture(scope="session")
def sample_raw(tmp_path_factory) -> Path:
    """The demo dataset, built once per test session (about 7 s)."""
    from facelora.prepare.sample_data import build_sample_data

    dest = tmp_path_factory.mktemp("sample") / "raw"
    build_sample_data(dest)
    return dest


@pytest.fixture(scope="session")
def astronaut_portrait(sample_raw) -> np.ndarray:
    """An upright RGB portrait with one clear face (about 2200 px)."""
    return np.asarray(Image.open(sample_raw / "kontext" / "astronaut_glasses_start.jpg"))


@pytest.fixture
def params() -> Params:
    return Params()


@pytest.fixture(scope="session")
def demo_results(sample_raw, tmp_path_factory) -> Path:
    """The data half run once, in-process, on the sample dataset with default params."""
    return run_data_half(sample_raw, tmp_path_factory.mktemp("demo") / "results", Params())
