"""LoRA target modules for the supported diffusers transformers, as exact module names.

Every name returned here is fully qualified (``transformer_blocks.3.attn.to_q``,
``single_transformer_blocks.0.attn.to_out``), so peft's ``LoraConfig(target_modules=...)`` never
falls back on ambiguous suffix matching. (A bare ``"to_out"`` also matches the ``attn.to_out``
ModuleList of Flux2's double-stream blocks, and peft then fails: it cannot wrap a ModuleList.)

Block indices (the ``blocks`` preset, and ``blocks=`` with a custom list) count the blocks in the
order the forward pass runs them: the double-stream blocks first, then the single-stream blocks.
For FLUX.2 Klein 9B (8 double + 24 single blocks) index 7 is ``transformer_blocks.7`` and index
12 is ``single_transformer_blocks.4``; the valid range is ``0 .. num_layers + num_single_layers
- 1``. Qwen-Image has double-stream blocks only, so there an index is the block index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from facelora.errors import SettingsError
from facelora.registry.families import DOUBLE, SINGLE, Preset, family_of_class
from facelora.registry.families import family as get_family

# The presets and block Linears of each family are family facts: facelora.registry.families.

_QUALIFIED = re.compile(rf"^({SINGLE}|{DOUBLE})\.(\d+)\.(.+)$")


def check_family(family: str) -> None:
    get_family(family)  # refuses an unknown name, listing the valid ones


def _block_names(num_layers: int, num_single_layers: int) -> list[tuple[str, int]]:
    """(stack, index) for every block, in forward order: global index = list position."""
    return [(DOUBLE, i) for i in range(num_layers)] + [
        (SINGLE, i) for i in range(num_single_layers)
    ]


def describe_block(index: int, num_layers: int, num_single_layers: int = 0) -> str:
    """The module path of global block `index` (double blocks first, then single blocks)."""
    stack, i = _block_names(num_layers, num_single_layers)[
        _check_blocks([index], num_layers, num_single_layers)[0]
    ]
    return f"{stack}.{i}"


def _check_blocks(blocks: Iterable[int], num_layers: int, num_single_layers: int) -> list[int]:
    total = num_layers + num_single_layers
    blocks = list(blocks)
    if not blocks:
        raise SettingsError("blocks is empty: give at least one block index")
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int):
            raise SettingsError(f"block index {b!r} is not an integer")
        if not 0 <= b < total:
            layout = f"{num_layers} double-stream"
            if num_single_layers:
                layout += (
                    f" (0-{num_layers - 1}) then {num_single_layers} single-stream "
                    f"({num_layers}-{total - 1})"
                )
            raise SettingsError(
                f"block index {b} is out of range: valid 0-{total - 1} ({layout} blocks)"
            )
    return sorted(set(blocks))


def _resolve_custom(family: str, names: Sequence[str]) -> tuple[Preset, dict[str, set[int]]]:
    """Block-relative names per stack, plus explicit (fully qualified) indices per name."""
    known = get_family(family).block_linears
    double: list[str] = []
    single: list[str] = []
    qualified: dict[str, set[int]] = {}
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise SettingsError(f"module name {name!r} is not a non-empty string")
        m = _QUALIFIED.match(name)
        if m:
            stack, index, rel = m.group(1), int(m.group(2)), m.group(3)
            if rel not in known[stack]:
                raise SettingsError(
                    f"module {name!r} is not a LoRA-able Linear of {family}'s {stack}; "
                    f"valid: {', '.join(known[stack]) or 'none (no such blocks)'}"
                )
            qualified.setdefault(name, set()).add(index)
            continue
        hits = {
            stack: [p for p in rels if p == name or p.endswith("." + name)]
            for stack, rels in known.items()
        }
        if not any(hits.values()):
            near = [p for rels in known.values() for p in rels if name in p.split(".")]
            hint = f"; did you mean {', '.join(repr(p) for p in near)}?" if near else ""
            raise SettingsError(
                f"custom module name {name!r} matches no LoRA-able Linear of {family} "
                f"(block Linears: {', '.join(sorted({p for r in known.values() for p in r}))})"
                f"{hint}"
            )
        double += [p for p in hits[DOUBLE] if p not in double]
        single += [p for p in hits[SINGLE] if p not in single]
    return Preset(tuple(double), tuple(single)), qualified


def target_modules(
    family: str,
    preset: str | Sequence[str],
    num_layers: int,
    num_single_layers: int = 0,
    blocks: Sequence[int] | None = None,
) -> list[str]:
    """Fully qualified module names for `preset` (a preset name or a custom list of names).

    A custom list may hold block-relative names or suffixes (``"to_q"``, ``"attn.to_out.0"``,
    ``"ff.linear_in"``), which apply to every block that has them (or to `blocks` when given),
    and fully qualified names (``"transformer_blocks.3.attn.to_q"``), kept as they are.
    Suffixes match LoRA-able Linears only: in Flux2 ``"to_out"`` is the single blocks'
    ``attn.to_out``; the double blocks' output projection is ``"to_out.0"``.
    Names come in forward order: block by block, in the preset's order inside a block.
    """
    check_family(family)
    if num_layers < 0 or num_single_layers < 0:
        raise SettingsError("num_layers and num_single_layers must be >= 0")
    if num_single_layers and not get_family(family).block_linears[SINGLE]:
        raise SettingsError(f"{family} has no single-stream blocks: num_single_layers must be 0")
    presets = get_family(family).presets
    qualified: dict[str, set[int]] = {}
    if isinstance(preset, str):
        if preset not in presets:
            raise SettingsError(
                f"unknown LoRA preset {preset!r} for {family}; valid: {', '.join(presets)}, "
                "or a list of module names"
            )
        spec = presets[preset]
        label = f"preset {preset!r}"
        if spec.needs_blocks and blocks is None:
            raise SettingsError(f"{label} needs blocks=[...] (block indices, e.g. [7, 12, 16, 20])")
        if not spec.needs_blocks and blocks is not None:
            raise SettingsError(
                f"blocks= is not used by {label}; use the 'blocks' preset or a custom list"
            )
    else:
        names = list(preset)
        if not names:
            raise SettingsError("the custom list of module names is empty")
        spec, qualified = _resolve_custom(family, names)
        label = "the custom list"

    selected = (
        _check_blocks(blocks, num_layers, num_single_layers)
        if blocks is not None
        else range(num_layers + num_single_layers)
    )
    layout = _block_names(num_layers, num_single_layers)
    out: list[str] = []
    for g in selected:
        stack, i = layout[g]
        rels = spec.double if stack == DOUBLE else spec.single
        out += [f"{stack}.{i}.{rel}" for rel in rels]
    for name, indices in qualified.items():
        stack = _QUALIFIED.match(name).group(1)  # type: ignore[union-attr]
        count = num_layers if stack == DOUBLE else num_single_layers
        for index in indices:
            if index >= count:
                valid = f"valid 0-{count - 1}" if count else f"this model has no {stack}"
                raise SettingsError(
                    f"module {name!r}: {stack} index {index} is out of range ({valid})"
                )
        if name not in out:
            out.append(name)
    if not out:
        raise SettingsError(
            f"{label} targets no module with num_layers={num_layers}, "
            f"num_single_layers={num_single_layers}, blocks={blocks}"
        )
    return out


def model_family(model: nn.Module) -> str | None:
    """The family whose diffusers class `model` is, or None."""
    found = family_of_class(type(model).__name__)
    return found.name if found else None


def target_modules_for(
    model: nn.Module,
    family: str,
    preset: str | Sequence[str],
    blocks: Sequence[int] | None = None,
) -> list[str]:
    """`target_modules` with the layer counts of `model.config`, each name checked on `model`.

    Raises ValueError naming the first module that is missing from ``model.named_modules()``
    or is not an ``nn.Linear``.
    """
    check_family(family)
    actual = model_family(model)
    if actual is not None and actual != family:
        raise SettingsError(
            f"model is a {type(model).__name__} (family {actual}), "
            f"not a {get_family(family).transformer_class}"
        )
    config = getattr(model, "config", None)
    if config is None or "num_layers" not in config:
        raise SettingsError(f"{type(model).__name__} has no diffusers config with num_layers")
    names = target_modules(
        family,
        preset,
        num_layers=int(config["num_layers"]),
        num_single_layers=int(config.get("num_single_layers", 0) or 0),
        blocks=blocks,
    )
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if module is None:
            raise SettingsError(
                f"module {name!r} is not in {type(model).__name__} (family {family}; "
                f"expected class {get_family(family).transformer_class})"
            )
        if not isinstance(module, nn.Linear):
            raise SettingsError(
                f"module {name!r} is a {type(module).__name__}, not an nn.Linear: "
                "peft cannot put a LoRA on it"
            )
    return names


def family_of_config(config: Mapping[str, Any]) -> str | None:
    """The family of a transformer config.json (by its diffusers `_class_name`), or None."""
    found = family_of_class(config.get("_class_name"))
    return found.name if found else None
