"""Where a phase's LoRA starts: nothing, a file, or the previous phase's best or last checkpoint.

`best` is the checkpoint the evaluation chose for the previous phase
(`results/eval/phases/<phase>/best.json`); until that phase has been evaluated, the last checkpoint
is used and the choice is logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from facelora.config import Params
from facelora.errors import MissingInput
from facelora.models.lora_io import DIFFUSERS_WEIGHTS
from facelora.registry.layout import Layout
from facelora.train.checkpoint import list_checkpoints

log = logging.getLogger(__name__)


def resolve_init(params: Params, phase: str, layout: Layout) -> Path | None:
    """The LoRA file phase `phase` starts from (phases[].init_from), or None."""
    setting = params.phase(phase).init_from
    if setting == "none":
        return None
    if setting not in ("best", "last"):
        path = Path(setting)
        if not path.is_file():
            raise MissingInput(f"phases[{phase}].init_from: {path} not found")
        return path
    names = params.phase_names
    previous = names[names.index(phase) - 1]
    if setting == "best":
        choice = Path(layout.best(previous))
        if choice.is_file():
            return Path(json.loads(choice.read_text())["lora"])
        log.info(
            "phase %s: %s has no evaluation yet, starting from its last checkpoint", phase, previous
        )
    found = list_checkpoints(Path(layout.train_dir(previous)))
    if not found:
        raise MissingInput(
            f"phase {phase} starts from phase {previous}, which has no checkpoint in "
            f"{layout.train_dir(previous)}: train {previous} first"
        )
    return found[-1][1] / DIFFUSERS_WEIGHTS
