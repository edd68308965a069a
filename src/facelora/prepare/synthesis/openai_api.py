"""OpenAI backends (also any OpenAI-compatible server, through base_url): the image editor
(POST /images/edits) and the VLM scorer (POST /chat/completions with a strict JSON schema).

The `openai` package is imported only when one is built. Its own retries are off: the request
runner's retries and budget are the only ones, so each call is exactly one HTTP request.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from facelora.config import ApiParams, GeneratorParams, ScorerParams
from facelora.errors import EnvironmentProblem, SettingsError
from facelora.prepare.synthesis.requests import (
    NO_KEY,
    ApiFailure,
    EditAnswer,
    InvalidAnswer,
    ScoreAnswer,
    api_key,
    as_png,
    refused_key,
    request_key,
    retry_after_s,
    scrub,
)
from facelora.prepare.synthesis.rubric import json_schema, parse_answer, rubric_prompt

# GPT image models always answer base64 and refuse the legacy response_format parameter.
ALWAYS_B64 = ("gpt-image", "chatgpt-image")


class _OpenAIBackend:
    def __init__(self, settings: ApiParams, setting: str, backend: str):
        try:
            import openai
        except ImportError:
            raise EnvironmentProblem(
                f"{setting}.backend: {backend} needs the openai package: pip install openai"
            ) from None
        if not settings.model:
            raise SettingsError(f"{setting}.model: give the model id, e.g. gpt-image-1")
        self.settings, self.setting, self.model = settings, setting, settings.model
        self._openai = openai
        key = api_key(settings.api_key_env, f"{setting}.api_key_env")
        self.secrets: tuple[str, ...] = (key,) if key else ()
        self._client = openai.OpenAI(
            api_key=key or NO_KEY,
            base_url=settings.base_url,
            timeout=settings.timeout_s,
            max_retries=0,
        )

    def _failure(self, exc: Exception) -> Exception:
        """The SDK's exception as the runner's (or a user-facing one for a refused key)."""
        openai = self._openai
        if isinstance(exc, openai.APIStatusError):
            status, detail = exc.status_code, scrub(_detail(exc), self.secrets)
            if status in (401, 403):
                env = self.settings.api_key_env
                return refused_key(f"{self.setting}.api_key_env", env, status, detail, self.secrets)
            retry = retry_after_s(exc.response.headers)
            return ApiFailure(f"HTTP {status}: {detail}", status=status, retry_after=retry)
        if isinstance(exc, openai.APITimeoutError):
            timeout = self.settings.timeout_s
            return ApiFailure(f"no answer within {timeout:g} s ({self.setting}.timeout_s)")
        if isinstance(exc, openai.APIConnectionError):
            return ApiFailure(scrub(f"connection failed: {exc.__cause__ or exc}", self.secrets))
        if isinstance(exc, openai.APIResponseValidationError):
            return InvalidAnswer(str(exc))
        return exc

    def _post(self, create, **kwargs) -> tuple[dict[str, Any], str | None]:
        """One request: (the answer's JSON, the x-request-id header)."""
        try:
            raw = create(**kwargs)
        except self._openai.OpenAIError as exc:
            raise self._failure(exc) from None
        try:
            body = json.loads(raw.http_response.content)
        except ValueError as exc:
            raise InvalidAnswer(f"the answer is not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise InvalidAnswer("the answer is not a JSON object")
        return body, raw.headers.get("x-request-id")


class OpenAIImageEditor(_OpenAIBackend):
    """images/edits: the photo first, then any references; the answer's image as PNG."""

    def __init__(self, settings: GeneratorParams, setting: str = "synthesis.generator"):
        super().__init__(settings, setting, "openai")
        self.size = f"{settings.size}x{settings.size}"

    def request_key(self, images: list[bytes], instruction: str, seed: int) -> str:
        # the API takes no seed: it only tells variations apart
        return request_key(
            backend="openai",
            endpoint="images/edits",
            model=self.model,
            base_url=self.settings.base_url,
            size=self.size,
            images=images,
            instruction=instruction,
            seed=seed,
        )

    def edit(self, images: list[bytes], instruction: str, seed: int) -> EditAnswer:
        if not images:
            raise ValueError("edit needs the photo")
        files = [(f"image{i}.png", png, "image/png") for i, png in enumerate(images)]
        extra: dict[str, Any] = (
            {"output_format": "png"}
            if self.model.startswith(ALWAYS_B64)
            else {"response_format": "b64_json"}
        )
        body, request_id = self._post(
            self._client.images.with_raw_response.edit,
            model=self.model,
            prompt=instruction,
            image=files if len(files) > 1 else files[0],
            size=self.size,
            n=1,
            **extra,
        )
        data = body.get("data")
        b64 = data[0].get("b64_json") if isinstance(data, list) and data else None
        if not isinstance(b64, str) or not b64:
            raise InvalidAnswer("the answer holds no data[0].b64_json image")
        try:
            raw = base64.b64decode(b64, validate=True)
        except ValueError:
            raise InvalidAnswer("data[0].b64_json is not base64") from None
        return EditAnswer(as_png(raw, "data[0].b64_json"), request_id, self.model)


class OpenAIScorer(_OpenAIBackend):
    """chat/completions with the before and after PNGs and a strict rubric schema."""

    def __init__(self, settings: ScorerParams, setting: str = "synthesis.scorer"):
        super().__init__(settings, setting, "openai")
        self.rubric, self.describe = settings.rubric, settings.describe
        self.schema = json_schema(self.rubric, self.describe)

    def request_key(self, before: bytes, after: bytes, instruction: str | None) -> str:
        return request_key(
            backend="openai",
            endpoint="chat/completions",
            model=self.model,
            base_url=self.settings.base_url,
            prompt=rubric_prompt(self.rubric, self.describe, instruction),
            schema=self.schema,
            images=[before, after],
        )

    def score(self, before_png: bytes, after_png: bytes, instruction: str | None) -> ScoreAnswer:
        content = [
            {"type": "text", "text": rubric_prompt(self.rubric, self.describe, instruction)},
            {"type": "image_url", "image_url": {"url": _data_url(before_png)}},
            {"type": "image_url", "image_url": {"url": _data_url(after_png)}},
        ]
        body, request_id = self._post(
            self._client.chat.completions.with_raw_response.create,
            model=self.model,
            messages=[{"role": "user", "content": content}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "rubric", "strict": True, "schema": self.schema},
            },
        )
        try:
            choice = body["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise InvalidAnswer("the answer holds no choices[0].message") from None
        if message.get("refusal"):
            raise ApiFailure(f"the model refused: {message['refusal']}", transient=False)
        if choice.get("finish_reason") == "length":
            raise InvalidAnswer("the answer was cut off (finish_reason: length)")
        scores = parse_answer(message.get("content") or "", self.rubric, self.describe)
        return ScoreAnswer(scores, request_id or body.get("id"), body.get("model") or self.model)


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _detail(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(getattr(exc, "message", "") or exc)
