"""Real HTTP servers on 127.0.0.1 speaking the wire formats of the image-edit and VLM APIs,
for tests and benchmarks (not a test module).

`FakeApi` serves, on one port:
- POST /v1/images/edits (OpenAI, multipart: model, prompt, size, image or image[]): answers
  {"data": [{"b64_json": PNG}]}, the PNG being `edited_image(first image, prompt, size, None)`;
- POST /v1/chat/completions (OpenAI, JSON, two image_url data: URLs and a json_schema
  response_format): answers the JSON of `rubric_scores(before, after, schema)`;
- POST /v1beta/models/{model}:generateContent (Gemini, JSON, inlineData parts): answers an
  inlineData PNG, `edited_image(first image, text, None, generationConfig.seed)`.

The key is checked (Authorization: Bearer KEY, or x-goog-api-key): a wrong one gets OpenAI's
401, with the key it was sent echoed in the message (so tests see whether clients scrub it),
or Google's 400 API_KEY_INVALID. Faults are
queued per route with `fail(route, Fault(...), times=1)`. Every request lands in `hits` with a
fingerprint of its content, so tests can count requests and find repeated ones.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import io
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

ROUTES = ("edits", "chat", "gemini")
GEMINI_BAD_KEY = {
    "error": {
        "code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
        ],
    }
}
GEMINI_PATH = re.compile(r"^/v1beta/models/([^/:]+):generateContent$")


# --- what the server computes (tests compute the same to check answers) ------------------


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def photo(seed: int, side: int = 32) -> bytes:
    """A small deterministic test 'photo' (smooth gradients plus seeded noise), as PNG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200
    noise = rng.integers(0, 40, size=(side, side, 3))
    return png_bytes((base + noise).clip(0, 255).astype(np.uint8))


def edited_image(png: bytes, prompt: str, size: int | None, seed: int | None) -> bytes:
    """A deterministic 'edit': the photo resized, one channel shifted and a square painted,
    both chosen by the prompt and the seed."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    rgb = np.asarray(img).astype(np.int16)
    h = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
    rgb[..., h[0] % 3] = (rgb[..., h[0] % 3] + 16 + h[1] % 96) % 256
    side = max(1, rgb.shape[0] // 4)
    top, left = h[2] % (rgb.shape[0] - side + 1), h[3] % (rgb.shape[1] - side + 1)
    rgb[top : top + side, left : left + side] = (h[4], h[5], h[6])
    return png_bytes(rgb.astype(np.uint8))


def rubric_scores(before: bytes, after: bytes, schema: dict[str, Any]) -> dict[str, Any]:
    """A deterministic rubric answer: scores follow how much the after image differs."""
    a = np.asarray(Image.open(io.BytesIO(before)).convert("RGB"), dtype=np.float64)
    b = Image.open(io.BytesIO(after)).convert("RGB").resize((a.shape[1], a.shape[0]))
    change = float(np.abs(np.asarray(b, dtype=np.float64) - a).mean() / 255.0)
    out: dict[str, Any] = {}
    for name, prop in schema["properties"].items():
        if prop.get("type") == "number":
            lo, hi = prop["minimum"], prop["maximum"]
            frac = min(1.0, 4 * change)
            frac = 1.0 - frac if "identity" in name else frac
            out[name] = round(lo + (hi - lo) * frac, 4)
        else:
            out[name] = f"changed {100 * change:.1f}% on average"
    return out


# --- the server ---------------------------------------------------------------------------


@dataclass
class Fault:
    """What to do instead of answering: a status (with headers and a body), a sleep before
    answering normally, raw bytes as a 200 body, or a chosen answer content."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: dict | None = None
    sleep_s: float = 0.0
    raw: bytes | None = None
    content: str | None = None  # chat: the message content; edits/gemini: the base64 image


@dataclass
class Hit:
    route: str
    fingerprint: str
    status: int
    started: float
    fields: dict[str, Any]


class FakeApi:
    def __init__(self, key: str | None = "sk-test-0123456789abcdef", delay_s: float = 0.0):
        self.key, self.delay_s = key, delay_s
        self.hits: list[Hit] = []
        self.max_in_flight = 0
        self.errors: list[str] = []  # exceptions in the server itself (tests assert none)
        self._in_flight = 0
        self._faults: dict[str, list[list[Any]]] = {r: [] for r in ROUTES}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> FakeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    def fail(self, route: str, fault: Fault, times: int | None = 1) -> None:
        """Queue `fault` for the next `times` requests of `route` (None: every request)."""
        with self._lock:
            self._faults[route].append([fault, times])

    def clear_faults(self) -> None:
        with self._lock:
            for queue in self._faults.values():
                queue.clear()

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until no request is being answered (e.g. those of a killed client)."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)

    def count(self, route: str | None = None) -> int:
        return sum(1 for h in self.hits if route is None or h.route == route)

    def _next_fault(self, route: str) -> Fault | None:
        with self._lock:
            queue = self._faults[route]
            if not queue:
                return None
            fault, times = queue[0]
            if times is not None:
                queue[0][1] -= 1
                if queue[0][1] <= 0:
                    queue.pop(0)
            return fault

    def _record(self, hit: Hit) -> int:
        with self._lock:
            self.hits.append(hit)
            return len(self.hits) - 1

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1


def _handler(api: FakeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stall

        def log_message(self, *args) -> None:  # quiet: tests read `hits`
            pass

        def do_POST(self) -> None:
            started = time.monotonic()
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if len(body) < length:  # the client died while sending (a kill -9 test)
                return
            api._enter()
            try:
                self._serve(body, started)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test)
            except Exception as exc:  # a bug here: a 400 (never retried) that says so
                api.errors.append(repr(exc))
                self._send(400, {"error": {"message": f"fake server bug: {exc!r}"}})
            finally:
                api._leave()

        def _serve(self, body: bytes, started: float) -> None:
            path = self.path.split("?")[0]
            if path.endswith("/images/edits"):
                route, request = "edits", _parse_edit(self.headers["Content-Type"], body)
            elif path.endswith("/chat/completions"):
                route, request = "chat", _parse_chat(body)
            elif m := GEMINI_PATH.match(path):
                route, request = "gemini", _parse_gemini(m.group(1), body)
            else:
                return self._send(404, {"error": {"message": f"no route {path}"}})
            fingerprint = hashlib.sha256(
                json.dumps(request["fingerprint"], sort_keys=True).encode()
            ).hexdigest()
            self._hit = Hit(route, fingerprint, 0, started, request["fields"])
            self._answer(route, request)

        def _answer(self, route: str, request: dict[str, Any]) -> int:
            sent = self._sent_key(route)
            if api.key is not None and sent != api.key and route == "gemini":
                return self._send(400, GEMINI_BAD_KEY)  # what Google answers (no 401)
            if api.key is not None and sent != api.key:
                return self._error(route, 401, f"Incorrect API key provided: {sent}")
            if api.delay_s:
                time.sleep(api.delay_s)
            fault = api._next_fault(route) or Fault()
            if fault.sleep_s:
                time.sleep(fault.sleep_s)
            if fault.status is not None:
                message = (fault.body or {}).get("message", f"fault {fault.status}")
                return self._error(route, fault.status, message, fault.headers)
            if fault.raw is not None:
                return self._send(200, fault.raw)
            return self._send(200, ANSWERS[route](request, fault.content, len(api.hits)))

        def _sent_key(self, route: str) -> str | None:
            if route == "gemini":
                return self.headers.get("x-goog-api-key")
            auth = self.headers.get("Authorization") or ""
            return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None

        def _error(self, route: str, status: int, message: str, headers=None) -> int:
            headers = dict(headers or {})
            if route == "gemini":
                names = {429: "RESOURCE_EXHAUSTED", 401: "UNAUTHENTICATED"}
                error = {"code": status, "message": message, "status": names.get(status, "X")}
                if status == 429 and "retryDelay" in headers:
                    delay = headers.pop("retryDelay")
                    error["details"] = [
                        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
                    ]
                return self._send(status, {"error": error}, headers)
            error = {"message": message, "type": "invalid_request_error", "code": None}
            return self._send(status, {"error": error}, headers)

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> int:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            hit, self._hit = getattr(self, "_hit", None), None
            n = len(api.hits)
            if hit is not None:  # logged before the client can see the answer
                hit.status = status
                n = api._record(hit)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-request-id", f"req_{n}")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            return status

    return Handler


# --- the three wire formats -----------------------------------------------------------------


def _parse_edit(content_type: str, body: bytes) -> dict[str, Any]:
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, Any] = {"images": []}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if name in ("image", "image[]"):
            fields["images"].append(data)
            fields["image_field"] = name
        else:
            fields[name] = data.decode()
    shown = {k: v for k, v in fields.items() if k != "images"}
    shown["image_hashes"] = [hashlib.sha256(i).hexdigest() for i in fields["images"]]
    return {"fields": shown, "fingerprint": shown, "images": fields["images"], **fields}


def _parse_chat(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    content = data["messages"][0]["content"]
    images = [
        base64.b64decode(c["image_url"]["url"].split(",", 1)[1])
        for c in content
        if c["type"] == "image_url"
    ]
    text = " ".join(c["text"] for c in content if c["type"] == "text")
    schema = data["response_format"]["json_schema"]["schema"]
    fields = {
        "model": data["model"],
        "text": text,
        "response_format": data["response_format"],
        "image_hashes": [hashlib.sha256(i).hexdigest() for i in images],
    }
    return {"fields": fields, "fingerprint": fields, "images": images, "schema": schema}


def _parse_gemini(model: str, body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    parts = data["contents"][0]["parts"]
    images = [_b64(p["inlineData"]["data"]) for p in parts if "inlineData" in p]
    text = " ".join(p["text"] for p in parts if "text" in p)
    config = data.get("generationConfig", {})
    fields = {
        "model": model,
        "text": text,
        "seed": config.get("seed"),
        "modalities": config.get("responseModalities"),
        "image_hashes": [hashlib.sha256(i).hexdigest() for i in images],
    }
    return {"fields": fields, "fingerprint": fields, "images": images}


def _b64(text: str) -> bytes:
    """Standard or URL-safe base64 (the Gemini SDK sends the latter), padding optional."""
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _edits_answer(request: dict[str, Any], content: str | None, n: int) -> dict[str, Any]:
    size = int(request["size"].split("x")[0]) if request.get("size") else None
    if content is None:
        png = edited_image(request["images"][0], request["prompt"], size, None)
        content = base64.b64encode(png).decode()
    return {"created": int(time.time()), "data": [{"b64_json": content}]}


def _chat_answer(request: dict[str, Any], content: str | None, n: int) -> dict[str, Any]:
    if content is None:
        content = json.dumps(rubric_scores(*request["images"][:2], request["schema"]))
    message = {"role": "assistant", "content": content, "refusal": None}
    return {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request["fields"]["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _gemini_answer(request: dict[str, Any], content: str | None, n: int) -> dict[str, Any]:
    fields = request["fields"]
    if content is None:
        png = edited_image(request["images"][0], fields["text"], None, fields["seed"])
        content = base64.b64encode(png).decode()
    part = {"inlineData": {"mimeType": "image/png", "data": content}}
    return {
        "candidates": [
            {"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}
        ],
        "responseId": f"resp-{n}",
        "modelVersion": fields["model"],
        "usageMetadata": {"promptTokenCount": 1, "totalTokenCount": 2},
    }


ANSWERS = {"edits": _edits_answer, "chat": _chat_answer, "gemini": _gemini_answer}
