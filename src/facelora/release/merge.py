"""Merging LoRAs exactly (LoRAShop recipe), optional SVD compression, fusing into the base.

A LoRA changes a Linear by ΔW = (alpha / r) · B @ A (A: r x in, B: out x r). The weighted sum
Σ w_i ΔW_i is itself a LoRA of rank Σ r_i: stack the A's along the rank axis and the scaled
B's (w_i · alpha_i / r_i · B_i) beside each other, and give the result alpha = r (scale 1).
Nothing is approximated, whatever the inputs' ranks, alphas and target sets (a module only
some inputs adapt gets only their terms). `compress` then trades that exactness for a smaller
file: a truncated SVD per module, with the error it makes reported.

peft (and so `pipe.load_lora_weights`) uses one r / lora_alpha for the whole adapter unless
`rank_pattern` / `alpha_pattern` say otherwise; merged modules have different total ranks, so
the saved config lists every module in both patterns (keys `^<module>`, as diffusers writes
them), each with alpha = rank: scale 1 everywhere. The ComfyUI file carries the same numbers
as one `.alpha` per module, in the family's ComfyUI key layout (facelora.models.exports).

Inputs are refused when they were made for different base models: a module with different
in/out features, a different hidden size, module names of another family, or a different
declared family (a checkpoint's meta.json, a merged file's header).
"""

from __future__ import annotations

import collections
import json
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from facelora.errors import MissingInput, SettingsError
from facelora.io import safetensors_io
from facelora.io.atomic import write_json
from facelora.models.exports import COMFYUI_WEIGHTS, from_comfyui, is_comfyui, save_comfyui
from facelora.models.lora_io import DIFFUSERS_PREFIX, DIFFUSERS_WEIGHTS, LoraMismatch
from facelora.models.lora_targets import model_family
from facelora.registry.families import FAMILIES, FAMILY_NAMES, family_of_class

REPORT_NAME = "merge_report.json"
FAMILY_KEY = "facelora_family"  # header entry of merged files: the base model's family
_TENSOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)\.weight$")
_BLOCK = re.compile(r"^(?P<stack>single_transformer_blocks|transformer_blocks)\.\d+\.(?P<rel>.+)$")
_HIDDEN_INPUTS = ("attn.to_q", "attn.to_k", "attn.to_v")  # in_features = the hidden size


@dataclass
class LoraInput:
    """One LoRA file, normalised to module keys with each module's own scale."""

    path: Path
    layout: str  # diffusers | comfyui | bare
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # A, B, alpha / r
    declared_family: str | None = None
    base_model: str | None = None

    def delta(self, name: str) -> torch.Tensor:
        a, b, scale = self.modules[name]
        return scale * (b.double() @ a.double())


@dataclass
class MergedLora:
    """Module -> (A, B) at scale 1: ΔW = B @ A. `report` says where it came from."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    family: str | None = None
    report: dict = field(default_factory=dict)

    def delta(self, name: str) -> torch.Tensor:
        a, b = self.modules[name]
        return b.double() @ a.double()

    def ranks(self) -> dict[str, int]:
        return {name: int(a.shape[0]) for name, (a, _) in self.modules.items()}

    def state(self) -> dict[str, torch.Tensor]:
        """Module-keyed tensors (`<module>.lora_A.weight`), as peft state dicts have them."""
        out = {}
        for name, (a, b) in self.modules.items():
            out[f"{name}.lora_A.weight"] = a.contiguous()
            out[f"{name}.lora_B.weight"] = b.contiguous()
        return out


# --- reading -----------------------------------------------------------------------------


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank/alpha pattern lookup (`get_pattern_key`): the first key matching the end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _declared_family(path: Path, header: dict) -> str | None:
    """The base model's family where a file says it: its header, or its checkpoint's meta.json
    (beside it, or one up for `ema/`)."""
    if header.get(FAMILY_KEY):
        return header[FAMILY_KEY]
    folders = [path.parent] + ([path.parent.parent] if path.parent.name == "ema" else [])
    for folder in folders:
        meta = folder / "meta.json"
        if meta.is_file():
            try:
                family = json.loads(meta.read_text()).get("family")
            except (json.JSONDecodeError, AttributeError):
                continue
            if family:
                return family
    return None


def resolve_path(path: str | Path) -> Path:
    """A LoRA file, or a folder holding one (a checkpoint or merged folder: diffusers file)."""
    path = Path(path)
    if path.is_dir():
        for name in (DIFFUSERS_WEIGHTS, COMFYUI_WEIGHTS):
            if (path / name).is_file():
                return path / name
        raise MissingInput(f"no {DIFFUSERS_WEIGHTS} or {COMFYUI_WEIGHTS} in {path}")
    if not path.is_file():
        raise MissingInput(f"LoRA file not found: {path}")
    return path


def read_input(path: str | Path) -> LoraInput:
    """A LoRA file of either layout -> module-keyed A, B and per-module scale.

    Unlike `lora_io.read_lora` this takes per-module alphas (ComfyUI `.alpha` keys, peft
    `alpha_pattern`), since merged files have them.
    """
    path = resolve_path(path)
    raw = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    config = {}
    if "lora_adapter_metadata" in header:
        stored = json.loads(header["lora_adapter_metadata"])
        config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in stored.items()}
    if config.get("use_dora") or any("lora_magnitude_vector" in k for k in raw):
        raise LoraMismatch(f"{path}: a DoRA adapter: its magnitudes cannot be merged exactly")
    prefixes = {k.split(".", 1)[0] + "." for k in raw}
    if any(p.startswith("text_encoder") for p in prefixes):
        raise LoraMismatch(f"{path}: holds text-encoder tensors; merge takes transformer LoRAs")
    layout = (
        "comfyui" if is_comfyui(raw) else "diffusers" if DIFFUSERS_PREFIX in prefixes else "bare"
    )
    parts: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    tensors, alphas = from_comfyui(raw)  # any layout; the per-module `.alpha` values
    for name, value in tensors.items():
        m = _TENSOR_KEY.match(name)
        if m is None:
            raise LoraMismatch(
                f"{path}: {name} is not a LoRA A/B matrix (a LoRA bias, DoRA magnitude or "
                f"another adapter type?): cannot merge it exactly"
            )
        kind = "A" if m["kind"] in ("lora_A", "lora_down") else "B"
        parts[m["module"]][kind] = value
    if not parts:
        raise LoraMismatch(f"{path}: no LoRA tensors in this file")
    modules = {}
    for name, ab in parts.items():
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            raise LoraMismatch(f"{path}: module {name} has only one of lora_A / lora_B")
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise LoraMismatch(
                f"{path}: module {name} has A {tuple(a.shape)} and B {tuple(b.shape)}: "
                f"not a Linear LoRA (r x in, out x r)"
            )
        r = int(a.shape[0])
        alpha = alphas.get(name)
        if alpha is None:  # no alpha at all: the diffusers convention alpha = r (scale 1)
            alpha = _pattern_value(config.get("alpha_pattern") or {}, name, None)
        if alpha is None:
            alpha = config.get("lora_alpha", r)
        alpha = float(alpha)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[name] = (a.float(), b.float(), scale)
    return LoraInput(
        path=path,
        layout=layout,
        modules=dict(sorted(modules.items())),
        declared_family=_declared_family(path, header),
        base_model=config.get("base_model_name_or_path"),
    )


# --- compatibility -----------------------------------------------------------------------


def name_families(names: Sequence[str]) -> set[str]:
    """The families whose transformer blocks have every block module named here."""
    families = set(FAMILY_NAMES)
    for name in names:
        m = _BLOCK.match(name)
        if m:
            families &= {f for f in families if m["rel"] in FAMILIES[f].block_linears[m["stack"]]}
    return families


def _hidden_size(lora: LoraInput) -> int | None:
    sizes = {
        int(a.shape[1])
        for name, (a, _, _) in lora.modules.items()
        if (m := _BLOCK.match(name)) and m["rel"] in _HIDDEN_INPUTS
    }
    return sizes.pop() if len(sizes) == 1 else None


def check_same_base(loras: Sequence[LoraInput], family: str | None = None) -> str | None:
    """Refuse LoRAs made for different base models; return their family when known."""
    declared = {str(x.path): x.declared_family for x in loras if x.declared_family}
    if family is not None:
        declared = {"the requested family": family, **declared}
    if len(set(declared.values())) > 1:
        raise LoraMismatch(
            "these LoRAs were made for different base models: "
            + ", ".join(f"{k}: {v}" for k, v in declared.items())
        )
    wanted = set(declared.values())
    candidates, first = set(FAMILY_NAMES), None
    for lora in loras:
        fits = name_families(list(lora.modules))
        if wanted and not fits & wanted:
            raise LoraMismatch(
                f"{lora.path}: its modules are those of {' / '.join(sorted(fits)) or 'no known'} "
                f"family, not of {next(iter(wanted))}: it was made for a different base model"
            )
        if fits and not fits & candidates:
            raise LoraMismatch(
                f"{lora.path}: its modules are those of {' / '.join(sorted(fits))}, but "
                f"{first} has those of {' / '.join(sorted(candidates))}: these LoRAs were "
                f"made for different base models"
            )
        if fits:
            candidates &= fits
            first = first or lora.path
    bases = {str(x.path): x.base_model for x in loras if x.base_model}
    if len(set(bases.values())) > 1:
        raise LoraMismatch(
            "these LoRAs name different base models (base_model_name_or_path): "
            + ", ".join(f"{k}: {v}" for k, v in bases.items())
        )
    hidden = {str(x.path): h for x in loras if (h := _hidden_size(x)) is not None}
    if len(set(hidden.values())) > 1:
        raise LoraMismatch(
            "these LoRAs were made for different base models (attention input sizes "
            + ", ".join(f"{k}: {v}" for k, v in hidden.items())
            + ")"
        )
    shapes: dict[str, tuple[tuple[int, int], Path]] = {}
    for lora in loras:
        for name, (a, b, _) in lora.modules.items():
            io = (int(a.shape[1]), int(b.shape[0]))
            seen = shapes.setdefault(name, (io, lora.path))
            if seen[0] != io:
                raise LoraMismatch(
                    f"{name} is a {seen[0][0]} -> {seen[0][1]} layer in {seen[1]} but "
                    f"{io[0]} -> {io[1]} in {lora.path}: these LoRAs were made for different "
                    f"base models (another family or model size)"
                )
    if declared:
        return next(iter(declared.values()))
    return candidates.pop() if len(candidates) == 1 else None


# --- merging -----------------------------------------------------------------------------


def merge_loras(
    loras: Sequence[tuple[str | Path, float]],
    normalize: bool = True,
    family: str | None = None,
) -> MergedLora:
    """Σ w_i ΔW_i exactly, by concatenating ranks (weights scaled to sum 1 when normalize).

    `family`, when given, is the base model the result is for: inputs of another are refused.
    """
    if not loras:
        raise SettingsError("merge needs at least one LoRA")
    raw = [float(w) for _, w in loras]
    if not all(math.isfinite(w) for w in raw):
        raise SettingsError(f"LoRA weights must be finite numbers, got {raw}")
    if normalize:
        total = sum(raw)
        if total <= 0:
            raise SettingsError(f"weights {raw} sum to {total}: cannot normalise them to sum 1")
        weights = [w / total for w in raw]
    else:
        weights = raw
    inputs = [read_input(p) for p, _ in loras]
    base = check_same_base(inputs, family)
    names = sorted({n for x in inputs for n in x.modules})
    modules, per_module = {}, {}
    for name in names:
        a_parts, b_parts, sources = [], [], []
        for i, (lora, w) in enumerate(zip(inputs, weights, strict=True)):
            if name not in lora.modules or w == 0:
                continue
            a, b, scale = lora.modules[name]
            a_parts.append(a)
            b_parts.append(b * (w * scale))
            sources.append(i)
        if not a_parts:  # only zero-weight inputs adapt it
            continue
        a, b = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
        modules[name] = (a.contiguous(), b.contiguous())
        per_module[name] = {
            "rank": int(a.shape[0]),
            "in_features": int(a.shape[1]),
            "out_features": int(b.shape[0]),
            "sources": sources,
        }
    report = {
        "family": base,
        "normalize": normalize,
        "inputs": [
            {
                "path": str(x.path),
                "layout": x.layout,
                "weight": w_raw,
                "normalized_weight": w,
                "family": x.declared_family,
                "modules": len(x.modules),
                "ranks": sorted({int(a.shape[0]) for a, _, _ in x.modules.values()}),
                "scales": sorted({round(s, 8) for _, _, s in x.modules.values()}),
            }
            for x, w_raw, w in zip(inputs, raw, weights, strict=True)
        ],
        "weights": weights,
        "modules": per_module,
    }
    return MergedLora(modules=modules, family=base, report=report)


# --- compression -------------------------------------------------------------------------


def compress(merged: MergedLora, rank: int) -> tuple[MergedLora, dict]:
    """Truncated SVD of each module's ΔW to `rank`; the error made, per module and overall.

    ΔW = B A is factored through QR of B and Aᵀ, so only an R x R core (R = the module's
    total rank) is decomposed, never the out x in matrix.
    """
    if rank < 1:
        raise SettingsError(f"rank must be >= 1, got {rank}")
    modules, per_module = {}, {}
    kept_energy = total_energy = 0.0
    for name, (a, b) in merged.modules.items():
        r = int(a.shape[0])
        qb, rb = torch.linalg.qr(b.double())
        qa, ra = torch.linalg.qr(a.double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)  # the singular values of ΔW = B A
        energy = float((s**2).sum())
        if r <= rank:
            modules[name] = (a, b)
            tail = 0.0
        else:
            new_b = (qb @ u[:, :rank]) * s[:rank]
            new_a = vh[:rank] @ qa.T
            modules[name] = (new_a.float().contiguous(), new_b.float().contiguous())
            tail = float((s[rank:] ** 2).sum())
        kept_energy += energy - tail
        total_energy += energy
        per_module[name] = {
            "rank_before": r,
            "rank_after": int(modules[name][0].shape[0]),
            "relative_error": math.sqrt(tail / energy) if energy > 0 else 0.0,
            "energy_kept": (energy - tail) / energy if energy > 0 else 1.0,
        }
    tail_total = total_energy - kept_energy
    report = {
        "rank": rank,
        "overall": {
            "relative_error": math.sqrt(max(tail_total, 0.0) / total_energy)
            if total_energy > 0
            else 0.0,
            "energy_kept": kept_energy / total_energy if total_energy > 0 else 1.0,
        },
        "modules": per_module,
    }
    out_report = json.loads(json.dumps(merged.report))
    for name, info in out_report.get("modules", {}).items():
        if name in modules:
            info["rank"] = int(modules[name][0].shape[0])
    out_report["svd"] = report
    return MergedLora(modules=modules, family=merged.family, report=out_report), report


# --- saving ------------------------------------------------------------------------------


def adapter_config(merged: MergedLora) -> dict:
    """A peft LoraConfig (as a dict) giving every module scale 1 at its own rank."""
    ranks = merged.ranks()
    if not ranks:
        raise SettingsError("the merged LoRA has no modules")
    common = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{name}": r for name, r in ranks.items()}
    for name in ranks:  # each module must resolve to its own entry, as peft looks them up
        key = next(k for k in pattern if re.match(rf"(.*\.)?({k})$", name))
        if key != f"^{name}":
            raise SettingsError(f"rank_pattern key {key} would also match {name}")
    return {
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "peft_type": "LORA",
    }


def merge_report(merged: MergedLora) -> dict:
    """What was merged: inputs, normalised weights, per-module ranks, SVD errors if any."""
    report = json.loads(json.dumps(merged.report))
    report["ranks"] = merged.ranks()
    values = list(report["ranks"].values())
    report["total_rank"] = {"min": min(values), "max": max(values)} if values else {}
    report["files"] = {"diffusers": DIFFUSERS_WEIGHTS, "comfyui": COMFYUI_WEIGHTS}
    return report


def _family_of_pipeline(pipeline_class) -> str | None:
    found = family_of_class(getattr(pipeline_class, "__name__", None))
    return found.name if found else None


def save_merged(
    merged: MergedLora, folder: str | Path, pipeline_class=None, family: str | None = None
) -> dict[str, Path]:
    """Write the diffusers file (`pipe.load_lora_weights` reads it), the ComfyUI file and the
    report; the weight files are byte-reproducible. The ComfyUI file's key layout is the
    family's: `family`, else the merged LoRA's, else the pipeline class's."""
    folder = Path(folder)
    family = family or merged.family or _family_of_pipeline(pipeline_class)
    if family is None:
        raise ValueError(
            "the merged LoRA's model family is unknown (its modules fit several): pass family= "
            "(the ComfyUI file's key layout depends on it)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    prefix = getattr(pipeline_class, "transformer_name", None) or DIFFUSERS_PREFIX.rstrip(".")
    state = merged.state()
    config = {f"{prefix}.{k}": v for k, v in adapter_config(merged).items()}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
    if merged.family:
        header[FAMILY_KEY] = merged.family
    diffusers_path = folder / DIFFUSERS_WEIGHTS
    safetensors_io.write(diffusers_path, {f"{prefix}.{k}": v for k, v in state.items()}, header)
    alphas = {name: float(r) for name, r in merged.ranks().items()}  # alpha = rank: scale 1
    comfy_header = {FAMILY_KEY: merged.family} if merged.family else {}
    comfy_path = save_comfyui(folder, state, alphas, family, metadata=comfy_header)
    report_path = folder / REPORT_NAME
    write_json(report_path, merge_report(merged))
    return {"diffusers": diffusers_path, "comfyui": comfy_path, "report": report_path}


# --- fusing ------------------------------------------------------------------------------


def fuse_into_base(
    transformer: torch.nn.Module, lora_path: str | Path | MergedLora, scale: float = 1.0
) -> int:
    """Add scale · ΔW into the transformer's Linear weights in place (deployment without
    peft); every module is checked before any weight changes. Returns the modules changed."""
    if isinstance(lora_path, MergedLora):
        source = "the merged LoRA"
        deltas = {n: (a, b, 1.0) for n, (a, b) in lora_path.modules.items()}
        declared = lora_path.family
    else:
        lora = read_input(lora_path)
        source, deltas, declared = str(lora.path), lora.modules, lora.declared_family
    family = model_family(transformer)
    if family is not None:
        fits = name_families(list(deltas))
        if (declared and declared != family) or (fits and family not in fits):
            raise LoraMismatch(
                f"{source} was made for {declared or ' / '.join(sorted(fits))}, this "
                f"transformer is {family}"
            )
    named = dict(transformer.named_modules())
    targets = {}
    for name, (a, b, _) in deltas.items():
        module = named.get(name)
        base = getattr(module, "base_layer", module)
        if not isinstance(base, torch.nn.Linear):
            what = "does not exist" if module is None else f"is a {type(base).__name__}"
            raise LoraMismatch(f"{source}: module {name} {what} in this transformer")
        if (base.in_features, base.out_features) != (a.shape[1], b.shape[0]):
            raise LoraMismatch(
                f"{source}: {name} is {a.shape[1]} -> {b.shape[0]} in the LoRA but "
                f"{base.in_features} -> {base.out_features} here: another model size or family"
            )
        if not base.weight.dtype.is_floating_point:
            raise LoraMismatch(f"{source}: {name} is quantized: fuse into unquantized weights")
        targets[name] = base
    with torch.no_grad():
        for name, base in targets.items():
            a, b, s = deltas[name]
            delta = (b.double() @ a.double()) * (s * scale)
            base.weight.add_(delta.to(base.weight.device, base.weight.dtype))
    return len(targets)


def fuse_and_save(
    family: str, model_path: str | Path, lora: str | Path | MergedLora, out: str | Path
) -> Path:
    """Load the model's transformer (float32, CPU), fuse the LoRA in and save it with
    save_pretrained at `out` (a folder `from_pretrained` reads as the pipeline's transformer)."""
    from facelora.models.adapters import load_adapter

    adapter = load_adapter(family, model_path, "float32", torch.device("cpu"))
    fuse_into_base(adapter.transformer, lora)
    out = Path(out)
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    adapter.transformer.save_pretrained(partial)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


# --- command line ------------------------------------------------------------------------


def parse_input(text: str) -> tuple[Path, float]:
    """`path[:weight]` -> (path, weight); weight 1 when absent."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def pipeline_class_for(family: str):
    import diffusers

    from facelora.registry.families import family as get_family

    return getattr(diffusers, get_family(family).pipeline_class)


def merge_main(
    inputs: Sequence[str],
    out: str | Path,
    rank: int | None = None,
    family: str = "qwen_image_edit",
    normalize: bool = True,
    fuse_into: str | Path | None = None,
) -> dict:
    """`facelora merge`: merge "path[:weight]" LoRAs into `out`, SVD-compressed to `rank`
    when given; returns the report (also written as out/merge_report.json)."""
    pipeline_class = pipeline_class_for(family)
    merged = merge_loras([parse_input(t) for t in inputs], normalize=normalize, family=family)
    if merged.family is None:
        merged.family = family
        merged.report["family"] = family
    if rank is not None:
        merged, _ = compress(merged, rank)
    paths = save_merged(merged, out, pipeline_class)
    if fuse_into is not None:  # deployment: the base transformer with the merged delta added
        paths["fused_transformer"] = fuse_and_save(
            family, fuse_into, merged, Path(out) / "transformer_fused"
        )
    report = merge_report(merged)
    report["written"] = {k: str(v) for k, v in paths.items()}
    return report
