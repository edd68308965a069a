"""Shared fixtures: the tiny models and the sample dataset (built once), real photos from
../shared/faces, the data half run on the sample. Helpers live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facelora.config import Params

from helpers import SHARED_FACES, run_data_half


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Both tiny edit models (seed 0), built once for the session: treat them as read-only."""
    from facelora.models.tiny import FAMILIES, make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {family: make_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    if not (SHARED_FACES / "same_person").is_dir():
        pytest.skip(f"real photos not found at {SHARED_FACES} (set FACELORA_SHARED_FACES)")
    return SHARED_FACES


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
