"""The `facelora` command: one subcommand per workflow step (each Snakemake rule runs one)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from facelora import __version__
from facelora.config import SYNTHESIS_KINDS, ModelParams, load_params
from facelora.errors import FaceloraError
from facelora.registry.families import FAMILY_NAMES
from facelora.registry.layout import BASE, Layout
from facelora.workflow.declared import PHASE, DeclaredParams

log = logging.getLogger("facelora")


class UserError(FaceloraError):
    """A wrong command line; printed as one message, without a traceback."""


def _add_shard(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--shard", help="INDEX/COUNT: handle only this shard (0-based), e.g. 0/4")
    p.add_argument("--shard-out", type=Path, help=out_help)
    p.add_argument("--workers", type=int, default=None, help="processes (workflow.workers)")


def _add_made(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--made", type=Path, nargs="*", default=[], help="synthesis folders (one per kind)"
    )


def _made(args) -> list:
    from facelora.prepare.synthesis.made import MadeFolder

    return [MadeFolder.at(folder) for folder in args.made]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facelora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"facelora {__version__}")
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="settings file (default: params.yaml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="validate params.yaml and print every setting")
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = sub.add_parser("sample-data", help="build the demo's raw dataset (no download)")
    p.add_argument("dest", type=Path)

    p = sub.add_parser("detect", help="find, landmark and embed faces in every photo")
    p.add_argument("images_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the faces table (.parquet)")
    p.add_argument(
        "--images-out",
        type=Path,
        help="the images table (with --shard: this shard's; default: images.parquet beside --out)",
    )
    p.add_argument(
        "--rejected-out", type=Path, help="without --shard: default rejected.csv beside --out"
    )
    p.add_argument("--shard", help="INDEX/COUNT: only this shard, write shard tables")
    p.add_argument(
        "--listing",
        type=Path,
        help="with --shard: the shard's listing of the folder (the workflow's; default: walk it)",
    )
    p.add_argument("--workers", type=int, default=None)

    p = sub.add_parser("crop", help="cut an aligned square crop of every usable face")
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--faces", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True, help="where the crop images go")
    p.add_argument("--table-out", type=Path, help="without --shard: the crops table")
    p.add_argument("--rejected-out", type=Path, help="without --shard: the rejected crops")
    _add_shard(p, "with --shard: this shard's crops table")

    p = sub.add_parser(
        "synthesize", help="make training pairs of one kind from face photos (Kontext layout)"
    )
    p.add_argument("kind", choices=list(SYNTHESIS_KINDS))
    p.add_argument("photos_dir", type=Path, help="the photos (the workflow: paths.raw)")
    p.add_argument("--out", type=Path, required=True, help="the kind's folder (pairs, manifest)")
    p.add_argument("--crops", type=Path, help="the crops table (else: detect and crop here)")
    p.add_argument("--faces", type=Path, help="with --crops: the faces table")
    p.add_argument("--images", type=Path, help="with --crops: the images table")
    p.add_argument("--crops-dir", type=Path, help="with --crops: the face crops' folder")
    p.add_argument("--cache", type=Path, help="finished model answers (default: OUT/.cache)")
    p.add_argument("--manifest-out", type=Path, help="with --shard: this shard's manifest")
    p.add_argument("--images-out", type=Path, help="with --shard: this shard's images table")
    p.add_argument("--faces-out", type=Path, help="with --shard: this shard's faces table")
    p.add_argument("--shard", help="INDEX/COUNT: only this shard's pairs")
    p.add_argument("--workers", type=int, default=None, help="processes (workflow.workers)")

    p = sub.add_parser("synthesis-summary", help="count each synthesis kind's pairs")
    p.add_argument("--made", type=Path, nargs="*", default=[], help="the kinds' folders")
    p.add_argument("--out", type=Path, required=True, help="the counts (.json)")

    p = sub.add_parser(
        "score", help="rate a pair folder's pairs with the VLM rubric (into its manifest.jsonl)"
    )
    p.add_argument("pairs_dir", type=Path, help="a folder with manifest.jsonl (synthesize's)")
    p.add_argument("--cache", type=Path, help="finished answers (default: PAIRS_DIR/.cache)")

    p = sub.add_parser("pair-index", help="list candidate pairs from every layout")
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--faces", type=Path, required=True)
    p.add_argument("--crops", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the pair index (.parquet)")
    p.add_argument("--rejected-out", type=Path, required=True, help="the rejected candidates")
    _add_made(p)

    p = sub.add_parser("pair", help="choose faces, cut aligned pair crops, score every pair")
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--faces", type=Path, required=True)
    p.add_argument("--crops", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True, help="where the pair crops go")
    p.add_argument("--crops-dir", type=Path, required=True, help="the face crops' folder")
    p.add_argument("--index-rejected", type=Path, help="without --shard: the index's rejects")
    p.add_argument("--table-out", type=Path, help="without --shard: the pairs table")
    p.add_argument("--rejected-out", type=Path, help="without --shard: the rejected pairs")
    _add_shard(p, "with --shard: this shard's pairs table")
    _add_made(p)

    p = sub.add_parser("gather", help="merge shard tables into the final tables")
    p.add_argument("kind", choices=["faces", "crops", "pairs", "synthesis"])
    p.add_argument(
        "shards",
        type=Path,
        nargs="+",
        help="the shard tables (faces: N.faces; synthesis: N.manifest)",
    )
    p.add_argument(
        "--images-shards", type=Path, nargs="+", help="faces, synthesis: the N.images tables"
    )
    p.add_argument("--faces-shards", type=Path, nargs="+", help="synthesis: the N.faces tables")
    p.add_argument("--out", type=Path, required=True, help="the gathered table (synthesis: DIR)")
    p.add_argument("--images-out", type=Path, help="faces: the images table")
    p.add_argument("--rejected-out", type=Path, help="the rejects (.csv; not synthesis)")
    p.add_argument("--images-dir", type=Path, help="crops, pairs: the folder of their PNGs")
    p.add_argument("--index-rejected", type=Path, help="pairs: the pair index's rejects")

    p = sub.add_parser("caption", help="caption every usable pair and lint the captions")
    p.add_argument("--pairs", type=Path, required=True, help="the pairs table")
    p.add_argument("--pairs-dir", type=Path, required=True, help="the pair crops' folder")
    p.add_argument("--out", type=Path, required=True, help="the captions table")
    p.add_argument("--lint-out", type=Path, required=True)
    p.add_argument("--rejected-out", type=Path, required=True)

    p = sub.add_parser("split", help="hold out a seeded validation split of pairs")
    p.add_argument("--pairs", type=Path, required=True)
    p.add_argument("--captions", type=Path, required=True)
    p.add_argument("--faces", type=Path, required=True)
    p.add_argument("--pairs-dir", type=Path, required=True, help="the pair crops' folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--validation-dir", type=Path, required=True)
    _add_made(p)

    p = sub.add_parser("select", help="write one phase's dataset (Kontext layout)")
    p.add_argument("phase")
    p.add_argument("--pairs", type=Path, required=True)
    p.add_argument("--captions", type=Path, required=True)
    p.add_argument("--split", type=Path, required=True)
    p.add_argument("--pairs-dir", type=Path, help="the pair crops' folder (required)")
    p.add_argument("--out-dir", type=Path, required=True)

    p = sub.add_parser("train", help="train one phase's LoRA (resumes from its last checkpoint)")
    p.add_argument("phase")
    p.add_argument("--data", type=Path, required=True, help="the phase's dataset folder")
    p.add_argument("--out", type=Path, required=True, help="the phase's training folder")
    p.add_argument("--summary-out", type=Path, default=None, help="default: OUT/train.json")
    p.add_argument("--plot-out", type=Path, default=None, help="default: OUT/loss.png")
    p.add_argument(
        "--live-out", type=Path, default=None, help="the DVCLive folder (default: OUT/dvclive)"
    )
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="where earlier phases trained and were chosen (default: paths.results)",
    )
    p.add_argument("--cache", type=Path, default=None, help="default: the layout's cache")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="data-parallel processes (GPUs) per node; >1 relaunches under accelerate/torchrun",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="nodes of the Slurm job (>1: srun starts one accelerate launcher per node)",
    )

    p = sub.add_parser("evaluate", help="generate and score the validation edits of checkpoints")
    p.add_argument("phase", help="a phase name, or `base` for the model without a LoRA")
    p.add_argument("--group", type=int, default=None, help="which eval job of the phase")
    p.add_argument("--validation", type=Path, required=True)
    p.add_argument("--train-dir", type=Path, default=None, help="the phase's training folder")
    p.add_argument("--out", type=Path, required=True, help="the job's folder (its images)")
    p.add_argument("--metrics-out", type=Path, required=True, help="the job's table (.csv)")
    p.add_argument("--backends-out", type=Path, required=True, help="what computed each metric")

    p = sub.add_parser("choose", help="pick the best checkpoint of a phase (best.json)")
    p.add_argument("phase")
    p.add_argument("--results", type=Path, required=True, help="paths.results")
    p.add_argument("--out", type=Path, required=True, help="the choice (best.json)")
    p.add_argument("--live-out", type=Path, default=None, help="the means as a DVCLive folder")

    p = sub.add_parser("eval-report", help="all rows, per-checkpoint means, plots, sheets")
    p.add_argument("--results", type=Path, required=True, help="paths.results")
    p.add_argument("--validation", type=Path, required=True)
    p.add_argument("--metrics-out", type=Path, required=True)
    p.add_argument("--summary-out", type=Path, required=True)
    p.add_argument("--plots-out", type=Path, nargs="+", required=True, help="one per phase")
    p.add_argument("--sheets-out", type=Path, nargs="+", required=True, help="one per phase")

    p = sub.add_parser("final", help="the final LoRA (last phase's choice) and its model card")
    p.add_argument("--results", type=Path, required=True, help="paths.results")
    p.add_argument("--out", type=Path, required=True, help="the final LoRA's folder")

    p = sub.add_parser("merge", help="merge LoRAs by weight (exact), optionally SVD-compressed")
    p.add_argument("inputs", nargs="+", help="LoRA files or checkpoint folders, each PATH[:WEIGHT]")
    p.add_argument("--out", type=Path, required=True, help="the folder to write")
    p.add_argument("--rank", type=int, default=None, help="compress to this rank (SVD)")
    p.add_argument("--no-normalize", action="store_true", help="keep the weights as given")
    p.add_argument(
        "--fuse-into",
        type=Path,
        default=None,
        help="a model folder: also write OUT/transformer_fused, its transformer with the merge in",
    )
    p.add_argument(
        "--family",
        choices=FAMILY_NAMES,
        default=None,
        help="default: model.family",
    )

    p = sub.add_parser("report-pages", help="the report's pages: data funnel and model card")
    p.add_argument("--results", type=Path, default=None, help="default: paths.results")
    p.add_argument("--funnel-out", type=Path, default=None, help="default: the layout's")
    p.add_argument("--card-out", type=Path, default=None, help="default: the layout's")

    p = sub.add_parser("apply", help="edit the faces of photos with a LoRA, pasted back in place")
    p.add_argument(
        "photos", type=Path, nargs="?", help="a photo or a folder of photos (apply.photos)"
    )
    p.add_argument(
        "--lora", type=Path, required=True, help="results/final, a checkpoint folder or a file"
    )
    p.add_argument("--prompt", help='the edit, e.g. "EDITFACE add glasses" (apply.prompt)')
    p.add_argument("--out", type=Path, required=True, help="the folder to write")
    p.add_argument(
        "--scale", type=float, default=None, help="default: final.json's, else eval.lora_scale"
    )
    p.add_argument("--faces", help="all | largest | INDEX (0 = largest) (apply.faces)")
    p.add_argument("--seed", type=int, default=None, help="default: apply.seed, else seed")
    p.add_argument(
        "--format",
        choices=["png", "same"],
        help="png (exact outside the faces) or same: the input's format (apply.format, .jpeg)",
    )
    p.add_argument(
        "--skip-unedited",
        action="store_const",
        const=True,
        help="write nothing for photos left unedited (apply.skip_unedited)",
    )
    p.add_argument(
        "--reference",
        type=Path,
        nargs="+",
        default=[],
        help="reference images after each face crop (swap LoRAs; faces cut like the photos')",
    )

    p = sub.add_parser("make-tiny-model", help="a tiny random model of a family (demo, tests)")
    p.add_argument("family", choices=FAMILY_NAMES)
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("plan", help="LoRA size and training memory per preset and rank")
    p.add_argument("model", type=Path, help="a model folder or a transformer config.json")
    p.add_argument(
        "--family",
        choices=FAMILY_NAMES,
        help="default: from the config's class name",
    )
    p.add_argument("--presets", help="comma-separated (default: every preset of the family)")
    p.add_argument("--ranks", default="16,32,64,128", help="comma-separated LoRA ranks")
    p.add_argument("--blocks", help="comma-separated block indices (flux2_klein preset blocks)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument(
        "--quantize",
        choices=get_args(ModelParams.model_fields["quantize"].annotation),
        default="none",
        help="the frozen blocks' weights as model.quantize stores them (default: bf16)",
    )
    p.add_argument(
        "--dtype-bytes",
        type=int,
        default=2,
        choices=[2, 4],
        help="LoRA file dtype: 2 (bf16) or 4 (fp32)",
    )

    sub.add_parser(
        "snakemake",
        help="snakemake ARGS with --profile from params.yaml's workflow.profile (dvc.yaml)",
        add_help=False,
    )

    p = sub.add_parser("summary", help="counts, rejection reasons and score plots")
    p.add_argument("--results", type=Path, default=None, help="default: paths.results")
    p.add_argument("--out", type=Path, default=None, help="default: the layout's summary.json")
    p.add_argument("--funnel-out", type=Path, default=None, help="default: the layout's")
    p.add_argument("--scores-out", type=Path, default=None, help="default: the layout's")
    p.add_argument("--print-only", action="store_true", help="print the last summary.json")
    return parser


def _shard(text: str | None) -> tuple[int, int]:
    from facelora.io.sharding import parse_shard

    return parse_shard(text) if text else (0, 1)


def _need_shard_out(args) -> None:
    if args.shard and not args.shard_out:
        raise UserError("--shard needs --shard-out (where this shard's table goes)")


def cmd_params(args, params) -> int:
    data = params.model_dump(mode="json")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def cmd_sample_data(args, params) -> int:
    from facelora.prepare.sample_data import build_sample_data

    counts = build_sample_data(args.dest)
    print(
        f"sample data in {args.dest}: {counts['files']} files, {counts['pairs']} pairs "
        f"(plus {counts['bad']} deliberately bad inputs)"
    )
    return 0


def cmd_detect(args, params) -> int:
    from facelora.prepare.faces.detect import DetectOutputs, detect_shard, gather_detections

    workers = args.workers or params.workflow.workers
    if args.shard:
        shard = _shard(args.shard)
        if not args.images_out:
            raise UserError("--shard needs --images-out (this shard's images table)")
        detect_shard(
            args.images_dir, args.out, args.images_out, params, shard, workers, args.listing
        )
        return 0
    if args.listing:
        raise UserError("--listing is one shard's: give --shard too")
    outputs = DetectOutputs.beside(args.out)  # standalone: the other tables beside --out
    outputs.images = args.images_out or outputs.images
    outputs.rejected = args.rejected_out or outputs.rejected
    with tempfile.TemporaryDirectory() as tmp:
        faces, images = Path(tmp, "0.faces.parquet"), Path(tmp, "0.images.parquet")
        detect_shard(args.images_dir, faces, images, params, (0, 1), workers)
        stats = gather_detections([(faces, images)], outputs)
    print(json.dumps(stats))
    return 0


def cmd_crop(args, params) -> int:
    from facelora.prepare.faces.crop import crop_shard, gather_crops

    _need_shard_out(args)
    workers = args.workers or params.workflow.workers
    if args.shard:
        crop_shard(
            args.raw,
            args.faces,
            args.images,
            args.out_dir,
            args.shard_out,
            params,
            _shard(args.shard),
            workers,
        )
        return 0
    if not (args.table_out and args.rejected_out):
        raise UserError("without --shard, crop needs --table-out and --rejected-out")
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp, "0.crops.parquet")
        crop_shard(args.raw, args.faces, args.images, args.out_dir, shard, params, (0, 1), workers)
        stats = gather_crops([shard], args.out_dir, args.table_out, args.rejected_out)
        print(json.dumps(stats))
    return 0


SHARD_SYNTHESIS_ARGS = (
    "crops",
    "faces",
    "images",
    "crops_dir",
    "manifest_out",
    "images_out",
    "faces_out",
)


def cmd_synthesize(args, params) -> int:
    from facelora.prepare.synthesis.run import ShardOutputs, gather_synthesis, synthesize_shard
    from facelora.prepare.synthesis.standalone import crop_photos

    workers = args.workers or params.workflow.workers
    cache = args.cache or args.out / ".cache"
    editor = None
    if args.kind == "edit":  # loaded once, before any work (a missing model fails here)
        from facelora.workflow.editors import make_editor

        editor = make_editor(params)
    if args.shard:
        missing = [
            f"--{n.replace('_', '-')}" for n in SHARD_SYNTHESIS_ARGS if getattr(args, n) is None
        ]
        if missing:
            raise UserError(f"--shard needs {', '.join(missing)}")
        out = ShardOutputs(args.manifest_out, args.images_out, args.faces_out)
        synthesize_shard(
            args.kind,
            args.crops,
            args.faces,
            args.images,
            args.crops_dir,
            args.out,
            out,
            params,
            _shard(args.shard),
            workers,
            cache,
            editor,
        )
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.crops is None:  # alone: detect, align and crop the photos first
            tables = crop_photos(args.photos_dir, tmp / "crops", params, workers)
        else:
            tables = (args.crops, args.faces, args.images, args.crops_dir)
        out = ShardOutputs(tmp / "0.manifest.jsonl", tmp / "0.images.parquet", tmp / "0.faces")
        synthesize_shard(args.kind, *tables, args.out, out, params, (0, 1), workers, cache, editor)
        stats = gather_synthesis([out], args.out)
    print(json.dumps(stats))
    return 0


def cmd_synthesis_summary(args, params) -> int:
    from facelora.io.atomic import write_json
    from facelora.prepare.synthesis.made import MANIFEST, MadeFolder, made_counts

    counts = {}
    for folder in args.made:
        counts[MadeFolder.at(folder).kind] = made_counts(folder / MANIFEST)
    write_json(args.out, counts)
    for kind, c in counts.items():
        print(f"{kind}: {c['ok']} pairs, {c['failed']} failed, {c['skipped']} left out")
    return 0


def cmd_score(args, params) -> int:
    from facelora.prepare.synthesis.made import MANIFEST, read_manifest
    from facelora.prepare.synthesis.run import write_jsonl
    from facelora.prepare.synthesis.scoring import apply_scores

    manifest = args.pairs_dir / MANIFEST
    if not manifest.is_file():
        raise UserError(
            f"{manifest} not found: score reads a folder that facelora synthesize wrote"
        )
    rows = list(read_manifest(manifest))
    scored = apply_scores(rows, args.pairs_dir, params, args.cache or args.pairs_dir / ".cache")
    write_jsonl(manifest, rows)
    usable = sum(r["status"] == "ok" for r in rows)
    print(json.dumps({"pairs": usable, "scored": scored, "failed": usable - scored}))
    return 0


def cmd_pair_index(args, params) -> int:
    from facelora.prepare.pairs.index import build_index, write_index

    index, rejected = build_index(
        args.raw, args.images, args.faces, args.crops, params, _made(args)
    )
    write_index(index, rejected, args.out, args.rejected_out)
    print(json.dumps({"candidates": len(index), "rejected": len(rejected)}))
    return 0


def cmd_pair(args, params) -> int:
    from facelora.prepare.pairs.score import gather_pairs, score_shard

    _need_shard_out(args)
    workers = args.workers or params.workflow.workers
    common = (args.index, args.raw, args.faces, args.crops, args.images, args.out_dir)
    if args.shard:
        score_shard(
            *common,
            args.shard_out,
            params,
            _shard(args.shard),
            workers,
            crops_dir=args.crops_dir,
            made=_made(args),
        )
        return 0
    if not (args.index_rejected and args.table_out and args.rejected_out):
        raise UserError("without --shard, pair needs --index-rejected, --table-out, --rejected-out")
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp, "0.pairs.parquet")
        score_shard(
            *common, shard, params, (0, 1), workers, crops_dir=args.crops_dir, made=_made(args)
        )
        stats = gather_pairs(
            [shard], args.index_rejected, args.out_dir, params, args.table_out, args.rejected_out
        )
        print(json.dumps(stats))
    return 0


def cmd_gather(args, params) -> int:
    if args.kind == "synthesis":
        from facelora.prepare.synthesis.run import ShardOutputs, gather_synthesis

        images, faces = args.images_shards or [], args.faces_shards or []
        if not (len(images) == len(faces) == len(args.shards)):
            raise UserError("gather synthesis needs one --images-shards and --faces-shards each")
        shards = [ShardOutputs(*t) for t in zip(args.shards, images, faces, strict=True)]
        print(json.dumps(gather_synthesis(shards, args.out)))
        return 0
    if not args.rejected_out:
        raise UserError(f"gather {args.kind} needs --rejected-out")
    if args.kind == "faces":
        from facelora.prepare.faces.detect import DetectOutputs, gather_detections

        images = args.images_shards or []
        if not args.images_out or len(images) != len(args.shards):
            raise UserError("gather faces needs --images-out and one --images-shards per shard")
        outputs = DetectOutputs(args.out, args.images_out, args.rejected_out)
        stats = gather_detections(list(zip(args.shards, images, strict=True)), outputs)
    elif args.kind == "crops":
        from facelora.prepare.faces.crop import gather_crops

        if not args.images_dir:
            raise UserError("gather crops needs --images-dir (the crops folder)")
        stats = gather_crops(args.shards, args.images_dir, args.out, args.rejected_out)
    else:
        from facelora.prepare.pairs.score import gather_pairs

        if not args.images_dir or not args.index_rejected:
            raise UserError("gather pairs needs --images-dir and --index-rejected")
        stats = gather_pairs(
            args.shards, args.index_rejected, args.images_dir, params, args.out, args.rejected_out
        )
    print(json.dumps(stats))
    return 0


def cmd_caption(args, params) -> int:
    from facelora.prepare.captions import caption_pairs

    stats = caption_pairs(
        args.pairs, args.pairs_dir, params, args.out, args.lint_out, args.rejected_out
    )
    print(json.dumps(stats))
    return 0


def cmd_split(args, params) -> int:
    from facelora.prepare.split import run_split

    stats = run_split(
        args.pairs,
        args.captions,
        args.faces,
        args.out,
        args.validation_dir,
        params,
        pairs_dir=args.pairs_dir,
        made=_made(args),
    )
    print(json.dumps(stats))
    return 0


def cmd_select(args, params) -> int:
    from facelora.prepare.phases import run_select

    params.phase(args.phase)  # an unknown phase fails first, with the list
    if args.pairs_dir is None:
        raise UserError("select needs --pairs-dir (the folder of the pair crops)")
    info = run_select(
        args.phase,
        args.pairs,
        args.captions,
        args.split,
        args.out_dir,
        params,
        pairs_dir=args.pairs_dir,
    )
    print(json.dumps({k: info[k] for k in ("name", "candidates", "after_filters", "selected")}))
    if info["empty"]:
        print(f"facelora select: warning: {info['empty']}", file=sys.stderr)
    return 0


def _ints(text: str | None, what: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: give comma-separated integers, e.g. 16,32,64") from None


def _relaunch(args, processes: int) -> int:
    """Run this same command in `processes` processes per node (facelora.train.launch)."""
    import os
    import subprocess

    import torch

    from facelora.train.launch import launcher_argv

    argv = launcher_argv(processes, args.nodes, os.environ, torch.cuda.is_available(), sys.argv[1:])
    return subprocess.call(argv)


def cmd_train(args, params) -> int:
    import os

    if (args.processes > 1 or args.nodes > 1) and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _relaunch(args, args.processes)
    from facelora.train.init import resolve_init
    from facelora.train.loop import train_phase

    layout = Layout(str(args.results or params.paths.results))
    params.phase(args.phase)  # an unknown phase fails here, with the list
    init = resolve_init(params, args.phase, layout)
    summary = train_phase(
        args.phase,
        args.data,
        args.out,
        params,
        init,
        args.cache or Path(layout.cache_dir()),
        summary_out=args.summary_out,
        plot_out=args.plot_out,
        live_out=args.live_out,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("phase", "steps", "final_loss", "resumed", "processes", "in_sync")
        print(json.dumps({k: summary[k] for k in keys}))
    return 0


def cmd_evaluate(args, params) -> int:
    from facelora.evaluate.run import BASE, evaluate_group

    if args.phase == BASE:
        steps = []
    else:
        groups = params.eval_groups(args.phase)
        if args.group is None or not 0 <= args.group < len(groups):
            raise UserError(f"--group: give 0..{len(groups) - 1} for phase {args.phase}")
        if args.train_dir is None:
            raise UserError("--train-dir is needed for a phase")
        steps = groups[args.group]
    frame = evaluate_group(
        params,
        args.phase,
        steps,
        args.validation,
        args.train_dir,
        args.out,
        metrics_out=args.metrics_out,
        backends_out=args.backends_out,
    )
    print(
        json.dumps(
            {
                "phase": args.phase,
                "steps": steps,
                "rows": len(frame),
                "failed": int((frame["status"] != "ok").sum()),
            }
        )
    )
    return 0


def cmd_choose(args, params) -> int:
    from facelora.evaluate.report import write_choice

    layout = Layout(str(args.results))
    choice = write_choice(args.phase, params, layout, args.out, args.live_out)
    print(json.dumps({k: choice[k] for k in ("phase", "step", "score", "reason")}))
    return 0


def cmd_eval_report(args, params) -> int:
    from facelora.evaluate.report import write_report

    names = params.phase_names
    if len(args.plots_out) != len(names) or len(args.sheets_out) != len(names):
        raise UserError(f"eval-report: give one --plots-out and --sheets-out per phase ({names})")
    summary = write_report(
        params,
        Layout(str(args.results)),
        args.validation,
        args.metrics_out,
        args.summary_out,
        dict(zip(names, args.plots_out, strict=True)),
        dict(zip(names, args.sheets_out, strict=True)),
    )
    print(json.dumps({phase: len(steps) for phase, steps in summary.items()}))
    return 0


def cmd_final(args, params) -> int:
    from facelora.release.final import build_final

    info = build_final(params, args.results, args.out)
    print(json.dumps({"lora": info["lora"]["source"], "metrics": info["metrics"]}))
    return 0


def cmd_merge(args, params) -> int:
    from facelora.release.merge import merge_main

    family = args.family or (params.model.family if params else "qwen_image_edit")
    report = merge_main(
        args.inputs,
        args.out,
        rank=args.rank,
        family=family,
        normalize=not args.no_normalize,
        fuse_into=args.fuse_into,
    )
    summary = {
        "out": str(args.out),
        "weights": report.get("weights"),
        "total_rank": report.get("total_rank"),
    }
    if "svd" in report:
        summary["svd_relative_error"] = report["svd"]["overall"]["relative_error"]
    print(json.dumps(summary, default=str))
    return 0


def cmd_apply(args, params) -> int:
    from facelora.apply.run import apply_photos, list_photos, options_from

    photos = args.photos if args.photos is not None else Path(params.apply.photos)
    list_photos(photos, params)  # first: without photos nothing else matters
    options = options_from(
        params,
        prompt=args.prompt,
        scale=args.scale,
        faces=args.faces,
        seed=args.seed,
        format=args.format,
        skip_unedited=args.skip_unedited,
        references=args.reference,
    )
    report = apply_photos(params, photos, args.lora, args.out, options)
    print(json.dumps({"out": str(args.out), **report["counts"]}))
    return 0


def cmd_make_tiny_model(args, params) -> int:
    from facelora.models.tiny import make_tiny_model

    out = make_tiny_model(args.family, args.out, seed=args.seed)
    print(f"tiny random {args.family} model (not a real model) in {out}")
    return 0


def cmd_plan(args, params) -> int:
    from facelora.models.lora_targets import family_of_config
    from facelora.models.plan import format_plan, load_config, plan

    path = args.model / "transformer" / "config.json" if args.model.is_dir() else args.model
    if not path.is_file():
        raise UserError(f"{path} not found: give a model folder or a transformer config.json")
    config = load_config(path)
    family = args.family or family_of_config(config)
    if family is None:
        raise UserError(f"{path}: unknown transformer class; pass --family")
    presets = [p.strip() for p in args.presets.split(",")] if args.presets else None
    rows = plan(
        config,
        family,
        presets,
        _ints(args.ranks, "--ranks"),
        args.dtype_bytes,
        blocks=_ints(args.blocks, "--blocks"),
        resolution=args.resolution,
        quantize=args.quantize,
    )
    print(format_plan(rows))
    return 0


def cmd_report_pages(args, params) -> int:
    from facelora.workflow.report_pages import write_pages

    layout = Layout(str(args.results or params.paths.results))
    funnel = args.funnel_out or Path(layout.report_funnel_page())
    card = args.card_out or Path(layout.report_card_page())
    write_pages(Path(layout.summary()), Path(layout.final_card()), funnel, card)
    print(f"wrote {funnel} and {card}; the whole report: snakemake --report results/report.html")
    return 0


def cmd_summary(args, params) -> int:
    from facelora.prepare.summary import format_summary, write_summary

    layout = Layout(str(args.results or params.paths.results))
    out = args.out or Path(layout.summary())
    funnel = args.funnel_out or Path(layout.funnel_plot())
    scores = args.scores_out or Path(layout.scores_plot())
    if args.print_only:
        if not out.is_file():
            raise UserError(f"{out} not found: run the workflow first (snakemake --cores 2)")
        summary = json.loads(out.read_text())
    else:
        summary = write_summary(layout.root, params, out, funnel, scores)
    print(format_summary(summary))
    print(f"\nplots: {funnel}, {scores}")
    trained = [(Path(layout.train_summary(p)), layout.loss_plot(p)) for p in params.phase_names]
    if any(t.is_file() for t, _ in trained):
        print("\ntraining (one LoRA per phase):")
        for path, plot in trained:
            if path.is_file():
                t = json.loads(path.read_text())
                print(
                    f"  {t['phase']:<14} {t['steps']:>6} steps  final loss {t['final_loss']:.4f}"
                    f"  {len(t['checkpoints'])} checkpoints  {plot}"
                )
    evaluated = Path(layout.eval_summary())
    if evaluated.is_file():
        print(format_evaluation(json.loads(evaluated.read_text()), layout.root, params))
    return 0


def format_evaluation(summary: dict, results: str | Path, params) -> str:
    """The evaluation table: every checkpoint's means, the choice per phase, the final LoRA
    (`results`: paths.results)."""
    layout = Layout(str(results))
    from facelora.registry.scores import EVAL_METRICS

    def cell(value) -> str:
        return f"{value:>12.4f}" if isinstance(value, int | float) else f"{'n/a':>12}"

    lines = ["\nevaluation (means over the validation pairs; n/a: unavailable or all failed):"]
    lines.append(f"  {'run':<22}" + "".join(f"{m:>12}" for m in EVAL_METRICS) + "  failed")
    for phase in ["base", *params.phase_names]:
        chosen = summary.get("chosen", {}).get(phase, {})
        # summary[phase][step][strength]: report.entries' order, without importing matplotlib
        found = sorted(
            (int(st), float(sc), e)
            for st, by in summary.get(phase, {}).items()
            for sc, e in by.items()
        )
        several = len({scale for _, scale, _ in found}) > 1  # else the strength goes unsaid
        for step, scale, entry in found:
            hit = chosen.get("step") == step and chosen.get("scale", scale) == scale
            strength = f" x{scale:g}" if several else ""
            name = phase if phase == "base" else f"{phase} @ {step}{strength}{' *' if hit else ''}"
            lines.append(
                f"  {name:<22}"
                + "".join(cell(entry.get(m)) for m in EVAL_METRICS)
                + f"  {entry.get('failed', 0)}/{entry.get('pairs', 0)}"
            )
    unavailable = {
        m: info.get("reason")
        for m, info in summary.get("metrics", {}).items()
        if not info.get("available", True)
    }
    for metric, reason in unavailable.items():
        lines.append(f"  {metric} unavailable: {reason}")
    lines.append(
        f"  * the chosen checkpoint of each phase ({layout.best('<phase>')}); xS: LoRA strength S"
    )
    lines.append(
        f"plots: {layout.eval_plot('<phase>')}, contact sheets: {layout.contact_sheet('<phase>')}"
    )
    if Path(layout.final_info()).is_file():
        lines.append(f"final LoRA: {layout.final_dir()}/ (model card {layout.final_card()})")
    return "\n".join(lines)


def cmd_snakemake(args, params) -> int:
    from facelora.workflow.snakemake_run import run_snakemake

    return run_snakemake(params.workflow.profile, args.snakemake_args)


@dataclass(frozen=True)
class Command:
    """A subcommand: its function and the params.yaml keys it reads (facelora.workflow.declared).

    `reads` decide its outputs: they are the rule's rerun trigger and belong in the DVC stage's
    params. `uses` are read too but change no output (how many workers run it). reads=None:
    the whole file (the params command prints it)."""

    run: Callable[[argparse.Namespace, Any], int]
    reads: tuple[str, ...] | None = ()
    uses: tuple[str, ...] = ()


WORKERS = ("workflow.workers",)
SYNTHESIS_READS = ("seed", "synthesis", "images", "faces", "crop", "captions.trigger")
SYNTHESIS_READS += ("captions.template", "model.dtype")  # dtype: the local generator's
SYNTHESIS_USES = (*WORKERS, "model.device")
COMMANDS: dict[str, Command] = {
    "params": Command(cmd_params, reads=None),
    "sample-data": Command(cmd_sample_data),
    "detect": Command(cmd_detect, reads=("images", "faces"), uses=WORKERS),
    "crop": Command(cmd_crop, reads=("images", "crop"), uses=WORKERS),
    "synthesize": Command(
        cmd_synthesize,
        reads=SYNTHESIS_READS,
        uses=SYNTHESIS_USES,
    ),
    "gather synthesis": Command(cmd_gather),
    "score": Command(cmd_score, reads=("synthesis.scorer",)),
    "synthesis-summary": Command(cmd_synthesis_summary),
    "pair-index": Command(cmd_pair_index, reads=("images", "pairs", "faces")),
    # the VLM scorer: its rubric makes pair columns and weighs into quality (other_pairs:
    # the pair step asks it)
    "pair": Command(cmd_pair, reads=("images", "crop", "pairs", "synthesis.scorer"), uses=WORKERS),
    "gather faces": Command(cmd_gather),
    "gather crops": Command(cmd_gather),
    "gather pairs": Command(cmd_gather, reads=("pairs", "synthesis.scorer")),
    "caption": Command(
        cmd_caption, reads=("captions", "pairs", "synthesis.scorer.caption_from_description")
    ),
    "split": Command(cmd_split, reads=("seed", "split", "faces")),
    "select": Command(cmd_select, reads=(PHASE,)),
    "summary": Command(cmd_summary, reads=(PHASE, "synthesis.kinds"), uses=("paths.results",)),
    "report-pages": Command(cmd_report_pages, uses=("paths.results",)),
    "plan": Command(cmd_plan),
    "make-tiny-model": Command(cmd_make_tiny_model),
    "train": Command(
        cmd_train, reads=("seed", "lr", "model", "lora", "train", PHASE), uses=("paths.results",)
    ),
    "evaluate base": Command(cmd_evaluate, reads=("seed", "model", "eval", "captions", "faces")),
    "evaluate": Command(
        cmd_evaluate,
        reads=("seed", "model", "eval", "captions", "faces", PHASE, "train.save_every"),
    ),
    "choose base": Command(cmd_choose),
    "choose": Command(cmd_choose, reads=("objective", "eval", PHASE, "train.save_every")),
    "eval-report": Command(
        cmd_eval_report, reads=(PHASE, "train.save_every", "eval.checkpoints_per_job")
    ),
    "final": Command(
        cmd_final,
        reads=(
            "seed",
            "lr",
            "final",
            "objective",
            "model",
            "lora",
            "train",
            "captions.trigger",
            "eval.resolution",
            "eval.steps",
            "eval.guidance",
            PHASE,
        ),
    ),
    "merge": Command(cmd_merge, reads=("model.family",)),
    "apply": Command(
        cmd_apply,
        reads=("seed", "model", "eval", "images", "faces", "crop", "apply"),
        uses=("captions.trigger",),  # names the trigger in the no-prompt message
    ),
    "snakemake": Command(cmd_snakemake, uses=("workflow.profile",)),
}


def command_name(args: argparse.Namespace) -> str:
    """The declaration's name: the subcommand, with gather's kind, and `base` for evaluate
    and choose of the model alone (which read less than a phase's)."""
    if args.command == "gather":
        return f"gather {args.kind}"
    if args.command in ("evaluate", "choose") and args.phase == BASE:
        return f"{args.command} base"
    return args.command


def reads_of(name: str) -> tuple[str, ...] | None:
    """The keys `facelora NAME` reads that decide its outputs (the rule's rerun trigger)."""
    return COMMANDS[name].reads


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "snakemake":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.snakemake_args = extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        optional = ("sample-data", "plan", "make-tiny-model", "merge")
        needs_params = args.command not in optional or args.params.is_file()
        params = load_params(args.params) if needs_params else None
        name = command_name(args)
        command = COMMANDS[name]
        if params is not None and command.reads is not None:
            params = DeclaredParams(params, (*command.reads, *command.uses), name)
        return command.run(args, params)
    except FaceloraError as exc:  # anything else is a bug: its traceback stays
        print(f"facelora {args.command}: error: {exc}", file=sys.stderr)
        return 2
