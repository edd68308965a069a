"""The edit kind: a generator edits each face crop by an instruction; every answer cached.

The generator is an `Editor`: an API client (openai, gemini: built here from the settings)
or a local pipeline (diffusers: built by the model layer and handed in, since the data half
does not load diffusion models itself). Every request goes through the request runner, so a
rerun, a resumed run or an experiment never repeats a finished one, and a budget, retries and
failures are handled in one place.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import cv2

from facelora.config import GeneratorParams, Params
from facelora.errors import SettingsError
from facelora.prepare.synthesis.kinds import make_edit
from facelora.prepare.synthesis.plan import Job
from facelora.prepare.synthesis.requests import (
    EditAnswer,
    RequestCache,
    api_settings,
    run_requests,
)
from facelora.prepare.synthesis.requests import Job as Request
from facelora.prepare.synthesis.write import PairWriter, Written, decode_png, encode_png

log = logging.getLogger(__name__)
SETTING = "synthesis.generator"


class Editor(Protocol):
    secrets: tuple[str, ...]  # scrubbed from every record and message (API keys)

    def request_key(self, images: list[bytes], instruction: str, seed: int) -> str: ...

    def edit(self, images: list[bytes], instruction: str, seed: int) -> EditAnswer: ...


def api_editor(settings: GeneratorParams) -> Editor:
    """The API client named by synthesis.generator.backend (openai or gemini)."""
    if settings.backend == "openai":
        from facelora.prepare.synthesis.openai_api import OpenAIImageEditor

        return OpenAIImageEditor(settings, SETTING)
    if settings.backend == "gemini":
        from facelora.prepare.synthesis.gemini_api import GeminiImageEditor

        return GeminiImageEditor(settings, SETTING)
    raise SettingsError(
        f"{SETTING}.backend: {settings.backend} is a local pipeline: the command that runs "
        "the edit kind loads it (facelora synthesize edit ...)"
    )


def _same_size(png: bytes, side: int) -> bytes:
    """The after image at the crop's size (APIs answer at their own sizes)."""
    rgb = decode_png(png)
    if rgb.shape[:2] == (side, side):
        return png
    shrink = rgb.shape[0] > side
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
    return encode_png(cv2.resize(rgb, (side, side), interpolation=interpolation), 1)


def run_edit_jobs(
    jobs: list[Job], writer: PairWriter, params: Params, editor: Editor, cache_dir: str | Path
) -> list[Written]:
    """Ask the generator for every job's after image (cached by content) and write the pairs;
    jobs that failed or were not run (the budget) are recorded with the reason."""
    settings = params.synthesis.generator
    requests = []
    for job in jobs:
        crop = writer.crop_png(job.source).read_bytes()
        key = editor.request_key([crop], job.instruction or "", job.seed)
        requests.append(Request(key, (crop, job)))

    def call(request) -> object:
        crop, job = request
        return editor.edit([crop], job.instruction or "", job.seed).to_answer()

    run = run_requests(
        requests,
        call,
        cache=RequestCache(cache_dir),
        progress_desc="edit",
        setting=SETTING,
        secrets=editor.secrets,
        **api_settings(settings),
    )
    written = []
    for outcome in run:
        crop, job = outcome.job.request
        provenance = {"request_key": outcome.job.key}  # the same on a cached rerun
        if outcome.status in ("ok", "cached"):
            answer = EditAnswer.from_answer(outcome.answer)
            side = job.source.side
            answer = EditAnswer(_same_size(answer.png, side), answer.request_id, answer.model)
            written.append(make_edit(job, writer, params, answer, provenance))
        else:
            reason = f"{outcome.status}: {outcome.reason}"
            written.append(writer.failed(job, reason, provenance))
    log.info("%s", run.report())
    return written
