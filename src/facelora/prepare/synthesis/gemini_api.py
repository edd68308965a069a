"""The Gemini image editor (POST /v1beta/models/{model}:generateContent, image output).

`google-genai` is imported only when the editor is built. `base_url` goes to the client's
http_options (a local server can stand in); the SDK's own retries are off, so each call is
exactly one HTTP request and the request runner's retries and budget are the only ones.
"""

from __future__ import annotations

import re
from typing import Any

from facelora.config import GeneratorParams
from facelora.errors import EnvironmentProblem, SettingsError
from facelora.prepare.synthesis.requests import (
    NO_KEY,
    ApiFailure,
    EditAnswer,
    InvalidAnswer,
    api_key,
    as_png,
    refused_key,
    request_key,
    retry_after_s,
    scrub,
)

API_VERSION = "v1beta"
REFUSALS = ("SAFETY", "PROHIBITED", "BLOCKLIST", "SPII", "RECITATION")  # finish reasons
RETRY_DELAY = re.compile(r"^(\d+(?:\.\d+)?)s$")  # google.rpc.RetryInfo's retryDelay, e.g. "7s"


class GeminiImageEditor:
    """generateContent with the photo (then any references) as inline PNG parts and the
    instruction; the answer's first inline image, as PNG."""

    def __init__(self, settings: GeneratorParams, setting: str = "synthesis.generator"):
        try:
            import httpx
            from google import genai
            from google.genai import errors, types
        except ImportError:
            raise EnvironmentProblem(
                f"{setting}.backend: gemini needs the google-genai package: "
                "pip install google-genai"
            ) from None
        if not settings.model:
            raise SettingsError(f"{setting}.model: give the model id, e.g. gemini-2.5-flash-image")
        self.settings, self.setting, self.model = settings, setting, settings.model
        self._types, self._errors = types, errors
        self._transport = _transport_errors(httpx)
        key = api_key(settings.api_key_env, f"{setting}.api_key_env")
        self.secrets: tuple[str, ...] = (key,) if key else ()
        options = types.HttpOptions(
            base_url=settings.base_url,
            api_version=API_VERSION,
            timeout=max(1, round(settings.timeout_s * 1000)),  # milliseconds
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        self._client = genai.Client(vertexai=False, api_key=key or NO_KEY, http_options=options)

    def request_key(self, images: list[bytes], instruction: str, seed: int) -> str:
        return request_key(
            backend="gemini",
            endpoint="generateContent",
            model=self.model,
            base_url=self.settings.base_url,
            modalities=["IMAGE"],
            images=images,
            instruction=instruction,
            seed=seed,
        )

    def edit(self, images: list[bytes], instruction: str, seed: int) -> EditAnswer:
        if not images:
            raise ValueError("edit needs the photo")
        types = self._types
        parts = [types.Part.from_bytes(data=png, mime_type="image/png") for png in images]
        parts.append(types.Part.from_text(text=instruction))
        config = types.GenerateContentConfig(
            response_modalities=["IMAGE"], seed=seed, candidate_count=1
        )
        try:
            answer = self._client.models.generate_content(
                model=self.model, contents=[types.Content(role="user", parts=parts)], config=config
            )
        except self._errors.APIError as exc:
            raise self._failure(exc) from None
        except self._transport as exc:
            raise ApiFailure(scrub(self._transport_reason(exc), self.secrets)) from None
        except ValueError as exc:  # the SDK's JSON or pydantic decoding of a bad answer
            raise InvalidAnswer(f"the answer could not be read ({exc})") from None
        return EditAnswer(_image(answer), answer.response_id, answer.model_version or self.model)

    def _failure(self, exc: Any) -> Exception:
        status = int(exc.code or 0)
        detail = scrub(str(exc.message or exc), self.secrets)
        if status in (401, 403) or "API_KEY_INVALID" in str(exc.details):
            env = self.settings.api_key_env
            return refused_key(f"{self.setting}.api_key_env", env, status, detail, self.secrets)
        headers = getattr(exc.response, "headers", None)
        retry = retry_after_s(headers) if headers is not None else None
        if retry is None:
            retry = _retry_delay(exc.details)
        return ApiFailure(f"HTTP {status}: {detail}", status=status or None, retry_after=retry)

    def _transport_reason(self, exc: Exception) -> str:
        if "Timeout" in type(exc).__name__:
            return f"no answer within {self.settings.timeout_s:g} s ({self.setting}.timeout_s)"
        return f"connection failed: {type(exc).__name__}: {exc}"


def _transport_errors(httpx: Any) -> tuple[type[Exception], ...]:
    """httpx's transport errors, and httpx2's (the SDK uses the fork when installed)."""
    found: list[type[Exception]] = [httpx.TransportError]
    try:
        import httpx2

        found.append(httpx2.TransportError)
    except ImportError:
        pass
    return tuple(found)


def _image(answer: Any) -> bytes:
    candidates = answer.candidates or []
    if not candidates:
        feedback = answer.prompt_feedback
        reason = feedback.block_reason if feedback else None
        if reason:
            raise ApiFailure(f"the prompt was blocked ({reason})", transient=False)
        raise InvalidAnswer("the answer holds no candidates")
    content = candidates[0].content
    texts = []
    for part in (content.parts if content else None) or []:
        if part.inline_data is not None and part.inline_data.data:
            return as_png(part.inline_data.data, "the answer's inline image")
        if part.text:
            texts.append(part.text)
    finish = candidates[0].finish_reason
    said = f"; it said: {' '.join(texts)[:200]!r}" if texts else ""
    reason = f"the answer holds no image (finish reason {finish}){said}"
    if any(word in str(finish) for word in REFUSALS):  # the same request is refused again
        raise ApiFailure(reason, transient=False)
    raise InvalidAnswer(reason)


def _retry_delay(details: Any) -> float | None:
    """RetryInfo's retryDelay from a Google error body, if any."""
    error = details.get("error", details) if isinstance(details, dict) else None
    items = error.get("details") if isinstance(error, dict) else None
    for item in items if isinstance(items, list) else []:
        match = isinstance(item, dict) and RETRY_DELAY.match(str(item.get("retryDelay", "")))
        if match:
            return retry_after_s({"retry-after": match.group(1)})
    return None
