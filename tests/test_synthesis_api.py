"""The API backends and the request runner, against real HTTP servers on 127.0.0.1
(tests/api_servers.py) speaking the OpenAI and Gemini wire formats."""

from __future__ import annotations

import email.utils
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facelora.config import GeneratorParams, RubricItem, ScorerParams
from facelora.errors import EnvironmentProblem, SettingsError
from facelora.prepare.synthesis.gemini_api import GeminiImageEditor
from facelora.prepare.synthesis.openai_api import OpenAIImageEditor, OpenAIScorer
from facelora.prepare.synthesis.requests import (
    MAX_RETRY_AFTER_S,
    Answer,
    ApiFailure,
    InvalidAnswer,
    Job,
    RequestCache,
    api_key,
    request_key,
    retry_after_s,
    run_requests,
)
from facelora.prepare.synthesis.rubric import json_schema, parse_answer, rubric_prompt

from api_servers import FakeApi, Fault, edited_image, photo, rubric_scores

ENV = "FACELORA_TEST_API_KEY"
KEY = "sk-test-0123456789abcdef"
FAST = {"backoff_s": 0.01}  # retries without waiting (Retry-After still rules)


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with FakeApi(key=KEY) as server:
        yield server
    assert not server.errors, server.errors


def openai_editor(api: FakeApi, **kw) -> OpenAIImageEditor:
    settings = dict(backend="openai", model="gpt-image-1", size=48, api_key_env=ENV)
    return OpenAIImageEditor(GeneratorParams(base_url=api.openai_url, **{**settings, **kw}))


def gemini_editor(api: FakeApi, **kw) -> GeminiImageEditor:
    settings = dict(backend="gemini", model="gemini-test-image", api_key_env=ENV)
    return GeminiImageEditor(GeneratorParams(base_url=api.url, **{**settings, **kw}))


def scorer(api: FakeApi, **kw) -> OpenAIScorer:
    settings = dict(backend="openai", model="vlm-test", api_key_env=ENV)
    return OpenAIScorer(ScorerParams(base_url=api.openai_url, **{**settings, **kw}))


def edit_jobs(editor, n: int, prompt: str = "make the person smile") -> list[Job]:
    jobs = []
    for i in range(n):
        request = ([photo(i)], f"{prompt} {i}", i)
        jobs.append(Job(editor.request_key(*request), request))
    return jobs


def edit_call(editor):
    return lambda request: editor.edit(*request).to_answer()


def run_all(jobs, call, cache, **kw):
    run = run_requests(jobs, call, cache=cache, setting="synthesis.generator", **{**FAST, **kw})
    return list(run), run


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# --- the backends speak the wire formats ---------------------------------------------------


def test_openai_edit_is_the_servers_edit_of_the_photo(api):
    editor = openai_editor(api)
    face, reference = photo(1), photo(2)
    answer = editor.edit([face, reference], "close the eyes", seed=0)
    expected = edited_image(face, "close the eyes", 48, None)
    assert np.array_equal(pixels(answer.png), pixels(expected))  # the photo went first
    sent = api.hits[-1].fields
    assert sent["image_field"] == "image[]" and len(sent["image_hashes"]) == 2
    assert (sent["model"], sent["size"], sent["output_format"]) == ("gpt-image-1", "48x48", "png")
    assert "response_format" not in sent  # GPT image models refuse it
    assert answer.request_id == "req_0" and answer.model == "gpt-image-1"

    legacy = openai_editor(api, model="dall-e-2")
    legacy.edit([face], "close the eyes", seed=0)
    assert api.hits[-1].fields["image_field"] == "image"
    assert api.hits[-1].fields["response_format"] == "b64_json"


def test_gemini_edit_sends_photo_instruction_and_seed(api):
    editor = gemini_editor(api)
    face = photo(3)
    one, two = (
        editor.edit([face], "raise the eyebrows", 7),
        editor.edit([face], "raise the eyebrows", 8),
    )
    assert np.array_equal(
        pixels(one.png), pixels(edited_image(face, "raise the eyebrows", None, 7))
    )
    assert not np.array_equal(pixels(one.png), pixels(two.png))
    sent = api.hits[0].fields
    assert (sent["model"], sent["seed"], sent["modalities"]) == ("gemini-test-image", 7, ["IMAGE"])
    assert one.request_id == "resp-0" and one.model == "gemini-test-image"


def test_openai_scorer_rates_the_two_images_with_a_strict_schema(api):
    vlm = scorer(api)
    before, after = photo(4), edited_image(photo(4), "smile", None, 1)
    answer = vlm.score(before, after, "make the person smile")
    schema = json_schema(vlm.rubric, True)
    expected = rubric_scores(before, after, schema)
    assert answer.scores == {f"vlm_{k}": v for k, v in expected.items()}
    assert answer.scores["vlm_identity_kept"] != answer.scores["vlm_instruction_success"]
    sent = api.hits[0].fields
    assert sent["response_format"]["json_schema"] == {
        "name": "rubric",
        "strict": True,
        "schema": schema,
    }
    assert "make the person smile" in sent["text"]
    assert answer.request_id == "req_0" and answer.model == "vlm-test"


# --- the cache and the runner ----------------------------------------------------------------


def test_a_cached_rerun_sends_no_request(api, tmp_path):
    editor, cache = openai_editor(api), RequestCache(tmp_path / "cache")
    jobs = edit_jobs(editor, 6)
    first, _ = run_all(jobs, edit_call(editor), cache, concurrency=3)
    assert [o.status for o in first] == ["ok"] * 6
    assert [o.job for o in first] == jobs  # in job order
    assert api.count() == 6
    again, run = run_all(jobs, edit_call(editor), cache, concurrency=3)
    assert [o.status for o in again] == ["cached"] * 6
    assert api.count() == 6 and run.sent == 0
    assert [o.answer.payload for o in again] == [o.answer.payload for o in first]
    assert again[0].answer.record["request_id"] == first[0].answer.record["request_id"]


def test_the_same_request_twice_is_sent_once(api, tmp_path):
    editor = openai_editor(api)
    job = edit_jobs(editor, 1)[0]
    twin = Job(job.key, job.request)
    out, _ = run_all([job, twin], edit_call(editor), RequestCache(tmp_path), concurrency=2)
    assert [o.status for o in out] == ["ok", "cached"] and api.count() == 1


def test_concurrency_is_the_limit_of_requests_in_flight(api, tmp_path):
    api.delay_s = 0.1
    api.fail("edits", Fault(sleep_s=0.3))  # the first job answers last
    editor = openai_editor(api)
    jobs = edit_jobs(editor, 8)
    out, _ = run_all(jobs, edit_call(editor), RequestCache(tmp_path), concurrency=3)
    assert api.max_in_flight == 3
    answered = [h.fields["prompt"] for h in api.hits]
    assert answered != [j.request[1] for j in jobs]  # the server answered out of order
    assert [o.job for o in out] == jobs  # the runner did not


def test_a_record_on_disk_means_done(tmp_path):
    cache = RequestCache(tmp_path)
    cache.put("ab" * 32, {"model": "m"}, b"png bytes")
    assert cache.get("ab" * 32).payload == b"png bytes"
    payload_only = cache.folder / "cd" / ("cd" * 32 + ".bin")  # killed before the record
    payload_only.parent.mkdir()
    payload_only.write_bytes(b"half")
    assert cache.get("cd" * 32) is None
    (cache.folder / "ab" / ("ab" * 32 + ".bin")).write_bytes(b"damaged")
    assert cache.get("ab" * 32) is None


def test_request_key_covers_the_answer_and_never_the_api_key(api, monkeypatch):
    base = dict(model="m", images=[b"photo"], instruction="smile", seed=1, size="48x48")
    key = request_key(**base)
    assert key == request_key(**dict(reversed(base.items())))
    for change in ({"images": [b"photO"]}, {"seed": 2}, {"size": "64x64"}, {"model": "n"}):
        assert request_key(**{**base, **change}) != key, change
    with pytest.raises(SettingsError, match="api_key"):
        request_key(**base, api_key=KEY)
    args = ([photo(0)], "smile", 0)
    one = openai_editor(api).request_key(*args)
    monkeypatch.setenv(ENV, "sk-another-key-9876543210")
    assert openai_editor(api).request_key(*args) == one
    assert openai_editor(api, size=64).request_key(*args) != one
    assert gemini_editor(api).request_key(*args) != one


# --- retries ------------------------------------------------------------------------------


def test_429_waits_as_long_as_retry_after_says(api, tmp_path):
    api.fail("edits", Fault(status=429, headers={"Retry-After": "1"}))
    editor = openai_editor(api)
    (out,), _ = run_all(edit_jobs(editor, 1), edit_call(editor), RequestCache(tmp_path))
    assert out.status == "ok" and out.attempts == 2
    first, second = api.hits
    assert (first.status, second.status) == (429, 200)
    assert 0.95 <= second.started - first.started < 3.0


def test_gemini_429_waits_for_the_retry_delay_in_the_body(api, tmp_path):
    api.fail("gemini", Fault(status=429, headers={"retryDelay": "0.5s"}))
    editor = gemini_editor(api)
    (out,), _ = run_all(edit_jobs(editor, 1), edit_call(editor), RequestCache(tmp_path))
    assert out.status == "ok" and out.attempts == 2
    assert 0.45 <= api.hits[1].started - api.hits[0].started < 2.5


def test_retry_after_reads_seconds_dates_and_milliseconds():
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_s({"retry-after": date}, now=now) == pytest.approx(30, abs=1)
    assert retry_after_s({"retry-after": "2.5"}) == 2.5
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "86400"}) == MAX_RETRY_AFTER_S
    assert retry_after_s({"retry-after": email.utils.formatdate(now - 5)}, now=now) == 0.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def test_500_then_success(api, tmp_path):
    api.fail("edits", Fault(status=500), times=2)
    editor = openai_editor(api)
    (out,), _ = run_all(edit_jobs(editor, 1), edit_call(editor), RequestCache(tmp_path))
    assert (out.status, out.attempts) == ("ok", 3)
    assert [h.status for h in api.hits] == [500, 500, 200]


def test_a_timeout_is_retried(api, tmp_path):
    api.fail("gemini", Fault(sleep_s=1.5))
    editor = gemini_editor(api, timeout_s=0.3)
    start = time.monotonic()
    (out,), _ = run_all(edit_jobs(editor, 1), edit_call(editor), RequestCache(tmp_path))
    assert (out.status, out.attempts) == ("ok", 2)
    assert time.monotonic() - start < 1.4  # the client gave up; it did not wait for the answer


def test_malformed_json_is_retried_then_recorded_and_asked_again_next_run(api, tmp_path):
    api.fail("edits", Fault(raw=b'{"data": [{"b64_json": '), times=None)
    editor, cache = openai_editor(api), RequestCache(tmp_path)
    jobs = edit_jobs(editor, 1)
    (out,), run = run_all(jobs, edit_call(editor), cache, retries=2)
    assert (out.status, out.attempts) == ("failed", 3) and "not JSON" in out.reason
    assert api.count() == 3 and cache.get(jobs[0].key) is None
    (note,) = cache.failures()
    assert note["attempts"] == 3 and "not JSON" in note["reason"]
    assert "1 failed" in run.report()
    api.clear_faults()
    (out,), _ = run_all(jobs, edit_call(editor), cache)
    assert (out.status, out.attempts) == ("ok", 1) and cache.failures() == []


@pytest.mark.parametrize("make", [openai_editor, gemini_editor])
def test_an_answer_that_is_no_image_is_invalid(api, tmp_path, make):
    route = "edits" if make is openai_editor else "gemini"
    api.fail(route, Fault(content="aGVsbG8gd29ybGQ="), times=None)  # base64 of "hello world"
    editor = make(api)
    with pytest.raises(InvalidAnswer, match="not a readable image"):
        editor.edit([photo(0)], "smile", 0)
    (out,), _ = run_all(edit_jobs(editor, 1), edit_call(editor), RequestCache(tmp_path), retries=1)
    assert (out.status, out.attempts) == ("failed", 2)


def test_a_chat_answer_outside_the_rubric_is_retried_then_failed(api, tmp_path):
    bad = {"instruction_success": 9, "identity_kept": 3, "artifacts": 3, "intensity": 0.5}
    api.fail("chat", Fault(content=json.dumps({**bad, "description": "x"})), times=None)
    vlm = scorer(api)
    request = (photo(0), photo(1), "smile")
    job = Job(vlm.request_key(*request), request)
    call = lambda r: vlm.score(*r).to_answer()  # noqa: E731
    (out,), _ = run_all([job], call, RequestCache(tmp_path), retries=1)
    assert (out.status, out.attempts) == ("failed", 2)
    assert "instruction_success" in out.reason and "maximum of 5" in out.reason
    api.clear_faults()
    (out,), _ = run_all([job], call, RequestCache(tmp_path))
    assert out.status == "ok" and out.answer.record["scores"]["vlm_instruction_success"] <= 5


def test_a_400_is_not_retried_and_its_reason_is_kept(api, tmp_path):
    api.fail("edits", Fault(status=400, body={"message": "the image is too small"}))
    editor = openai_editor(api)
    (out,), _ = run_all(edit_jobs(editor, 1), edit_call(editor), RequestCache(tmp_path))
    assert (out.status, out.attempts, out.http_status) == ("failed", 1, 400)
    assert "HTTP 400: the image is too small" in out.reason and api.count() == 1


# --- keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "status"), [(openai_editor, 401), (gemini_editor, 400)])
def test_a_wrong_key_stops_the_run_with_the_variable_named(
    api, tmp_path, monkeypatch, make, status
):
    wrong = "sk-wrong-key-5555555555"
    monkeypatch.setenv(ENV, wrong)
    editor = make(api)
    with pytest.raises(EnvironmentProblem, match=rf"synthesis.generator.api_key_env: .* {ENV}"):
        run_all(edit_jobs(editor, 5), edit_call(editor), RequestCache(tmp_path), concurrency=1)
    assert [h.status for h in api.hits] == [status]  # not retried, nothing more started
    with pytest.raises(EnvironmentProblem) as info:
        editor.edit([photo(0)], "smile", 0)
    assert wrong not in str(info.value)
    if make is openai_editor:  # the server echoed the key
        assert "[api key]" in str(info.value)


@pytest.mark.parametrize("value", [None, "", "  "])
def test_a_missing_key_variable_is_named(api, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ENV)
    else:
        monkeypatch.setenv(ENV, value)
    for make in (openai_editor, gemini_editor, scorer):
        with pytest.raises(
            EnvironmentProblem, match=rf"api_key_env: the environment variable {ENV}"
        ):
            make(api)
    with pytest.raises(EnvironmentProblem, match="synthesis.scorer.api_key_env: .*export it"):
        api_key(ENV, "synthesis.scorer.api_key_env")
    assert api_key(None, "synthesis.scorer.api_key_env") is None


def test_the_key_is_never_written(api, tmp_path):
    api.fail("edits", Fault(status=400, body={"message": f"rejected (you sent {KEY})"}))
    api.fail("edits", Fault(status=500, body={"message": f"oops {KEY}"}), times=None)
    editor, folder = openai_editor(api), tmp_path / "cache"

    def written() -> list[bytes]:
        return [p.read_bytes() for p in folder.rglob("*") if p.is_file()]

    out, run = run_all(edit_jobs(editor, 2), edit_call(editor), RequestCache(folder), retries=1)
    assert [o.status for o in out] == ["failed", "failed"]
    assert "[api key]" in out[0].reason and "[api key]" in out[1].reason  # echoed, scrubbed
    notes = written()
    assert len(notes) == 2 and all(b"[api key]" in note for note in notes)
    api.clear_faults()
    out2, run2 = run_all(edit_jobs(editor, 3), edit_call(editor), RequestCache(folder))
    assert [o.status for o in out2] == ["ok"] * 3
    texts = [o.reason or "" for o in out] + [run.report(), run2.report()]
    assert not [t for t in texts if KEY in t]
    assert not [data for data in notes + written() if KEY.encode() in data]


def test_the_runner_scrubs_its_secrets_from_reasons_and_records(tmp_path):
    def call(request):
        if request == "fail":
            raise ApiFailure(f"HTTP 400: bad key {KEY}", status=400)
        return Answer({"echo": f"Bearer {KEY}"})

    jobs = [Job("a" * 64, "fail"), Job("b" * 64, "ok")]
    cache = RequestCache(tmp_path)
    out, _ = run_all(jobs, call, cache, secrets=[KEY])
    assert out[0].reason == "HTTP 400: bad key [api key]"
    assert out[1].answer.record == {"echo": "Bearer [api key]"}
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*.json"))
    assert KEY.encode() not in written and written.count(b"[api key]") == 2


# --- the budget and a killed run --------------------------------------------------------------


def test_the_budget_stops_cleanly_and_the_next_run_finishes(api, tmp_path):
    editor, cache = openai_editor(api), RequestCache(tmp_path)
    jobs = edit_jobs(editor, 10)
    out, run = run_all(jobs, edit_call(editor), cache, concurrency=2, max_requests=4)
    assert [o.status for o in out].count("ok") == 4 and api.count() == 4
    assert [o.status for o in out].count("not_run") == 6
    report = run.report()
    assert "synthesis.generator.max_requests (4) ran out" in report
    assert "4 ok, 0 cached, 0 failed, 6 not run of 10" in report
    out, run = run_all(jobs, edit_call(editor), cache, concurrency=2)
    assert sorted(o.status for o in out) == ["cached"] * 4 + ["ok"] * 6
    assert api.count() == 10 and len({h.fingerprint for h in api.hits}) == 10


def test_retries_spend_the_budget(api, tmp_path):
    api.fail("edits", Fault(status=500), times=None)
    editor = openai_editor(api)
    (out,), run = run_all(
        edit_jobs(editor, 1), edit_call(editor), RequestCache(tmp_path), max_requests=2
    )
    assert out.status == "failed" and "max_requests (2) ran out" in out.reason
    assert api.count() == 2 and run.sent == 2


KILLED_RUN = """
import sys
from facelora.config import GeneratorParams
from facelora.prepare.synthesis.openai_api import OpenAIImageEditor
from facelora.prepare.synthesis.requests import Job, RequestCache, run_requests
sys.path.insert(0, sys.argv[3])
from api_servers import photo

editor = OpenAIImageEditor(GeneratorParams(
    backend="openai", model="gpt-image-1", size=48, base_url=sys.argv[1], api_key_env="{env}"))
jobs = []
for i in range({n}):
    request = ([photo(i)], f"smile {{i}}", i)
    jobs.append(Job(editor.request_key(*request), request))
call = lambda r: editor.edit(*r).to_answer()
cache = RequestCache(sys.argv[2])
for out in run_requests(jobs, call, cache=cache, concurrency=2, setting="synthesis.generator"):
    print(out.status, flush=True)
"""


def test_a_killed_run_resumes_without_repeating_a_finished_request(api, tmp_path):
    n, api.delay_s = 24, 0.05
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(KILLED_RUN.format(env=ENV, n=n)))
    cache = tmp_path / "cache"
    tests = str(Path(__file__).parent)
    cmd = [sys.executable, str(script), api.openai_url, str(cache), tests]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    for _ in range(6):
        assert proc.stdout.readline().strip() == "ok"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    api.wait_idle()  # requests the killed run left in flight are logged before the mark
    killed_at = len(api.hits)
    editor = openai_editor(api)
    jobs = edit_jobs(editor, n, prompt="smile")  # the script's jobs
    finished = {j.request[1] for j in jobs if RequestCache(cache).get(j.key) is not None}
    assert 6 <= len(finished) < n  # killed mid-run
    out, _ = run_all(jobs, edit_call(editor), RequestCache(cache), concurrency=2)
    assert [o.status for o in out].count("cached") == len(finished)
    assert all(o.status in ("ok", "cached") for o in out)
    resumed = [h.fields["prompt"] for h in api.hits[killed_at:]]
    assert not finished & set(resumed)  # no finished request asked again
    assert len(resumed) == len(set(resumed)) == n - len(finished)


# --- the rubric -----------------------------------------------------------------------------

RUBRIC = {
    "identity_kept": RubricItem(question="Same person?"),
    "intensity": RubricItem(min=0, max=1, question="How strong?"),
}


def test_the_schema_and_prompt_follow_the_rubric():
    schema = json_schema(RUBRIC, describe=True)
    assert schema["required"] == ["identity_kept", "intensity", "description"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["intensity"] | {"description": ""} == {
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "description": "",
    }
    assert "description" not in json_schema(RUBRIC, describe=False)["properties"]
    prompt = rubric_prompt(RUBRIC, True, "open the mouth")
    for text in ("Same person?", "from 1 to 5", "from 0 to 1", '"open the mouth"', "JSON"):
        assert text in prompt
    assert "No instruction" in rubric_prompt(RUBRIC, False, None)
    with pytest.raises(SettingsError, match="description"):
        json_schema({"description": RubricItem(question="?")}, describe=True)


def test_parse_answer_accepts_fenced_json():
    text = (
        'Sure:\n```json\n{"identity_kept": 4, "intensity": 0.25, "description": " a  smile "}\n```'
    )
    assert parse_answer(text, RUBRIC, True) == {
        "vlm_identity_kept": 4.0,
        "vlm_intensity": 0.25,
        "vlm_description": "a smile",
    }


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ('{"identity_kept": 6, "intensity": 0.5}', "maximum"),
        ('{"identity_kept": 0, "intensity": 0.5}', "minimum"),
        ('{"identity_kept": 3}', "required"),
        ('{"identity_kept": 3, "intensity": 0.5, "mood": 1}', "Additional properties"),
        ('{"identity_kept": "3", "intensity": 0.5}', "not of type"),
        ('{"identity_kept": true, "intensity": 0.5}', "not of type"),
        ('{"identity_kept": NaN, "intensity": 0.5}', "not valid JSON"),
        ('{"identity_kept": 3, "intensity": 0.5', "no JSON object"),
        ("I cannot rate faces.", "no JSON object"),
        ("", "empty"),
    ],
)
def test_parse_answer_refuses_what_breaks_the_schema(answer, why):
    with pytest.raises(InvalidAnswer, match=why):
        parse_answer(answer, RUBRIC, describe=False)
