"""The settings a command reads, declared once and held to.

Each `facelora` command declares the params.yaml keys it reads (facelora.workflow.cli). That
declaration is the rule's rerun trigger (`command_settings` in the Snakefile), the agreement
test compares it with the DVC stage's `params:`, and while the command runs it sees its
settings through `DeclaredParams`, which refuses any key it did not declare. So a declaration
cannot drift from the code: a command that starts reading a new section fails its tests until
the section is declared (and thereby reruns its rule when it changes).

Keys are top-level sections (`faces`), dotted sub-keys (`captions.trigger`), or `phase`: the
entry of the phase the job runs (and the phase order), so that one phase's change reruns that
phase's jobs only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

PHASE = "phase"  # this job's phase entry (+ the phase order): a finer key than `phases`

# What Params' helper methods read, in declaration keys.
METHOD_READS: dict[str, tuple[str, ...]] = {
    "phase": (PHASE,),
    "phase_names": (PHASE,),
    "checkpoint_steps": (PHASE, "train.save_every"),
    "eval_groups": (PHASE, "train.save_every", "eval.checkpoints_per_job"),
    "train_gpus": (PHASE, "resources.train.gpus"),
}


class UndeclaredSetting(AttributeError):
    """A command read a setting it does not declare: a bug in facelora, not in params.yaml."""


def covered(key: str, declared: Iterable[str]) -> bool:
    """Whether reading `key` is allowed by the declared keys (a key covers its sub-keys)."""
    for d in declared:
        d = "phases" if d == PHASE else d
        if key == d or key.startswith(d + "."):
            return True
        if key == PHASE and d == "phases":
            return True
    return False


def dvc_keys(declared: Iterable[str]) -> set[str]:
    """The DVC `params:` entries a declaration needs (the phase entry lives in `phases`)."""
    return {"phases" if d == PHASE else d for d in declared}


def _dump(obj: Any, declared: frozenset[str], prefix: str) -> dict[str, Any]:
    data = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = prefix + name
        if covered(key, declared):
            out[name] = value
        elif any(d.startswith(key + ".") for d in declared):
            out[name] = _dump(getattr(obj, name), declared, key + ".")
    return out


class DeclaredParams:
    """A read-only view of Params (or a section) that allows only the declared keys."""

    def __init__(self, obj: BaseModel, declared: Iterable[str], command: str, prefix: str = ""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_declared", frozenset(declared))
        object.__setattr__(self, "_command", command)
        object.__setattr__(self, "_prefix", prefix)

    def _refuse(self, key: str) -> UndeclaredSetting:
        listed = ", ".join(sorted(self._declared)) or "nothing"
        return UndeclaredSetting(
            f"facelora {self._command} read the setting {key!r} but declares only {listed}: "
            f"add it to the command's reads in facelora.workflow.cli"
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # dunder look-ups (pickle, copy) and the view's own fields
            raise AttributeError(name)
        obj = self._obj
        key = self._prefix + name
        if name in type(obj).model_fields:
            value = getattr(obj, name)
            if covered(key, self._declared):
                return value
            if any(d.startswith(key + ".") for d in self._declared):
                return DeclaredParams(value, self._declared, self._command, key + ".")
            raise self._refuse(key)
        if not self._prefix and name in METHOD_READS:
            for needed in METHOD_READS[name]:
                if not covered(needed, self._declared):
                    raise self._refuse(f"{needed} (through Params.{name})")
            return getattr(obj, name)
        if name == "model_dump":
            return lambda mode="json", **_: _dump(obj, self._declared, self._prefix)
        if name.startswith("model_"):
            raise self._refuse(f"{self._prefix or 'Params.'}{name}")
        return getattr(obj, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"settings are read-only here ({self._command}: {name})")

    def __repr__(self) -> str:
        return f"DeclaredParams({self._command}: {sorted(self._declared)})"
