"""The request runner every API backend shares.

Requests are keyed by everything that determines their answer (`request_key`); finished
answers are kept on disk (`RequestCache`), so a rerun, a run resumed after `kill -9` or a DVC
experiment never pays for one twice. `run_requests` sends the rest through a thread pool with
retries (429, 5xx, timeouts, invalid answers), honours Retry-After, and stops cleanly when the
budget of HTTP requests (`max_requests`) is spent. The API key never reaches anything written.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import json
import logging
import math
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from facelora.config import ApiParams
from facelora.errors import EnvironmentProblem, SettingsError
from facelora.io.atomic import atomic_path, write_json
from facelora.io.progress import progress

log = logging.getLogger(__name__)

KEY_VERSION = 1  # bump when the meaning of a request changes: old answers stop matching
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is capped: the next 429 says so again
MAX_BACKOFF_S = 60.0
TRANSIENT_STATUS = frozenset({408, 409, 429})  # plus every 5xx
SECRET_PARTS = frozenset({"api_key", "apikey", "key", "token", "secret", "password"})
SCRUBBED = "[api key]"
NO_KEY = "no-key"  # sent when api_key_env is null (a local server without authentication)

Status = Literal["ok", "cached", "failed", "not_run"]


# --- keys and secrets -----------------------------------------------------------------------


def request_key(**parts: Any) -> str:
    """sha256 over canonical JSON of what determines the answer (bytes are hashed first)."""
    secret = sorted(name for name in parts if name.lower() in SECRET_PARTS)
    if secret:
        raise SettingsError(
            f"request_key: {', '.join(secret)} looks like a credential; a key is made of "
            "what determines the answer, never of the API key"
        )
    try:
        text = json.dumps(
            {"parts": _canonical(parts), "version": KEY_VERSION},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"request_key: {exc}; pass text, numbers or bytes") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def api_key(env_name: str | None, setting: str) -> str | None:
    """The key from the environment variable named by `setting` (None: no key is sent)."""
    if env_name is None:
        return None
    value = os.environ.get(env_name, "").strip()
    if not value:
        state = "empty" if env_name in os.environ else "not set"
        raise EnvironmentProblem(
            f"{setting}: the environment variable {env_name} is {state}; export it "
            "(the key is never read from params.yaml)"
        )
    return value


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, SCRUBBED)
    return text


def refused_key(
    setting: str, env_name: str | None, status: int, detail: str, secrets: Iterable[str]
) -> EnvironmentProblem:
    """The error for a 401/403: the user must fix the key, retrying cannot help."""
    detail = scrub(detail, secrets)[:300]
    if env_name:
        text = (
            f"{setting}: the server refused the key in the environment variable {env_name} "
            f"(HTTP {status}: {detail}); export the right key and run again"
        )
    else:
        text = (
            f"{setting} is not set, so no key was sent, and the server asks for one "
            f"(HTTP {status}: {detail}); set it to the NAME of the variable holding the key"
        )
    return EnvironmentProblem(text)


# --- what calls raise ---------------------------------------------------------------------


class InvalidAnswer(Exception):
    """The server answered, but not with what was asked (bad JSON, schema, image): retried."""


class ApiFailure(Exception):
    """A request without a usable answer; status None: none came (timeout, connection).
    Retried when transient: by default 408, 409, 429, 5xx and no status."""

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        transient: bool | None = None,
    ):
        super().__init__(reason)
        self.status, self.retry_after = status, retry_after
        if transient is None:
            transient = status is None or status in TRANSIENT_STATUS or status >= 500
        self.transient = transient


def retry_after_s(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    if not headers:
        return None
    if (ms := _number(headers.get("retry-after-ms"))) is not None:
        return min(max(ms / 1000.0, 0.0), MAX_RETRY_AFTER_S)
    value = (headers.get("retry-after") or "").strip()
    seconds = _number(value)
    if seconds is None and value:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return None if seconds is None else min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _number(value: str | None) -> float | None:
    try:
        out = float(value) if value else None
    except ValueError:
        return None
    return out if out is not None and math.isfinite(out) else None


# --- answers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the cache keeps for a request: a JSON-able record and optional bytes (a PNG)."""

    record: dict[str, Any]
    payload: bytes | None = None


@dataclass(frozen=True)
class EditAnswer:
    png: bytes
    request_id: str | None
    model: str

    def to_answer(self) -> Answer:
        return Answer({"request_id": self.request_id, "model": self.model}, self.png)

    @classmethod
    def from_answer(cls, answer: Answer) -> EditAnswer:
        if answer.payload is None:
            raise InvalidAnswer("the cached edit has no image")
        return cls(answer.payload, answer.record.get("request_id"), answer.record["model"])


@dataclass(frozen=True)
class ScoreAnswer:
    scores: dict[str, Any]  # vlm_<name>: number, and vlm_description when asked for
    request_id: str | None
    model: str

    def to_answer(self) -> Answer:
        return Answer({"scores": self.scores, "request_id": self.request_id, "model": self.model})

    @classmethod
    def from_answer(cls, answer: Answer) -> ScoreAnswer:
        rec = answer.record
        return cls(dict(rec["scores"]), rec.get("request_id"), rec["model"])


def as_png(data: bytes, what: str = "the answer") -> bytes:
    """Verify that `data` decodes as an image; returns it as PNG (converted if needed)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidAnswer(f"{what} holds no image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.width < 1 or img.height < 1:
                raise InvalidAnswer(f"{what} is an empty image")
            if img.format == "PNG":
                return data
            buf = io.BytesIO()
            img.convert("RGBA" if "A" in img.getbands() else "RGB").save(buf, "PNG")
            return buf.getvalue()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InvalidAnswer(f"{what} is not a readable image ({exc})") from None


# --- the cache ------------------------------------------------------------------------------


class RequestCache:
    """One finished answer per key: KEY.bin (the payload) then KEY.json (the record), both
    written atomically, the record last, so a record on disk means the answer is complete.
    KEY.failed.json notes the last failure (never read as done; removed on success)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, key: str, suffix: str) -> Path:
        return self.folder / key[:2] / f"{key}{suffix}"

    def get(self, key: str) -> Answer | None:
        try:
            entry = json.loads(self._path(key, ".json").read_text(encoding="utf-8"))
            record = entry["record"]
            payload = None
            if entry.get("payload_sha256"):
                payload = self._path(key, ".bin").read_bytes()
                if hashlib.sha256(payload).hexdigest() != entry["payload_sha256"]:
                    return None  # damaged by hand: asked again
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return Answer(record, payload) if isinstance(record, dict) else None

    def put(self, key: str, record: dict[str, Any], payload: bytes | None = None, **meta) -> None:
        entry = {"key": key, "record": record, "finished": _now(), **meta}
        if payload is not None:
            with atomic_path(self._path(key, ".bin")) as tmp:
                tmp.write_bytes(payload)
            entry.update(
                payload_sha256=hashlib.sha256(payload).hexdigest(), payload_bytes=len(payload)
            )
        write_json(self._path(key, ".json"), entry)
        self._path(key, ".failed.json").unlink(missing_ok=True)

    def note_failure(self, key: str, reason: str, attempts: int, status: int | None) -> None:
        entry = {"key": key, "reason": reason, "attempts": attempts, "status": status}
        write_json(self._path(key, ".failed.json"), {**entry, "when": _now()})

    def failures(self) -> list[dict[str, Any]]:
        """The failure notes of requests not (yet) answered."""
        out = []
        for path in sorted(self.folder.glob("??/*.failed.json")):
            if not self._path(path.name.removesuffix(".failed.json"), ".json").exists():
                out.append(json.loads(path.read_text(encoding="utf-8")))
        return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- the runner -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    key: str  # request_key(...) of the request
    request: Any  # what `call` needs (images, instruction, seed...)


@dataclass(frozen=True)
class Outcome:
    job: Job
    status: Status
    answer: Answer | None = None
    reason: str | None = None  # failed / not_run: why (the key scrubbed)
    attempts: int = 0  # HTTP requests sent for this job in this run
    http_status: int | None = None


class _Budget:
    def __init__(self, limit: int | None):
        self.limit, self.sent, self.ran_out = limit, 0, False
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.limit is not None and self.sent >= self.limit:
                self.ran_out = True
                return False
            self.sent += 1
            return True


class RequestRun:
    """Iterate once for one Outcome per job, in job order; then `report()` says how far it got.

    A FaceloraError from `call` (a refused key) stops the run: in-flight requests finish and
    are kept, then it is raised. Any other unexpected exception is a bug and is raised too."""

    def __init__(
        self,
        jobs: Sequence[Job],
        call: Callable[[Any], Answer],
        *,
        cache: RequestCache,
        concurrency: int,
        retries: int,
        max_requests: int | None,
        progress_desc: str,
        secrets: Sequence[str],
        setting: str,
        backoff_s: float,
    ):
        self.jobs, self.call, self.cache = jobs, call, cache
        self.concurrency, self.retries = max(1, concurrency), retries
        self.progress_desc, self.secrets, self.setting = progress_desc, tuple(secrets), setting
        self.backoff_s = backoff_s
        self.budget = _Budget(max_requests)
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._started = False

    @property
    def sent(self) -> int:
        return self.budget.sent

    def __iter__(self) -> Iterator[Outcome]:
        if self._started:
            raise RuntimeError("a RequestRun is iterated once; call run_requests again")
        self._started = True
        window = 4 * self.concurrency  # outcomes held for in-order delivery (bounds memory)
        pending: deque[tuple[Job, Outcome | Future[Outcome], bool]] = deque()  # bool: sent for it
        running: dict[str, Future[Outcome]] = {}
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="facelora-request")
        bar = progress(total=len(self.jobs), desc=self.progress_desc, unit="request")
        try:
            for job in self.jobs:
                cached = self.cache.get(job.key)
                if cached is not None:
                    pending.append((job, Outcome(job, "cached", cached), False))
                elif job.key in running:  # the same request twice: sent once
                    pending.append((job, running[job.key], False))
                else:
                    running[job.key] = pool.submit(self._one, job)
                    pending.append((job, running[job.key], True))
                while pending and (len(pending) > window or _ready(pending[0][1])):
                    yield self._deliver(*pending.popleft(), running, bar)
            while pending:
                yield self._deliver(*pending.popleft(), running, bar)
            unfinished = self.budget.ran_out or self.counts["failed"]
            (log.warning if unfinished else log.info)("%s: %s", self.progress_desc, self.report())
        finally:
            self._stop.set()  # an early exit (an error, the caller stopped): no more retries
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _deliver(self, job, item, sent, running, bar) -> Outcome:
        out = item if isinstance(item, Outcome) else item.result()
        if sent:
            running.pop(job.key, None)
        elif out.status != "cached":  # a duplicate of a request sent for an earlier job
            done = "cached" if out.status == "ok" else out.status
            out = replace(out, job=job, status=done, attempts=0)
        self.counts[out.status] += 1
        bar.update(1)
        bar.set_postfix_str(self._tally(), refresh=False)
        return out

    def _one(self, job: Job) -> Outcome:
        try:
            return self._attempts(job)
        except BaseException:
            self._stop.set()  # a refused key or a bug: start nothing more
            raise

    def _attempts(self, job: Job) -> Outcome:
        rng = random.Random(job.key)  # seeded jitter: reruns wait the same
        attempts, reason, status = 0, "", None
        while True:
            if self._stop.is_set() or not self.budget.take():
                why = (
                    "stopped"
                    if self._stop.is_set()
                    else f"the request budget {self.setting}.max_requests "
                    f"({self.budget.limit}) ran out"
                )
                if attempts == 0:
                    return Outcome(job, "not_run", reason=why)
                return self._failed(
                    job, attempts, f"{why} before retry {attempts}; {reason}", status
                )
            attempts += 1
            wait = None
            try:
                answer = self.call(job.request)
            except InvalidAnswer as exc:
                reason, status, transient = f"invalid answer: {exc}", None, True
            except ApiFailure as exc:
                reason, status, transient, wait = (
                    str(exc),
                    exc.status,
                    exc.transient,
                    exc.retry_after,
                )
            except (TimeoutError, ConnectionError) as exc:
                reason, status, transient = f"{type(exc).__name__}: {exc}", None, True
            else:
                record = json.loads(scrub(json.dumps(answer.record), self.secrets))
                self.cache.put(job.key, record, answer.payload, attempts=attempts)
                return Outcome(job, "ok", Answer(record, answer.payload), attempts=attempts)
            reason = scrub(reason, self.secrets)
            if not transient or attempts > self.retries:
                return self._failed(job, attempts, reason, status)
            if wait is None:
                wait = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempts - 1))
                wait *= 0.5 + rng.random() / 2
            self._stop.wait(wait)

    def _failed(self, job: Job, attempts: int, reason: str, status: int | None) -> Outcome:
        self.cache.note_failure(job.key, reason, attempts, status)
        return Outcome(job, "failed", reason=reason, attempts=attempts, http_status=status)

    def _tally(self) -> str:
        c = self.counts
        return f"{c['ok']} ok, {c['cached']} cached, {c['failed']} failed, {c['not_run']} not run"

    def report(self) -> str:
        """How far the run got, in words."""
        done = f"{self._tally()} of {len(self.jobs)} ({self.sent} HTTP requests sent)"
        if self.budget.ran_out:
            return (
                f"{self.setting}.max_requests ({self.budget.limit}) ran out: {done}. Finished "
                "answers are kept; run again (with a larger budget) to do the rest"
            )
        if self.counts["failed"]:
            return (
                f"{done}. Failed requests are asked again on the next run (reasons in "
                f"{self.cache.folder}/*/*.failed.json)"
            )
        return done


def _ready(item: Outcome | Future[Outcome]) -> bool:
    return isinstance(item, Outcome) or item.done()


def api_settings(settings: ApiParams) -> dict[str, Any]:
    """run_requests' keyword arguments from a backend's settings (timeout_s goes to the
    client, the only place that can stop a request)."""
    return {
        "concurrency": settings.concurrency,
        "retries": settings.retries,
        "max_requests": settings.max_requests,
    }


def run_requests(
    jobs: Iterable[Job],
    call: Callable[[Any], Answer],
    *,
    cache: RequestCache,
    concurrency: int = 4,
    retries: int = 4,
    max_requests: int | None = None,
    progress_desc: str = "requests",
    setting: str,
    secrets: Sequence[str] = (),
    backoff_s: float = 1.0,
) -> RequestRun:
    """Answer every job: from `cache`, else by `call(job.request)` (one HTTP request per
    call; timeouts are the client's). `setting` (e.g. synthesis.generator) names the budget
    in the report; `secrets` (the API key) are scrubbed from every reason and record."""
    return RequestRun(
        list(jobs),
        call,
        cache=cache,
        concurrency=concurrency,
        retries=retries,
        max_requests=max_requests,
        progress_desc=progress_desc,
        secrets=secrets,
        setting=setting,
        backoff_s=backoff_s,
    )
