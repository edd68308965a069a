"""The edit kind's generator, chosen by synthesis.generator.backend.

The data half (facelora.prepare) and the model layer (facelora.models) do not import each
other, so the local pipeline is wired to the data half's `Editor` protocol here: its answers
become the data half's EditAnswer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from facelora.config import Params
from facelora.prepare.synthesis.edit import Editor, api_editor
from facelora.prepare.synthesis.requests import EditAnswer

if TYPE_CHECKING:
    from facelora.models.editor import DiffusersEditor, EditRequest, GeneratedEdit


class LocalEditor:
    """A model-layer generator (DiffusersEditor) seen as an `Editor`."""

    def __init__(self, generator: DiffusersEditor):
        self.generator = generator
        self.secrets: tuple[str, ...] = generator.secrets

    def request_key(self, images: list[bytes], instruction: str, seed: int) -> str:
        return self.generator.request_key(images, instruction, seed)

    def edit(self, images: list[bytes], instruction: str, seed: int) -> EditAnswer:
        return _answer(self.generator.edit(images, instruction, seed))

    def edit_batch(self, requests: Sequence[EditRequest]) -> list[EditAnswer]:
        return [_answer(done) for done in self.generator.edit_batch(requests)]


def _answer(done: GeneratedEdit) -> EditAnswer:
    return EditAnswer(done.png, done.request_id, done.model)


def make_editor(params: Params) -> Editor:
    """The Editor for params.synthesis.generator.backend: the local pipeline (on model.device,
    in model.dtype) or an API client. A missing or wrong model folder fails here."""
    settings = params.synthesis.generator
    if settings.backend == "diffusers":
        # imported here: the API backends need no torch
        from facelora.models.adapters import resolve_device
        from facelora.models.editor import DiffusersEditor

        device = resolve_device(params.model.device)
        return LocalEditor(DiffusersEditor(settings, params.model.dtype, str(device)))
    return api_editor(settings)
