"""Making one pair of each kind from a planned job (CPU kinds; the edit kind asks a model).

- restoration: start = the crop degraded by a seeded plan of filters, end = the crop.
- swap: start = the crop with the face (or head) region replaced, references = crops of
  other photos of the same person, end = the crop.
- edit: start = the crop, end = what the generator made of it and the instruction.
"""

from __future__ import annotations

from facelora.config import Params
from facelora.prepare.captions import compose
from facelora.prepare.synthesis.degrade import apply_degradations, damage_words, draw_degradations
from facelora.prepare.synthesis.made import end_name, start_name
from facelora.prepare.synthesis.plan import Job
from facelora.prepare.synthesis.swap_start import swap_start
from facelora.prepare.synthesis.write import PairWriter, Written, decode_png


def make_restoration(job: Job, writer: PairWriter, params: Params) -> Written:
    settings = params.synthesis.restoration
    crop = writer.read_crop(job.source)
    plan = draw_degradations(job.seed, settings, side=crop.shape[0])
    degraded = apply_degradations(crop, plan)
    start_sha = writer.made_image(start_name(job.pair), degraded, job.source)
    end_sha = writer.crop_image(end_name(job.pair), job.source)
    change = settings.caption.replace("{damage}", damage_words(plan))
    return writer.finish(
        job,
        compose(change, params.captions),
        {
            "generator": "degrade",
            "model": None,
            "settings": settings.model_dump(),
            "degradations": plan,
            "sha256": {"start": start_sha, "end": end_sha},
        },
    )


def make_swap(job: Job, writer: PairWriter, params: Params) -> Written:
    settings = params.synthesis.swap
    crop = writer.read_crop(job.source)
    start, fill = swap_start(crop, job.source.landmarks, settings, job.seed)
    shas = {"start": writer.made_image(start_name(job.pair), start, job.source)}
    for n, ref in enumerate(job.references, start=2):
        shas[f"start{n}"] = writer.crop_image(start_name(job.pair, n), ref)
    shas["end"] = writer.crop_image(end_name(job.pair), job.source)
    return writer.finish(
        job,
        compose(settings.caption, params.captions),
        {
            "generator": "swap",
            "model": None,
            "settings": settings.model_dump(),
            "fill": fill,
            "sha256": shas,
        },
    )


def make_edit(job: Job, writer: PairWriter, params: Params, answer, request: dict) -> Written:
    """The pair of a finished generator answer (`answer.png`: the after image); `request`:
    the request's key and attempts, for the manifest."""
    settings = params.synthesis.generator
    provenance = {
        "generator": settings.backend,
        "model": settings.model,
        "settings": settings.model_dump(exclude={"api_key_env", "base_url"}),
        "request_ids": [answer.request_id] if answer.request_id else [],
        **request,
    }
    try:
        after = decode_png(answer.png)
    except ValueError as exc:
        return writer.failed(job, f"the generator's answer is not an image: {exc}", provenance)
    shas = {"start": writer.crop_image(start_name(job.pair), job.source)}
    shas["end"] = writer.made_image(end_name(job.pair), after, None)
    return writer.finish(
        job,
        compose(job.instruction or "", params.captions),
        {**provenance, "sha256": shas},
    )


CPU_KINDS = {"restoration": make_restoration, "swap": make_swap}
