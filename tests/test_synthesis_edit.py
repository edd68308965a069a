"""The edit kind's local generator (diffusers) on the tiny pipelines, then end to end.

DiffusersEditor: the asked size, the same bytes for the same request (across instances and
threads), request keys that follow what decides the answer, clear errors for a wrong folder.
End to end: `facelora synthesize edit` on real photos writes the generator's edits resized to
the crop, with provenance, and a rerun generates nothing (the request cache).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from facelora.config import GeneratorParams, validate_params
from facelora.errors import ModelFileMissing, SettingsError
from facelora.models import editor as editor_module
from facelora.models.editor import DiffusersEditor, model_fingerprint
from facelora.prepare.synthesis.made import read_manifest
from facelora.prepare.synthesis.requests import EditAnswer

from helpers import BIN, FAMILIES, smooth_image

INSTRUCTION = "make the person smile"


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def crop() -> bytes:
    return _png(smooth_image(np.random.default_rng(5), size=128))


def _settings(model: Path | None, **changes) -> GeneratorParams:
    folder = None if model is None else str(model)
    fields = {"backend": "diffusers", "model": folder, "size": 64, "steps": 2, **changes}
    return GeneratorParams(**fields)


def _editor(model: Path, **changes) -> DiffusersEditor:
    return DiffusersEditor(_settings(model, **changes), "float32", "cpu")


@pytest.fixture(scope="module")
def editors(tiny_models) -> dict[str, DiffusersEditor]:
    """One loaded editor per family, shared by the tests of this module."""
    return {family: _editor(tiny_models[family]) for family in FAMILIES}


# --- the generator --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_an_edit_is_the_asked_size_and_the_same_bytes_for_the_same_request(
    editors, tiny_models, crop, family
):
    editor = editors[family]
    first = editor.edit([crop], INSTRUCTION, 1)
    assert first.request_id is None and first.model == tiny_models[family].name
    rgb = _rgb(first.png)
    assert rgb.shape == (64, 64, 3) and rgb.std() > 0
    assert editor.edit([crop], INSTRUCTION, 1).png == first.png
    # a fresh instance (a rerun) gives the same bytes: what the request key promises
    assert _editor(tiny_models[family]).edit([crop], INSTRUCTION, 1).png == first.png
    assert editor.edit([crop], INSTRUCTION, 2).png != first.png
    assert editor.edit([crop], "add a beard", 1).png != first.png
    batch = editor.edit_batch([([crop], INSTRUCTION, 1), ([crop], "add a beard", 1)])
    assert batch[0].png == first.png and batch[1].png != first.png


def test_concurrent_edits_give_the_one_by_one_bytes(editors, crop):
    """The request runner calls edit from several threads: they must not race."""
    editor = editors["flux2_klein"]
    seeds = list(range(4))
    alone = [editor.edit([crop], INSTRUCTION, s).png for s in seeds]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda s: editor.edit([crop], INSTRUCTION, s).png, seeds))
    assert together == alone


def test_the_request_key_follows_what_decides_the_answer(tiny_models, crop, tmp_path):
    qwen = tiny_models["qwen_image_edit"]
    key = _editor(qwen).request_key([crop], INSTRUCTION, 1)
    assert _editor(qwen).request_key([crop], INSTRUCTION, 1) == key  # stable across instances
    assert len(key) == 64 and int(key, 16) >= 0
    others = {
        "seed": _editor(qwen).request_key([crop], INSTRUCTION, 2),
        "instruction": _editor(qwen).request_key([crop], "add a beard", 1),
        "image": _editor(qwen).request_key([crop + b"\0"], INSTRUCTION, 1),
        "size": _editor(qwen, size=128).request_key([crop], INSTRUCTION, 1),
        "steps": _editor(qwen, steps=3).request_key([crop], INSTRUCTION, 1),
        "guidance": _editor(qwen, guidance=None).request_key([crop], INSTRUCTION, 1),
        "model": _editor(tiny_models["flux2_klein"]).request_key([crop], INSTRUCTION, 1),
        "dtype": DiffusersEditor(_settings(qwen), "bfloat16", "cpu").request_key(
            [crop], INSTRUCTION, 1
        ),
    }
    assert all(k != key for k in others.values()), [n for n, k in others.items() if k == key]
    # what changes nothing the generator sees: the batch size, the runner's settings
    same = _editor(qwen, batch_size=2, concurrency=1, retries=0)
    assert same.request_key([crop], INSTRUCTION, 1) == key
    # the folder's content, not only its path: one changed weight byte changes the key
    copy = tmp_path / "copy"
    shutil.copytree(qwen, copy)
    before = _editor(copy).request_key([crop], INSTRUCTION, 1)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert _editor(copy).request_key([crop], INSTRUCTION, 1) != before


def test_the_fingerprint_of_big_files_reads_their_header_and_samples(tmp_path, monkeypatch):
    """Weights bigger than FULL_HASH_BYTES are not hashed whole: the safetensors header plus
    three samples decide, and a new file time does not."""
    from safetensors.numpy import save_file

    monkeypatch.setattr(editor_module, "FULL_HASH_BYTES", 1024)
    monkeypatch.setattr(editor_module, "SAMPLE_BYTES", 256)
    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    weights = folder / "transformer" / "model.safetensors"
    values = np.arange(20_000, dtype=np.float32)
    save_file({"w": values}, str(weights))
    first = model_fingerprint(folder)
    weights.touch()
    assert model_fingerprint(folder) == first
    save_file({"w": values + 1}, str(weights))  # same header, other weights
    assert model_fingerprint(folder) != first
    save_file({"w": values, "b": values[:4]}, str(weights))
    assert model_fingerprint(folder) != first
    (folder / ".cache").mkdir()
    (folder / ".cache" / "note").write_text("download notes")
    save_file({"w": values}, str(weights))
    assert model_fingerprint(folder) == first  # hidden entries are not the model


def test_a_folder_that_is_no_pipeline_is_named(tmp_path):
    with pytest.raises(ModelFileMissing, match=r"synthesis\.generator\.model = .*model_index"):
        _editor(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(SettingsError, match=r"synthesis\.generator\.model = .*FluxPipeline"):
        _editor(tmp_path)
    with pytest.raises(SettingsError, match=r"synthesis\.generator\.model is not set"):
        DiffusersEditor(_settings(None), "float32", "cpu")


def test_a_size_the_pipelines_cannot_make_is_refused(tiny_models):
    with pytest.raises(SettingsError, match=r"synthesis\.generator\.size = 100.*16"):
        _editor(tiny_models["flux2_klein"], size=100)


def test_make_editor_gives_the_data_half_its_answers(tiny_models, crop):
    from facelora.prepare.synthesis.openai_api import OpenAIImageEditor
    from facelora.workflow.editors import LocalEditor, make_editor

    model = str(tiny_models["flux2_klein"])
    generator = {"backend": "diffusers", "model": model, "size": 64, "steps": 2}
    params = validate_params({"synthesis": {"generator": generator}, "model": {"device": "auto"}})
    local = make_editor(params)
    assert isinstance(local, LocalEditor) and local.secrets == ()
    answer = local.edit([crop], INSTRUCTION, 1)
    assert isinstance(answer, EditAnswer) and answer.to_answer().payload == answer.png
    assert answer.png == _editor(tiny_models["flux2_klein"]).edit([crop], INSTRUCTION, 1).png
    assert local.request_key([crop], INSTRUCTION, 1) == local.generator.request_key(
        [crop], INSTRUCTION, 1
    )
    api = validate_params(
        {"synthesis": {"generator": {"backend": "openai", "model": "gpt-image-1"}}}
    )
    assert isinstance(make_editor(api), OpenAIImageEditor)


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_people(shared_faces, tmp_path_factory) -> Path:
    flat = tmp_path_factory.mktemp("edit-photos")
    for person in ("obama", "biden"):
        for photo in sorted((shared_faces / "same_person" / person).iterdir()):
            shutil.copy(photo, flat / f"{person}__{photo.name}")
    return flat


@pytest.mark.shared_faces
def test_synthesize_edit_with_the_local_pipeline_and_a_rerun_generates_nothing(
    tiny_models, two_people, tmp_path, monkeypatch
):
    from facelora.workflow import cli

    qwen = tiny_models["qwen_image_edit"]
    generator = {"backend": "diffusers", "model": str(qwen), "size": 64, "steps": 2}
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "crop": {"min_side": 128},  # the shared photos are web-sized
                "synthesis": {
                    "kinds": ["edit"],
                    "instructions": [INSTRUCTION],
                    "generator": generator,
                },
            }
        )
    )
    out = tmp_path / "edit"
    command = ["--params", str(params), "synthesize", "edit", str(two_people), "--out", str(out)]
    done = subprocess.run(
        [str(BIN / "facelora"), *command], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(read_manifest(out / "manifest.jsonl"))
    assert len(rows) >= 4 and all(r["status"] == "ok" for r in rows), rows
    editor = _editor(qwen)
    for row in rows:
        assert row["generator"] == "diffusers" and row["model"] == str(qwen)
        assert row["instruction"] == INSTRUCTION and row["request_ids"] == []
        start = (out / row["start"]).read_bytes()  # the crop itself (linked, not re-encoded)
        assert row["request_key"] == editor.request_key([start], INSTRUCTION, row["seed"])
        made = _rgb(editor.edit([start], INSTRUCTION, row["seed"]).png)
        side = _rgb(start).shape[0]
        expected = cv2.resize(made, (side, side), interpolation=cv2.INTER_CUBIC)
        assert np.array_equal(_rgb((out / row["end"]).read_bytes()), expected)
    entries = sorted((out / ".cache").glob("??/*.json"))
    assert len(entries) == len(rows)
    written = {p: p.stat().st_mtime_ns for p in entries}

    # the rerun, in-process so that generations can be counted: every answer is cached,
    # so the pipeline is not even loaded
    calls = {"edit": 0, "load": 0}
    real_edit, real_load = DiffusersEditor.edit, DiffusersEditor._pipeline

    def counted_edit(self, *args, **kwargs):
        calls["edit"] += 1
        return real_edit(self, *args, **kwargs)

    def counted_load(self):
        calls["load"] += 1
        return real_load(self)

    monkeypatch.setattr(DiffusersEditor, "edit", counted_edit)
    monkeypatch.setattr(DiffusersEditor, "_pipeline", counted_load)
    before = [(r["pair"], r["sha256"]) for r in rows]
    assert cli.main(command) == 0
    assert calls == {"edit": 0, "load": 0}
    again = list(read_manifest(out / "manifest.jsonl"))
    assert [(r["pair"], r["sha256"]) for r in again] == before
    assert {p: p.stat().st_mtime_ns for p in entries} == written
