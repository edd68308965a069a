"""environment.yml (clusters) and pyproject.toml (pip) list the same packages."""

import re
import tomllib

import yaml

from helpers import ROOT


def _norm(spec: str) -> str:
    return re.sub(r"\s+", "", spec).lower().replace("_", "-")


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_norm(p) for p in pip if not p.startswith("-e")}
    assert listed == {_norm(p) for p in project["dependencies"]}
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.split("=")[1] in project["requires-python"]


def test_torch_and_torchvision_are_pinned_together():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps
    assert "torch==2.14.1 torchvision==0.29.1" in (ROOT / "Makefile").read_text()
