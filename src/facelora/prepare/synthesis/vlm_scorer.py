"""The local VLM scorer (synthesis.scorer.backend: transformers): a model folder rates each
(before, after) pair against the rubric, with answers that follow the rubric's schema by
construction.

The answer's JSON is written here, field by field: the text between values
(`{"instruction_success": `, `, "identity_kept": `, ...) is forced token by token, and the
model generates only the values (greedy). A number may use only tokens made of digits, '.'
and '-', and only while what it has written can still end as a number within the item's
range (so the first digit already keeps to the range); the description is free text that
ends at a quote, a newline or end-of-text, or after max_new_tokens tokens. The result then
goes through rubric.parse_answer like every backend's answer: anything out of shape or out of
range is an InvalidAnswer (retried, then recorded as a failure), never clamped.

The model is loaded on the first `score`, so a rerun whose answers are all cached never loads
it. One generation runs at a time (a lock): a synthesis.scorer.concurrency above 1 gains
nothing here.
"""

from __future__ import annotations

import io
import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from PIL import Image

from facelora.config import RubricItem, ScorerParams
from facelora.errors import ModelFileMissing, SettingsError
from facelora.prepare.synthesis.requests import InvalidAnswer, ScoreAnswer, request_key
from facelora.prepare.synthesis.rubric import DESCRIPTION, json_schema, parse_answer, rubric_prompt
from facelora.prepare.vlm import LocalVlm, load_vlm, model_folder

DECODING = "json-fields-v1"  # part of every key: change it when decoding changes the answers
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MIN_DECIMALS, MAX_DECIMALS = 2, 6
NUMBER_TOKEN = re.compile(r"[0-9.\-]+")
NUMBER_PREFIX = re.compile(r"(-?)([0-9]*)(\.([0-9]*))?")
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")
DESCRIPTION_ENDS = ('"', "\n")
UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")  # not tab, not newline (an end)
INSTEAD = "set synthesis.scorer.backend: none (or openai)"


# --- numbers ---------------------------------------------------------------------------------


class NumberGrammar:
    """The numbers a rubric item accepts: JSON numbers in [min, max] with at most `decimals`
    decimals and no more integer digits than max needs. Works on text prefixes, so a decoder
    can ask after every token whether what is written can still end in range."""

    def __init__(self, item: RubricItem, setting: str):
        if not (math.isfinite(item.min) and math.isfinite(item.max)):
            raise SettingsError(f"{setting}: give a finite min and max (a number is asked for)")
        self.decimals = max(MIN_DECIMALS, _decimals(item.min), _decimals(item.max))
        if self.decimals > MAX_DECIMALS:
            raise SettingsError(
                f"{setting}: min {item.min:g} / max {item.max:g} need more than {MAX_DECIMALS} "
                "decimals; use a wider range (e.g. 0 to 1 instead of 0 to 0.000001)"
            )
        self.min, self.max = item.min, item.max
        self.unit = 10**self.decimals  # values are counted in units of 10^-decimals
        self.lo = _ceil_units(item.min, self.unit)
        self.hi = -_ceil_units(-item.max, self.unit)
        self.int_digits = len(str(int(max(abs(item.min), abs(item.max)))))
        # sign, integer digits, '.', decimals
        self.max_chars = 1 + self.int_digits + 1 + self.decimals

    def can_continue(self, text: str) -> bool:
        """Whether `text` is the beginning of some number in range (or one already)."""
        m = NUMBER_PREFIX.fullmatch(text)
        if not m:
            return False
        sign, digits, dot, frac = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        if sign and self.lo >= 0:
            return False
        if len(digits) > self.int_digits or (len(digits) > 1 and digits[0] == "0"):
            return False
        if dot and (not digits or len(frac) > self.decimals):
            return False
        for a, b in self._magnitudes(digits, dot is not None, frac):
            lo, hi = (-b, -a) if sign else (a, b)
            if max(lo, self.lo) <= min(hi, self.hi):
                return True
        return False

    def complete(self, text: str) -> bool:
        """Whether `text` is a whole number in range."""
        if not NUMBER.fullmatch(text) or not self.can_continue(text):
            return False
        return self.lo <= Decimal(text) * self.unit <= self.hi

    def _magnitudes(self, digits: str, dot: bool, frac: str) -> list[tuple[int, int]]:
        """Intervals (in units) of the absolute values that numbers starting so can have."""
        unit = self.unit
        if dot:
            width = 10 ** (self.decimals - len(frac))
            base = int(digits) * unit + (int(frac) * width if frac else 0)
            return [(base, base + width - 1)]
        if not digits:
            return [(0, 10**self.int_digits * unit - 1)]
        if digits == "0":
            return [(0, unit - 1)]
        n = int(digits)
        return [
            (n * 10**e * unit, (n + 1) * 10**e * unit - 1)
            for e in range(self.int_digits - len(digits) + 1)
        ]


def _decimals(value: float) -> int:
    exponent = Decimal(repr(value)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _ceil_units(value: float, unit: int) -> int:
    scaled = Decimal(repr(value)) * unit
    return int(scaled.to_integral_value(rounding="ROUND_CEILING"))


# --- the answer's template and the walk through it --------------------------------------------


@dataclass(frozen=True)
class _Literal:
    text: str  # what the answer's JSON holds here
    ids: tuple[int, ...]  # what the model is given (the description's also opens its quote)


@dataclass(frozen=True)
class _Number:
    name: str
    grammar: NumberGrammar


@dataclass(frozen=True)
class _Text:
    budget: int  # tokens at most


@dataclass
class _Walk:
    values: list[str]  # what each finished slot holds (numbers as written, the description)
    segment: int  # the segment the next token belongs to (len(segments): done)
    position: int  # within a literal: how many of its tokens are written
    slot: list[int]  # the current slot's tokens so far
    has_content: bool  # the description so far holds more than white space


class AnswerDecoder:
    """Which tokens may come next in an answer: the JSON text between values is fixed, the
    numbers keep to their grammar, the description is free text. Stateless: `walk` reads the
    tokens generated so far (what generate passes to the logits processor each step)."""

    def __init__(
        self,
        tokenizer: Any,
        rubric: dict[str, RubricItem],
        describe: bool,
        budget: int,
        setting: str = "synthesis.scorer",
    ):
        self.tokenizer = tokenizer
        self.rubric, self.describe = rubric, describe
        size = len(tokenizer)
        self.pieces: list[str] = tokenizer.batch_decode(
            [[i] for i in range(size)],
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
        self.number_ids = [i for i, p in enumerate(self.pieces) if NUMBER_TOKEN.fullmatch(p)]
        # every number in range must be writable one character at a time
        needed = "0123456789." + ("-" if any(item.min < 0 for item in rubric.values()) else "")
        have = {self.pieces[i] for i in self.number_ids}
        missing = [c for c in needed if c not in have]
        if missing:
            raise SettingsError(
                f"{setting}.model: the model's tokenizer has no token for {missing}, so its "
                f"answers cannot be kept to numbers; use another model or {setting}.backend"
            )
        # Special and added tokens (chat markers, image pads) never belong in a description;
        # end-of-text ends it. Nor do control characters, or pieces of a character (byte-level
        # BPE): a description cut after one would end in a broken character.
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        banned = added | set(tokenizer.all_special_ids)
        banned |= {i for i, p in enumerate(self.pieces) if UNPRINTABLE.search(p)}
        eos = tokenizer.eos_token_id
        self.ends = {
            i for i, p in enumerate(self.pieces) if i not in banned and _ends_description(p)
        }
        if eos is not None:
            self.ends.add(eos)
        # tuples: the logits processor keeps one tensor of each
        self.free = tuple(i for i in range(size) if i not in banned and i not in self.ends)
        self.free_or_end = self.free + tuple(sorted(self.ends))
        self._free_set = frozenset(self.free)

        names = list(rubric)
        self.answer_start = "{" + json.dumps(names[0]) + ": "  # put after the prompt
        segments: list[Any] = []
        for k, name in enumerate(names):
            grammar = NumberGrammar(rubric[name], f"{setting}.rubric.{name}")
            segments.append(_Number(name, grammar))
            if k + 1 < len(names):
                segments.append(self._literal(", " + json.dumps(names[k + 1]) + ": "))
        if describe:
            segments += [self._literal(f', "{DESCRIPTION}": ', '"'), _Text(budget)]
        else:
            segments.append(self._literal("}"))
        self.segments = segments
        self.max_tokens = sum(
            len(s.ids) if isinstance(s, _Literal) else s.grammar.max_chars
            for s in segments
            if not isinstance(s, _Text)
        ) + (budget if describe else 0)

    def _literal(self, text: str, then: str = "") -> _Literal:
        ids = self.tokenizer.encode(text + then, add_special_tokens=False)
        return _Literal(text, tuple(ids))

    def walk(self, ids: list[int]) -> _Walk:
        """Follow the template through `ids`; InvalidAnswer at the first token out of place."""
        w = _Walk([], 0, 0, [], False)
        for t in ids:
            if w.segment >= len(self.segments):
                raise InvalidAnswer(f"the answer goes on after its end ({self._show(t)})")
            seg = self.segments[w.segment]
            if isinstance(seg, _Number):
                text = self._slot_text(w.slot)
                piece = self.pieces[t] if t < len(self.pieces) else ""
                if NUMBER_TOKEN.fullmatch(piece) and seg.grammar.can_continue(text + piece):
                    w.slot.append(t)
                    continue
                if not seg.grammar.complete(text):
                    g = seg.grammar
                    raise InvalidAnswer(
                        f"{seg.name}: {text + piece!r} is not a number from {g.min:g} to "
                        f"{g.max:g} with at most {g.decimals} decimals"
                    )
                w.values.append(text)
                w.segment, w.slot = w.segment + 1, []
                seg = self.segments[w.segment]  # a literal always follows a number
            if isinstance(seg, _Literal):
                if t != seg.ids[w.position]:
                    raise InvalidAnswer(
                        f"expected the answer's fixed text {seg.text!r}, got {self._show(t)}"
                    )
                w.position += 1
                if w.position == len(seg.ids):
                    w.segment, w.position = w.segment + 1, 0
            elif isinstance(seg, _Text):
                if t in self.ends and w.has_content:
                    w.values.append(self._description(w.slot, t))
                    w.segment, w.slot = w.segment + 1, []
                    continue
                if t in self.ends or t not in self._free_set:
                    raise InvalidAnswer(f"the description cannot hold {self._show(t)}")
                w.slot.append(t)
                w.has_content = w.has_content or bool(self.pieces[t].strip())
                if len(w.slot) >= seg.budget:  # cut at max_new_tokens: still a description
                    w.values.append(self._description(w.slot, None))
                    w.segment, w.slot = w.segment + 1, []
        return w

    def allowed(self, w: _Walk) -> Sequence[int]:
        """The tokens that may come next after `w` (none when the answer is done)."""
        if w.segment >= len(self.segments):
            return []
        seg = self.segments[w.segment]
        if isinstance(seg, _Literal):
            return [seg.ids[w.position]]
        if isinstance(seg, _Number):
            text = self._slot_text(w.slot)
            out = [i for i in self.number_ids if seg.grammar.can_continue(text + self.pieces[i])]
            if seg.grammar.complete(text):
                out.append(self.segments[w.segment + 1].ids[0])
            return out
        return self.free_or_end if w.has_content else self.free

    def answer_text(self, w: _Walk) -> str:
        """The whole JSON answer of a finished walk."""
        if w.segment < len(self.segments):
            raise InvalidAnswer("the answer was cut off before its end")
        parts = [self.answer_start]
        values = iter(w.values)
        for seg in self.segments:
            if isinstance(seg, _Number):
                parts.append(next(values))
            elif isinstance(seg, _Text):
                parts.append(json.dumps(next(values), ensure_ascii=False) + "}")
            else:
                parts.append(seg.text)
        return "".join(parts)

    def _slot_text(self, slot: list[int]) -> str:
        return "".join(self.pieces[i] for i in slot)

    def _description(self, slot: list[int], end: int | None) -> str:
        ids = slot + ([end] if end is not None else [])
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for mark in DESCRIPTION_ENDS:
            text = text.split(mark, 1)[0]
        return text

    def _show(self, t: int) -> str:
        piece = self.pieces[t] if 0 <= t < len(self.pieces) else "?"
        return f"token {t} {piece!r}"


def _ends_description(piece: str) -> bool:
    return any(mark in piece for mark in DESCRIPTION_ENDS)


# --- the scorer ------------------------------------------------------------------------------


class TransformersScorer:
    """A local model folder (synthesis.scorer.model) rating (before, after) PNG pairs."""

    secrets: tuple[str, ...] = ()

    def __init__(self, settings: ScorerParams, setting: str = "synthesis.scorer"):
        self.settings, self.setting = settings, setting
        self.rubric, self.describe = settings.rubric, settings.describe
        json_schema(self.rubric, self.describe)  # refuses an empty or clashing rubric now
        for name, item in self.rubric.items():
            NumberGrammar(item, f"{setting}.rubric.{name}")
        self.folder = model_folder(settings.model, f"{setting}.model", INSTEAD)
        self.identity = _folder_identity(self.folder, settings.model, f"{setting}.model")
        self.model_name = settings.model or ""
        self._vlm: LocalVlm | None = None
        self._decoder: AnswerDecoder | None = None
        self._lock = threading.Lock()

    def request_key(self, before_png: bytes, after_png: bytes, instruction: str | None) -> str:
        return request_key(
            backend="transformers",
            decoding=DECODING,
            model=self.identity,
            rubric={name: item.model_dump() for name, item in self.rubric.items()},
            describe=self.describe,
            max_new_tokens=self.settings.max_new_tokens,
            images=[before_png, after_png],
            instruction=instruction,
        )

    @property
    def loaded(self) -> bool:
        return self._vlm is not None

    def load(self) -> None:
        """Load the model now (score does on its first call)."""
        with self._lock:
            self._load()

    def _load(self) -> tuple[LocalVlm, AnswerDecoder]:
        if self._vlm is None or self._decoder is None:
            from transformers import GenerationConfig

            vlm = load_vlm(self.folder, self.settings.device, f"{self.setting}.model", INSTEAD)
            tokenizer = vlm.processor.tokenizer
            decoder = AnswerDecoder(
                tokenizer, self.rubric, self.describe, self.settings.max_new_tokens, self.setting
            )
            # The decoder picks every token: the folder's sampling defaults (suppressed tokens,
            # a repetition penalty that would push repeated digits down) must not interfere.
            own = vlm.model.generation_config
            pad = own.pad_token_id if own.pad_token_id is not None else tokenizer.pad_token_id
            vlm.model.generation_config = GenerationConfig(
                bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id, pad_token_id=pad
            )
            self._vlm, self._decoder = vlm, decoder
        return self._vlm, self._decoder

    def score(self, before_png: bytes, after_png: bytes, instruction: str | None) -> ScoreAnswer:
        images = [_image(before_png), _image(after_png)]
        prompt = rubric_prompt(self.rubric, self.describe, instruction)
        with self._lock:
            vlm, decoder = self._load()
            inputs = vlm.inputs(images, prompt, decoder.answer_start)
            generated = _generate(vlm, inputs, decoder)
        text = decoder.answer_text(decoder.walk(generated))
        scores = parse_answer(text, self.rubric, self.describe)
        return ScoreAnswer(scores, None, self.model_name)


def _generate(vlm: LocalVlm, inputs: Any, decoder: AnswerDecoder) -> list[int]:
    """Greedy generation kept to the decoder's template; the generated token ids."""
    import torch
    from transformers import (
        GenerationConfig,
        LogitsProcessor,
        LogitsProcessorList,
        StoppingCriteria,
        StoppingCriteriaList,
    )

    start = inputs["input_ids"].shape[1]
    device = inputs["input_ids"].device
    # the description's (large) allowed sets, as index tensors once
    fixed = {id(s): torch.tensor(s, device=device) for s in (decoder.free, decoder.free_or_end)}

    class KeepToTemplate(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
            allowed = decoder.allowed(decoder.walk(input_ids[0, start:].tolist()))
            if not allowed:
                return scores
            index = fixed.get(id(allowed))
            if index is None:
                index = torch.tensor(allowed, device=scores.device)
            mask = torch.full_like(scores, float("-inf"))
            mask[:, index] = 0.0
            return scores + mask

    class Done(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs):
            done = decoder.walk(input_ids[0, start:].tolist()).segment >= len(decoder.segments)
            return torch.full(
                (input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device
            )

    config = GenerationConfig(max_new_tokens=decoder.max_tokens + 1, do_sample=False)
    with torch.inference_mode():
        out = vlm.model.generate(
            **inputs,
            generation_config=config,
            logits_processor=LogitsProcessorList([KeepToTemplate()]),
            stopping_criteria=StoppingCriteriaList([Done()]),
        )
    return out[0, start:].tolist()


def _image(png: bytes) -> Image.Image:
    with Image.open(io.BytesIO(png)) as img:
        return img.convert("RGB")


def _folder_identity(folder: Path, value: str | None, setting: str) -> dict[str, Any]:
    """What tells one model folder from another, cheaply: where it is, its config.json and
    its weight files' names and sizes (a different model of the same name changes these)."""
    weights = sorted(
        (p.name, p.stat().st_size)
        for p in folder.iterdir()
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )
    if not weights:
        raise ModelFileMissing(
            f"{setting} = {value!r}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in the "
            f"folder; copy the whole model folder or {INSTEAD}"
        )
    return {
        "path": str(folder.resolve()),
        "config": (folder / "config.json").read_bytes(),
        "weights": [list(w) for w in weights],
    }
