"""The results layout: one function per output path, under `paths.results`.

The rules declare their outputs with these functions, pass each one to their command, and the
commands write exactly the paths they are given; the tests and `facelora summary` read the
same functions. No code derives a path by renaming another. A function called without its
wildcard arguments returns the Snakemake pattern (`{shard}`, `{phase}`, ...).

    results/
      faces/   listing/N.jsonl, listing/sidecars.jsonl (paths.raw, listed per shard),
               shards/N.faces.parquet, shards/N.images.parquet, faces.parquet, images.parquet,
               rejected.csv
      crops/   shards/N.crops.parquet, the crop images, crops.parquet, rejected.csv
      synthesis/KIND/ the pairs one kind made (Kontext files), manifest.jsonl, images.parquet,
               faces.parquet, failed.csv, shards/N.*; synthesis/cache/ (model answers)
      pairs/   index.parquet, index_rejected.csv, shards/N.pairs.parquet, the pair crops,
               pairs.parquet, rejected.csv
      captions/ captions.parquet, lint.csv, rejected.csv
      split/split.parquet, validation/ (held-out pairs), phases/PHASE/ (phase datasets)
      summary/ summary.json, funnel.png, scores.png
      models/tiny-FAMILY/ (the demo's tiny model), cache/ (encodings)
      train/PHASE/ train.json, loss.png, log.csv, checkpoints/step-NNNNNN/
      eval/    phases/base/{metrics.csv,best.json}, phases/PHASE/group-G/metrics.csv,
               phases/PHASE/best.json, metrics.csv, summary.json, plots/PHASE.png,
               contact/PHASE.png
      dvclive/ train/PHASE/, eval/PHASE/ (DVCLive folders: plots/metrics/*.tsv, metrics.json)
      final/   pytorch_lora_weights.safetensors, lora_comfyui.safetensors, final.json, README.md
      apply/   the photos of apply.photos with their faces edited, report.json (snakemake apply)
      report/  funnel.html, model_card.html (the report's pages that are not pictures)
    report.html (`snakemake --report`: every picture and page above, one self-contained file)
"""

from __future__ import annotations

from dataclasses import dataclass

BASE = "base"  # the model without a LoRA: the reference row of every evaluation


CHECKPOINTS = "checkpoints"  # inside a phase's training folder


# A synthesis kind's folder (also what `facelora synthesize KIND PHOTOS --out DIR` writes):
# the Kontext pair files and these four, named alike wherever such a folder is.
MADE_MANIFEST = "manifest.jsonl"  # one row per pair: provenance, status, scores
MADE_IMAGES = "images.parquet"  # the detect step's images table, for the pair images
MADE_FACES = "faces.parquet"  # and its faces table (landmarks in the pair images' pixels)
MADE_FAILED = "failed.csv"  # pairs that could not be made, and sources left out, with reasons


def checkpoint_name(step: int | str) -> str:
    """A checkpoint's folder inside CHECKPOINTS (a string step is a placeholder)."""
    return f"step-{step:06d}" if isinstance(step, int) else f"step-{step}"


@dataclass(frozen=True)
class Layout:
    root: str = "results"

    def _p(self, *parts: object) -> str:
        return "/".join([str(self.root).rstrip("/"), *map(str, parts)])

    # -- faces and crops -----------------------------------------------------------------------
    def raw_listing(self, shard: object = "{shard}") -> str:
        """One shard's photos of paths.raw: name, size, mtime (facelora.prepare.listing)."""
        return self._p("faces", "listing", f"{shard}.jsonl")

    def raw_sidecars_listing(self) -> str:
        """The caption and manifest files of paths.raw, listed alike."""
        return self._p("faces", "listing", "sidecars.jsonl")

    def faces_shard(self, shard: object = "{shard}") -> str:
        return self._p("faces", "shards", f"{shard}.faces.parquet")

    def images_shard(self, shard: object = "{shard}") -> str:
        return self._p("faces", "shards", f"{shard}.images.parquet")

    def faces(self) -> str:
        return self._p("faces", "faces.parquet")

    def images(self) -> str:
        return self._p("faces", "images.parquet")

    def faces_rejected(self) -> str:
        return self._p("faces", "rejected.csv")

    def crops_dir(self) -> str:
        """The crop images (named by facelora.io.naming.crop_name)."""
        return self._p("crops")

    def crops_shard(self, shard: object = "{shard}") -> str:
        return self._p("crops", "shards", f"{shard}.crops.parquet")

    def crops(self) -> str:
        return self._p("crops", "crops.parquet")

    def crops_rejected(self) -> str:
        return self._p("crops", "rejected.csv")

    # -- synthesis ---------------------------------------------------------------------------
    def synthesis_dir(self, kind: object = "{kind}") -> str:
        """One kind's pairs (Kontext layout) and its gathered tables."""
        return self._p("synthesis", kind)

    def synthesis_manifest(self, kind: object = "{kind}") -> str:
        return self._p("synthesis", kind, MADE_MANIFEST)

    def synthesis_images(self, kind: object = "{kind}") -> str:
        return self._p("synthesis", kind, MADE_IMAGES)

    def synthesis_faces(self, kind: object = "{kind}") -> str:
        return self._p("synthesis", kind, MADE_FACES)

    def synthesis_failed(self, kind: object = "{kind}") -> str:
        return self._p("synthesis", kind, MADE_FAILED)

    def synthesis_shard_manifest(self, kind: object = "{kind}", shard: object = "{shard}") -> str:
        return self._p("synthesis", kind, "shards", f"{shard}.manifest.jsonl")

    def synthesis_shard_images(self, kind: object = "{kind}", shard: object = "{shard}") -> str:
        return self._p("synthesis", kind, "shards", f"{shard}.images.parquet")

    def synthesis_shard_faces(self, kind: object = "{kind}", shard: object = "{shard}") -> str:
        return self._p("synthesis", kind, "shards", f"{shard}.faces.parquet")

    def synthesis_summary(self) -> str:
        """Per kind: pairs made, failed, left out, unrated by the VLM."""
        return self._p("synthesis", "summary.json")

    def synthesis_cache_dir(self) -> str:
        """Finished model answers (generator images, VLM scores), keyed by their inputs."""
        return self._p("synthesis", "cache")

    # -- pairs and captions --------------------------------------------------------------------
    def pairs_dir(self) -> str:
        """The aligned pair crops."""
        return self._p("pairs")

    def pair_index(self) -> str:
        return self._p("pairs", "index.parquet")

    def pair_index_rejected(self) -> str:
        return self._p("pairs", "index_rejected.csv")

    def pairs_shard(self, shard: object = "{shard}") -> str:
        return self._p("pairs", "shards", f"{shard}.pairs.parquet")

    def pairs(self) -> str:
        return self._p("pairs", "pairs.parquet")

    def pairs_rejected(self) -> str:
        return self._p("pairs", "rejected.csv")

    def captions(self) -> str:
        return self._p("captions", "captions.parquet")

    def captions_lint(self) -> str:
        return self._p("captions", "lint.csv")

    def captions_rejected(self) -> str:
        return self._p("captions", "rejected.csv")

    # -- split, phases, summary ----------------------------------------------------------------
    def split(self) -> str:
        return self._p("split", "split.parquet")

    def validation_dir(self) -> str:
        return self._p("validation")

    def phase_dir(self, phase: object = "{phase}") -> str:
        return self._p("phases", phase)

    def summary(self) -> str:
        return self._p("summary", "summary.json")

    def funnel_plot(self) -> str:
        return self._p("summary", "funnel.png")

    def scores_plot(self) -> str:
        return self._p("summary", "scores.png")

    # -- models and training -------------------------------------------------------------------
    def tiny_model(self, family: object = "{family}") -> str:
        return self._p("models", f"tiny-{family}")

    def cache_dir(self) -> str:
        return self._p("cache")

    def train_dir(self, phase: object = "{phase}") -> str:
        return self._p("train", phase)

    def checkpoint_dir(self, phase: object = "{phase}", step: int | str = "NNNNNN") -> str:
        return self._p("train", phase, CHECKPOINTS, checkpoint_name(step))

    def train_summary(self, phase: object = "{phase}") -> str:
        return self._p("train", phase, "train.json")

    def loss_plot(self, phase: object = "{phase}") -> str:
        return self._p("train", phase, "loss.png")

    def train_live_dir(self, phase: object = "{phase}") -> str:
        """The phase's DVCLive folder (log.csv's columns per step; DVC plots and metrics).
        Outside train/PHASE, which DVC versions as one output."""
        return self._p("dvclive", "train", phase)

    # -- evaluation ----------------------------------------------------------------------------
    def eval_phase_dir(self, phase: object = "{phase}") -> str:
        """A phase's evaluation jobs (phase `base`: the model alone)."""
        return self._p("eval", "phases", phase)

    def eval_group_dir(self, phase: object = "{phase}", group: object = "{group}") -> str:
        """One evaluation job: its generated images and its table."""
        return self._p("eval", "phases", phase, f"group-{group}")

    METRICS = "metrics.csv"  # an evaluation job's table, in its folder

    def eval_group_metrics(self, phase: object = "{phase}", group: object = "{group}") -> str:
        return f"{self.eval_group_dir(phase, group)}/{self.METRICS}"

    def base_dir(self) -> str:
        return self._p("eval", "phases", BASE)

    def base_metrics(self) -> str:
        return f"{self.base_dir()}/{self.METRICS}"

    @staticmethod
    def metric_backends(folder: object) -> str:
        """Which model computed each metric (or why none could), in a job's folder."""
        return f"{folder}/metrics_backends.json"

    def best(self, phase: object = "{phase}") -> str:
        """A phase's chosen checkpoint (phase `base`: the model alone)."""
        return self._p("eval", "phases", phase, "best.json")

    def eval_metrics(self) -> str:
        return self._p("eval", "metrics.csv")

    def eval_summary(self) -> str:
        return self._p("eval", "summary.json")

    def eval_plot(self, phase: object = "{phase}") -> str:
        return self._p("eval", "plots", f"{phase}.png")

    def contact_sheet(self, phase: object = "{phase}") -> str:
        return self._p("eval", "contact", f"{phase}.png")

    def eval_live_dir(self, phase: object = "{phase}") -> str:
        """The phase's DVCLive folder of evaluation means, one row per checkpoint step
        (written by `choose`, beside best.json)."""
        return self._p("dvclive", "eval", phase)

    # -- release -------------------------------------------------------------------------------
    def final_dir(self) -> str:
        return self._p("final")

    def final_lora(self) -> str:
        return self._p("final", "pytorch_lora_weights.safetensors")

    def final_comfyui(self) -> str:
        return self._p("final", "lora_comfyui.safetensors")

    def final_info(self) -> str:
        return self._p("final", "final.json")

    def final_card(self) -> str:
        return self._p("final", "README.md")

    # -- the Snakemake report --------------------------------------------------------------------
    def report_funnel_page(self) -> str:
        """The data funnel and the rejection reasons of every step, as a report page."""
        return self._p("report", "funnel.html")

    def report_card_page(self) -> str:
        """The final model card, as a report page."""
        return self._p("report", "model_card.html")

    def report(self) -> str:
        """`snakemake --report` writes it; no rule makes it."""
        return self._p("report.html")

    # -- apply (a target asked for: snakemake apply) -------------------------------------------
    def apply_dir(self) -> str:
        """The photos of apply.photos with their faces edited by the final LoRA."""
        return self._p("apply")

    def apply_report(self) -> str:
        return self._p("apply", "report.json")
