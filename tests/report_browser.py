"""Reading Snakemake's HTML report: its embedded tables, and the page in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
# as root in a sandbox with no network: no setuid sandbox, no background connections
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def embedded(html: str, name: str) -> dict:
    """One of the report's JSON tables (`results`, `categories`, ...)."""
    match = re.search(rf'<script id="{name}">\s*var {name} = (.*?);\s*</script>', html, re.S)
    assert match, f"no `{name}` in the report"
    return json.loads(match.group(1))


def data_uri_bytes(uri: str) -> bytes:
    return base64.b64decode(uri.split("base64,", 1)[1])


def browser():
    """Playwright's Chromium on Debian's binary; a skip (a failure in CI) when either is missing."""
    missing = [
        what
        for what, ok in [
            ("chromium", Path(CHROMIUM).is_file() or shutil.which("chromium")),
            ("playwright", _has_playwright()),
        ]
        if not ok
    ]
    if missing:
        reason = f"{' and '.join(missing)} not installed (apt-get install chromium)"
        if os.environ.get("FACELORA_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


def show(page, category: str, subcategory: str | None, figure: str | None) -> dict:
    """Open one result through the report's own menus (its eye button) and return the
    picture then shown: data URI prefix and natural size, as the browser decoded it."""
    page.get_by_role("link", name=category, exact=True).click()
    if subcategory is not None:
        page.get_by_role("link", name=subcategory, exact=True).first.click()
    toggle = page.locator("fieldset label", has_text=figure) if figure else None
    if toggle is not None and toggle.count():
        toggle.first.click()  # Snakemake turns a label with few values into a toggle
    rows = page.locator("tbody tr")
    row = (
        rows.filter(has_text=figure).first
        if figure and rows.filter(has_text=figure).count()
        else rows.first
    )
    row.locator("a[iconname=eye]").click()
    page.wait_for_timeout(300)
    shown = page.eval_on_selector_all(
        "img[src^='data:image/png'], iframe",
        "els => els.map(e => ({tag: e.tagName, src: e.src.slice(0, 40),"
        " width: e.naturalWidth || 0, height: e.naturalHeight || 0}))",
    )
    return {"shown": shown}
