import pytest
import yaml

from facelora.config import Params, ParamsError, load_params, validate_params
from facelora.workflow.rules import load_workflow_params

from helpers import ROOT


def _flat(data, prefix=""):
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_params_yaml_is_valid_and_documents_the_defaults():
    """params.yaml spells out every default; it departs from the schema only where the demo's
    tiny model needs it (and says so in its comment)."""
    on_disk = _flat(load_params(ROOT / "params.yaml").model_dump(mode="json"))
    defaults = _flat(Params().model_dump(mode="json"))
    differs = {k for k in defaults if on_disk[k] != defaults[k]}
    assert differs == {
        "train.resolution",
        "eval.resolution",
        "eval.steps",
        "eval.checkpoints_per_job",
        "synthesis.kinds",
    }
    for key in ("resolution:", "steps: 8", "checkpoints_per_job:", "kinds:"):
        for line in (ROOT / "params.yaml").read_text().splitlines():
            if line.strip().startswith(key):
                assert "recipe:" in line and "demo" in line, line


def test_every_params_yaml_setting_has_a_comment_nearby():
    """Each top-level section of params.yaml is introduced or followed by a comment."""
    text = (ROOT / "params.yaml").read_text()
    for key in Params.model_fields:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{key}:"))
        following = text.split(line, 1)[1].splitlines()[:3]
        assert "#" in line or any("#" in ln for ln in following), key


def test_dvc_writes_numbers_as_strings_and_they_load_as_floats(tmp_path):
    # `dvc exp run -S lr=5e-5` writes `lr: 5e-05`, which YAML 1.1 reads as a string
    (tmp_path / "params.yaml").write_text("lr: 5e-05\ncrop:\n  padding: 9e-1\n")
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["lr"] == "5e-05"
    params = load_params(tmp_path / "params.yaml")
    assert params.lr == pytest.approx(5e-5) and isinstance(params.lr, float)
    assert params.crop.padding == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"crop": {"padding": -1}}, "crop.padding"),
        ({"lr": "fast"}, "lr"),
        ({"faces": {"backend": "opencv"}}, "faces.backend"),
        ({"faces": {"dlib": {"upsample": 5}}}, "faces.dlib.upsample"),
        ({"captions": {"trigger": "two words"}}, "captions.trigger"),
        ({"pairs": {"require": {"identity_sim": {}}}}, "pairs.require.identity_sim"),
        ({"pairs": {"require": {"not_a_score": {"min": 1}}}}, "pairs.require.not_a_score"),
        ({"phases": [{"name": "Bad Name", "steps": 1}]}, "phases[0].name"),
        ({"phases": [{"name": "a", "steps": 0}]}, "phases[0].steps"),
        (
            {"phases": [{"name": "a", "steps": 1, "top": {"k": 3, "fraction": 0.5}}]},
            "phases[0].top",
        ),
        ({"crop": {"paddding": 0.4}}, "crop.paddding"),
    ],
)
def test_one_clear_error_naming_the_key(raw, key):
    with pytest.raises(ParamsError) as info:
        validate_params(raw)
    message = str(info.value)
    assert f"  {key}:" in message or f"  {key}" in message, message
    assert "Traceback" not in message


def test_unknown_keys_are_reported_as_typos():
    with pytest.raises(ParamsError, match=r"crop\.paddding: unknown setting"):
        validate_params({"crop": {"paddding": 0.4}})


def test_all_bad_values_are_reported_at_once():
    with pytest.raises(ParamsError) as info:
        validate_params({"lr": -1, "seed": "x", "crop": {"min_side": 0}})
    message = str(info.value)
    assert "3 bad value(s)" in message
    for key in ("lr", "seed", "crop.min_side"):
        assert f"  {key}:" in message


def test_first_phase_cannot_start_from_a_previous_phase():
    with pytest.raises(ParamsError, match="phases\\[0\\].init_from"):
        validate_params({"phases": [{"name": "a", "steps": 10, "init_from": "best"}]})


def test_phase_names_must_be_unique():
    phases = [{"name": "a", "steps": 1}, {"name": "a", "steps": 2, "init_from": "last"}]
    with pytest.raises(ParamsError, match="repeated: a"):
        validate_params({"phases": phases})


def test_crop_output_side_must_be_a_multiple():
    with pytest.raises(ParamsError, match="multiple of crop.size_multiple"):
        validate_params({"crop": {"output_side": 1000}})


def test_missing_and_broken_files_give_one_message(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_same_person_threshold_follows_the_embedder():
    assert Params().faces.same_person == 0.92
    p = validate_params({"faces": {"backend": "insightface"}})
    assert p.faces.same_person == 0.40
    p = validate_params({"faces": {"backend": "ultralytics", "ultralytics": {"embedder": "dlib"}}})
    assert p.faces.same_person == 0.92
    assert validate_params({"faces": {"same_person_similarity": 0.5}}).faces.same_person == 0.5


def test_snakemake_config_overrides_are_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("lr: 1.0e-4\n")
    assert load_workflow_params({"lr": 1e-4}, str(path)).lr == 1e-4
    with pytest.raises(ParamsError, match="changed lr"):
        load_workflow_params({"lr": 5e-5}, str(path))


def test_lora_follows_the_family_recipe_unless_set():
    qwen = validate_params({}).lora
    assert (qwen.preset, qwen.rank, qwen.alpha) == ("full", 64, 128.0)
    klein = validate_params({"model": {"family": "flux2_klein"}}).lora
    assert (klein.preset, klein.rank, klein.alpha) == ("double_stream", 128, 64.0)
    custom = validate_params(
        {
            "model": {"family": "flux2_klein"},
            "lora": {"preset": "blocks", "blocks": [1], "rank": 8, "alpha": 3},
        }
    )
    assert (custom.lora.preset, custom.lora.rank, custom.lora.alpha) == ("blocks", 8, 3.0)
