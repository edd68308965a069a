#!/usr/bin/env python
"""Requests per second of the API backends through the request runner, against the local
test servers (tests/api_servers.py), at concurrency 1 and 4, with and without a simulated
model latency; then a cached rerun (no request sent). Prints figures only.

    .venv/bin/python benchmarks/bench_synthesis_api.py [--jobs 48] [--latency-ms 0 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from facelora.config import GeneratorParams, ScorerParams  # noqa: E402
from facelora.prepare.synthesis.gemini_api import GeminiImageEditor  # noqa: E402
from facelora.prepare.synthesis.openai_api import OpenAIImageEditor, OpenAIScorer  # noqa: E402
from facelora.prepare.synthesis.requests import Job, RequestCache, run_requests  # noqa: E402

from api_servers import FakeApi, edited_image, photo  # noqa: E402

ENV = "FACELORA_BENCH_API_KEY"
KEY = "sk-bench-0123456789abcdef"


def backend(name: str, api: FakeApi):
    """(jobs maker, call) for one backend."""
    common = dict(api_key_env=ENV, timeout_s=30)
    if name == "scorer":
        vlm = OpenAIScorer(
            ScorerParams(backend="openai", model="vlm", base_url=api.openai_url, **common)
        )

        def jobs(n: int, side: int) -> list[Job]:
            out = []
            for i in range(n):
                before = photo(i, side)
                request = (before, edited_image(before, "smile", None, i), "smile")
                out.append(Job(vlm.request_key(*request), request))
            return out

        return jobs, lambda r: vlm.score(*r).to_answer()
    if name == "openai":
        settings = GeneratorParams(
            backend="openai", model="gpt-image-1", base_url=api.openai_url, **common
        )
        editor = OpenAIImageEditor(settings.model_copy(update={"size": 128}))
    else:
        settings = GeneratorParams(backend="gemini", model="img", base_url=api.url, **common)
        editor = GeminiImageEditor(settings)

    def edit_jobs(n: int, side: int) -> list[Job]:
        out = []
        for i in range(n):
            request = ([photo(i, side)], f"smile {i}", i)
            out.append(Job(editor.request_key(*request), request))
        return out

    return edit_jobs, lambda r: editor.edit(*r).to_answer()


def timed(jobs, call, cache, concurrency: int) -> tuple[float, dict[str, int]]:
    start = time.perf_counter()
    run = run_requests(
        jobs, call, cache=cache, concurrency=concurrency, setting="bench", progress_desc="bench"
    )
    outcomes = list(run)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "cached", "failed")}
    return time.perf_counter() - start, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--side", type=int, default=128, help="photo side in pixels")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--backends", nargs="+", default=["openai", "gemini", "scorer"])
    args = parser.parse_args()
    os.environ[ENV] = KEY
    print(f"{args.jobs} jobs, {args.side} px photos, {os.cpu_count()} CPUs")
    print(f"{'backend':8} {'latency':>8} {'conc.':>5} {'req/s':>8} {'cached/s':>9}  counts")
    for name in args.backends:
        for latency in args.latency_ms:
            for concurrency in (1, 4):
                with (
                    FakeApi(key=KEY, delay_s=latency / 1000) as api,
                    tempfile.TemporaryDirectory() as tmp,
                ):
                    make_jobs, call = backend(name, api)
                    jobs = make_jobs(args.jobs, args.side)
                    cache = RequestCache(tmp)
                    first, counts = timed(jobs, call, cache, concurrency)
                    again, _ = timed(jobs, call, cache, concurrency)
                    assert api.count() == args.jobs, "the cached rerun sent requests"
                print(
                    f"{name:8} {latency:6.0f}ms {concurrency:5d} {args.jobs / first:8.1f} "
                    f"{args.jobs / again:9.0f}  {counts}"
                )


if __name__ == "__main__":
    main()
