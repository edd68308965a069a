"""Find before/after pairs in the raw folder, in each supported layout.

- kontext (SimpleTuner): `01_start.png`, optional face references `01_start2.png` ..
  `01_start4.png`, `01_end.png`, caption `01.txt`, optional loss mask `01_mask.png`, in any
  sub-folder.
- folders: a folder with `target/` (the edited images) and control folders (`control/` is
  the start image, further control folders are references), files matched by name; the
  caption is `target/NAME.txt` (or `NAME.txt` beside the folders); an optional `mask/` folder
  beside them holds loss masks, matched by name too.
- manifest: a CSV or JSONL file with columns start, end, references (optional; a list in
  JSONL, `|`-separated in CSV), caption (optional) and mask (optional); paths relative to the
  manifest.

A mask is a grey image in the END image's pixels (white: the region to learn, black:
background), cut by the pair step with the end crop's geometry; whether its size matches the
end image is checked by the pair index.

Every file that could not be paired is returned as a rejection with the reason.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from facelora.config import PairSource

KONTEXT_NAME = re.compile(r"^(?P<key>.+)_(?P<role>start|end|mask)(?P<n>\d*)$")
MAX_REFERENCES = 3  # _start2 .. _start4
MANIFEST_SUFFIXES = (".csv", ".jsonl")
MASK_FOLDER = "mask"  # folders layout: the loss masks, beside target/ and control/


@dataclass
class PairCandidate:
    layout: str  # kontext | folders | manifest | auto_identity
    source: str  # where it was found, e.g. "kontext:portraits/01" or "manifest:pairs.csv:3"
    start: str  # image paths relative to the raw folder
    end: str
    references: list[str] = field(default_factory=list)
    caption: str | None = None
    caption_source: str | None = None
    start_face: int | None = None  # fixed faces (identity pairs); None: chosen when scoring
    end_face: int | None = None
    reference_faces: list[int] | None = None
    mask: str | None = None  # a loss mask in the end image's pixels (path like the images)


@dataclass
class Discovery:
    candidates: list[PairCandidate] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"image": rel, "reason": ...}

    def extend(self, other: Discovery) -> None:
        self.candidates.extend(other.candidates)
        self.rejected.extend(other.rejected)


def _read_caption(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
    return text or None


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _is_image(path: Path, extensions: set[str]) -> bool:
    return path.is_file() and path.suffix.lower() in extensions


def discover_kontext(
    root: Path, base: Path, extensions: set[str], skip_dirs: set[Path] = frozenset()
) -> Discovery:
    found = Discovery()
    groups: dict[tuple[Path, str], dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(base.rglob("*")):
        if not _is_image(path, extensions) or any(d in path.parents for d in skip_dirs):
            continue
        if any(part.startswith(".") for part in path.relative_to(root).parts[:-1]):
            continue
        m = KONTEXT_NAME.match(path.stem)
        if not m:
            continue
        role = m["role"] + m["n"]
        groups[(path.parent, m["key"])][role].append(path)
    for (folder, key), roles in sorted(groups.items()):
        where = f"kontext:{_rel(folder / key, root)}"
        files = [p for paths in roles.values() for p in paths]
        dupes = {r: ps for r, ps in roles.items() if len(ps) > 1}
        bad_roles = [r for r in roles if not r.startswith("start") and r not in ("end", "mask")]
        bad_roles += [r for r in roles if r.startswith("start") and r not in _start_roles()]
        if dupes:
            names = "; ".join(", ".join(p.name for p in ps) for ps in dupes.values())
            reason = f"ambiguous pair {key}: several files for one role ({names})"
        elif bad_roles:
            reason = (
                f"unknown role(s) {', '.join(sorted(bad_roles))} for pair {key} "
                f"(use _start, _start2.._start{MAX_REFERENCES + 1}, _end, _mask)"
            )
        elif "start" not in roles or "end" not in roles:
            missing = "start" if "start" not in roles else "end"
            reason = f"unpaired: no {key}_{missing} image beside it"
        else:
            refs = [
                roles[f"start{n}"][0] for n in range(2, MAX_REFERENCES + 2) if f"start{n}" in roles
            ]
            caption_file = folder / f"{key}.txt"
            caption = _read_caption(caption_file)
            found.candidates.append(
                PairCandidate(
                    layout="kontext",
                    source=where,
                    start=_rel(roles["start"][0], root),
                    end=_rel(roles["end"][0], root),
                    references=[_rel(r, root) for r in refs],
                    caption=caption,
                    caption_source=f"sidecar:{_rel(caption_file, root)}" if caption else None,
                    mask=_rel(roles["mask"][0], root) if "mask" in roles else None,
                )
            )
            continue
        found.rejected.extend({"image": _rel(p, root), "reason": reason} for p in sorted(files))
    return found


def _start_roles() -> set[str]:
    return {"start"} | {f"start{n}" for n in range(2, MAX_REFERENCES + 2)}


def _by_stem(folder: Path, extensions: set[str]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = defaultdict(list)
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if _is_image(path, extensions):
                out[path.stem].append(path)
    return out


def discover_folders(
    root: Path, base: Path, target: str, controls: list[str], extensions: set[str]
) -> Discovery:
    found = Discovery()
    target_dir = base / target
    if not target_dir.is_dir() or not controls:
        found.rejected.append(
            {
                "image": _rel(base, root) + "/",
                "reason": (
                    f"folders layout: {_rel(target_dir, root)}/ not found (pairs.sources[].target)"
                ),
            }
        )
        return found
    targets = _by_stem(target_dir, extensions)
    control_maps = [_by_stem(base / c, extensions) for c in controls]
    masks = _by_stem(base / MASK_FOLDER, extensions) if MASK_FOLDER not in controls else {}
    where = f"folders:{_rel(base, root) or '.'}"
    for stem in sorted(set(targets) | set(control_maps[0])):
        files = targets.get(stem, []) + [p for cm in control_maps for p in cm.get(stem, [])]
        files += masks.get(stem, [])
        reason = None
        if stem not in targets:
            reason = f"unpaired: no image named {stem} in {target}/"
        elif stem not in control_maps[0]:
            reason = f"unpaired: no image named {stem} in {controls[0]}/"
        elif len(targets[stem]) > 1 or any(
            len(cm.get(stem, [])) > 1 for cm in [*control_maps, masks]
        ):
            reason = f"ambiguous pair {stem}: several files with this name in one folder"
        if reason:
            found.rejected.extend({"image": _rel(p, root), "reason": reason} for p in files)
            continue
        caption_file = target_dir / f"{stem}.txt"
        if not caption_file.is_file():
            caption_file = base / f"{stem}.txt"
        caption = _read_caption(caption_file)
        refs = [cm[stem][0] for cm in control_maps[1:] if stem in cm]
        found.candidates.append(
            PairCandidate(
                layout="folders",
                source=f"{where}:{stem}",
                start=_rel(control_maps[0][stem][0], root),
                end=_rel(targets[stem][0], root),
                references=[_rel(r, root) for r in refs],
                caption=caption,
                caption_source=f"sidecar:{_rel(caption_file, root)}" if caption else None,
                mask=_rel(masks[stem][0], root) if stem in masks else None,
            )
        )
    for cm in [*control_maps[1:], masks]:
        for stem in sorted(set(cm) - set(targets)):
            found.rejected.extend(
                {"image": _rel(p, root), "reason": f"unpaired: no image named {stem} in {target}/"}
                for p in cm[stem]
            )
    return found


def _manifest_rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                row = {"_error": f"line {n} is not valid JSON ({exc.msg})"}
            rows.append(row if isinstance(row, dict) else {"_error": f"line {n} is not an object"})
        return rows
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def is_manifest(path: Path) -> bool:
    """A CSV/JSONL file whose first record has `start` and `end` fields."""
    if path.suffix.lower() not in MANIFEST_SUFFIXES or not path.is_file():
        return False
    try:
        with path.open(encoding="utf-8") as fh:
            first = fh.readline()
        if path.suffix.lower() == ".jsonl":
            keys = set(json.loads(first)) if first.strip() else set()
        else:
            keys = {k.strip() for k in next(csv.reader([first]), [])}
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False
    return {"start", "end"} <= keys


def _split_refs(value) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [str(v) for v in value if str(v).strip()]
    return [v.strip() for v in re.split(r"[|;]", str(value)) if v.strip()]


def discover_manifest(root: Path, manifest: Path, extensions: set[str]) -> Discovery:
    found = Discovery()
    name = _rel(manifest, root)
    if not manifest.is_file():
        found.rejected.append({"image": name, "reason": "manifest file not found"})
        return found
    base = manifest.parent
    resolved_root = root.resolve()
    for n, row in enumerate(_manifest_rows(manifest), start=1):
        where = f"manifest:{name}:{n}"
        if "_error" in row:
            found.rejected.append({"image": where, "reason": row["_error"]})
            continue
        paths, problems = {}, []
        files = [("start", row.get("start")), ("end", row.get("end"))]
        files += [
            (f"reference {i + 1}", v) for i, v in enumerate(_split_refs(row.get("references")))
        ]
        if row.get("mask") not in (None, ""):  # optional: a pair without one has weight 1
            files.append(("mask", row["mask"]))
        for role, value in files:
            if not value:
                problems.append(f"no {role} given")
                continue
            path = (base / str(value)).resolve()
            if resolved_root not in path.parents:
                problems.append(f"{role} {value} is outside the raw folder")
            elif not _is_image(path, extensions):
                problems.append(f"{role} file not found or not a supported image: {value}")
            else:
                paths[role] = path.relative_to(resolved_root).as_posix()
        if problems:
            found.rejected.append({"image": where, "reason": "; ".join(problems)})
            continue
        caption = row.get("caption")
        caption = " ".join(str(caption).split()) if caption not in (None, "") else None
        found.candidates.append(
            PairCandidate(
                layout="manifest",
                source=where,
                start=paths["start"],
                end=paths["end"],
                references=[paths[k] for k in paths if k.startswith("reference")],
                caption=caption,
                caption_source="manifest" if caption else None,
                mask=paths.get("mask"),
            )
        )
    return found


def discover(root: str | Path, sources: list[PairSource], extensions: list[str]) -> Discovery:
    """All pair candidates and rejections from the configured sources."""
    root = Path(root).resolve()
    exts = set(extensions)
    found = Discovery()
    for source in sources:
        base = (root / source.path).resolve()
        if source.layout == "kontext":
            found.extend(discover_kontext(root, base, exts))
        elif source.layout == "folders":
            found.extend(discover_folders(root, base, source.target, source.controls, exts))
        elif source.layout == "manifest":
            found.extend(discover_manifest(root, base, exts))
        else:
            found.extend(_discover_auto(root, base, exts))
    return found


def _discover_auto(root: Path, base: Path, exts: set[str]) -> Discovery:
    """Every layout found under base: manifests, folder sets, then Kontext-named files."""
    found = Discovery()
    folder_sets = []
    for target in sorted(base.rglob("target")):
        if not target.is_dir() or any(p.startswith(".") for p in target.relative_to(root).parts):
            continue
        controls = sorted(
            (
                d.name
                for d in target.parent.iterdir()
                if d.is_dir() and d.name.startswith("control")
            ),
            key=lambda n: (len(n), n),
        )
        if controls:
            folder_sets.append(target.parent)
            found.extend(discover_folders(root, target.parent, "target", controls, exts))
    for path in sorted(base.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if not hidden and path.suffix.lower() in MANIFEST_SUFFIXES and is_manifest(path):
            found.extend(discover_manifest(root, path, exts))
    found.extend(discover_kontext(root, base, exts, skip_dirs=set(folder_sets)))
    return found
