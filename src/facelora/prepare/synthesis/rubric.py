"""The VLM rubric: the JSON schema an answer must follow, the prompt asking for it, and the
parser that accepts only answers following it (anything else is an InvalidAnswer, retried).

Scores come back as `vlm_<name>` (e.g. vlm_identity_kept), the description as
`vlm_description`, ready to be columns of the pairs table.
"""

from __future__ import annotations

import json
import re
from typing import Any

from facelora.config import RubricItem
from facelora.errors import SettingsError
from facelora.prepare.synthesis.requests import InvalidAnswer

DESCRIPTION = "description"
PREFIX = "vlm_"
FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def json_schema(rubric: dict[str, RubricItem], describe: bool) -> dict[str, Any]:
    """One number per rubric name within its range (+ a description string): all required,
    nothing else allowed. The same dict is sent as a strict response_format."""
    if not rubric:
        raise SettingsError("synthesis.scorer.rubric: list at least one question")
    if describe and DESCRIPTION in rubric:
        raise SettingsError(
            "synthesis.scorer.rubric: the name 'description' is taken by the description "
            "(synthesis.scorer.describe); rename that rubric item"
        )
    props: dict[str, Any] = {
        name: {
            "type": "number",
            "minimum": item.min,
            "maximum": item.max,
            "description": item.question,
        }
        for name, item in rubric.items()
    }
    if describe:
        props[DESCRIPTION] = {
            "type": "string",
            "description": "One short line: what changed from the before to the after image.",
        }
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


def rubric_prompt(rubric: dict[str, RubricItem], describe: bool, instruction: str | None) -> str:
    lines = [
        "You see two images: the first is a photo BEFORE an edit, the second is the same "
        "photo AFTER the edit.",
        f'The edit instruction was: "{instruction}"'
        if instruction
        else "No instruction is known; judge the change itself.",
        "Rate the after image (compared with the before image) on each question, with a "
        "number within the range given:",
    ]
    for name, item in rubric.items():
        lines.append(f"- {name} (a number from {item.min:g} to {item.max:g}): {item.question}")
    if describe:
        lines.append(f"- {DESCRIPTION} (text): one short line saying what changed.")
    # placeholders, not numbers: an example value would pull the answers towards it
    shape = [f'"{name}": <number>' for name in rubric]
    if describe:
        shape.append(f'"{DESCRIPTION}": "<text>"')
    lines.append(
        "Answer with one JSON object with exactly these keys and nothing else: "
        "{" + ", ".join(shape) + "}"
    )
    return "\n".join(lines)


def parse_answer(text: str, rubric: dict[str, RubricItem], describe: bool) -> dict[str, Any]:
    """The validated scores of an answer (code fences tolerated); InvalidAnswer otherwise."""
    data = _json_object(text)
    errors = _violations(data, json_schema(rubric, describe))
    if errors:
        raise InvalidAnswer("the answer does not follow the rubric: " + "; ".join(errors))
    out: dict[str, Any] = {PREFIX + name: float(data[name]) for name in rubric}
    if describe:
        description = " ".join(data[DESCRIPTION].split())
        if not description:
            raise InvalidAnswer("the answer's description is empty")
        out[PREFIX + DESCRIPTION] = description
    return out


def _json_object(text: str) -> Any:
    if not isinstance(text, str) or not text.strip():
        raise InvalidAnswer("the answer is empty")
    fenced = FENCE.search(text)
    body = fenced.group(1) if fenced else text
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        raise InvalidAnswer(f"no JSON object in the answer: {text[:200]!r}")
    try:
        return json.loads(body[start : end + 1], parse_constant=_no_constant)
    except ValueError as exc:
        raise InvalidAnswer(f"the answer is not valid JSON ({exc}): {text[:200]!r}") from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def _violations(data: Any, schema: dict[str, Any]) -> list[str]:
    from jsonschema import Draft202012Validator  # installed with snakemake

    found = sorted(
        Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.absolute_path)
    )
    out = []
    for error in found:
        where = ".".join(str(p) for p in error.absolute_path)
        out.append(f"{where}: {error.message}" if where else error.message)
    return out
