"""Each command reads only the settings it declares (facelora.workflow.declared)."""

from __future__ import annotations

import pickle

import pytest

from facelora.config import Params
from facelora.workflow.cli import COMMANDS, reads_of
from facelora.workflow.declared import PHASE, DeclaredParams, UndeclaredSetting, covered, dvc_keys


def test_undeclared_sections_are_refused_by_name():
    view = DeclaredParams(Params(), ("faces", "captions.trigger"), "demo")
    assert view.faces.backend == Params().faces.backend
    assert view.captions.trigger == "EDITFACE"
    with pytest.raises(UndeclaredSetting, match=r"read the setting 'captions\.default_change'"):
        _ = view.captions.default_change
    with pytest.raises(UndeclaredSetting, match=r"'lora'"):
        _ = view.lora
    with pytest.raises(AttributeError, match="read-only"):
        view.faces = None


def test_helpers_need_what_they_read():
    view = DeclaredParams(Params(), (PHASE,), "demo")
    assert view.phase_names == Params().phase_names
    with pytest.raises(UndeclaredSetting, match=r"train\.save_every.*checkpoint_steps"):
        view.checkpoint_steps("broad")
    full = DeclaredParams(Params(), (PHASE, "train.save_every"), "demo")
    assert full.checkpoint_steps("broad") == Params().checkpoint_steps("broad")


def test_the_dump_holds_only_the_declared_keys():
    view = DeclaredParams(Params(), ("seed", "captions.trigger"), "demo")
    assert view.model_dump(mode="json") == {"seed": 42, "captions": {"trigger": "EDITFACE"}}


def test_a_view_survives_pickling_for_worker_processes():
    view = DeclaredParams(Params(), ("images",), "detect")
    back = pickle.loads(pickle.dumps(view))
    assert back.images == Params().images
    with pytest.raises(UndeclaredSetting):
        _ = back.faces


def test_keys_and_dvc_entries():
    assert covered("train.save_every", {"train"}) and not covered("train", {"train.save_every"})
    assert covered(PHASE, {"phases"}) and covered("phases", {PHASE})
    assert dvc_keys({PHASE, "eval"}) == {"phases", "eval"}


def test_every_declared_key_exists_in_the_schema():
    data = Params().model_dump(mode="json")
    for name, command in COMMANDS.items():
        for key in (command.reads or ()) + command.uses:
            if key == PHASE:
                continue
            node = data
            for part in key.split("."):
                assert part in node, f"facelora {name} declares {key}: no such setting"
                node = node[part]
    assert reads_of("final") and "captions.trigger" in reads_of("final")
