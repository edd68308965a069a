"""Pages of the Snakemake report that are not pictures: the model card and the data funnel
with its rejection reasons, each one self-contained HTML file (no scripts, no network), which
the report shows inline beside the plots (`snakemake --report results/report.html`)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from markdown_it import MarkdownIt

from facelora.errors import MissingInput
from facelora.io.atomic import write_text

_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
    "td.n{text-align:right;font-variant-numeric:tabular-nums}"
    "code,pre{background:#f4f4f4}pre{padding:.5em;overflow-x:auto}"
)


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def card_page(card_markdown: str) -> str:
    """The model card (final/README.md) as HTML; its tables stay tables."""
    body = MarkdownIt("commonmark").enable("table").render(card_markdown)
    return _page("Model card", body)


def _table(rows: list[tuple[str, object]], head: tuple[str, str]) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td class='n'>{html.escape(str(v))}</td></tr>"
        for k, v in rows
    )
    return f"<table><tr><th>{head[0]}</th><th>{head[1]}</th></tr>{cells}</table>"


def funnel_page(summary: dict) -> str:
    """How many photos, faces and pairs each step kept, and why it dropped the others."""
    parts = ["<h1>Data funnel</h1>", _table(list(summary["funnel"].items()), ("step", "kept"))]
    parts.append("<h2>Rejections</h2>")
    rejected = {step: reasons for step, reasons in summary["rejected"].items() if reasons}
    if not rejected:
        parts.append("<p>No step rejected anything.</p>")
    for step, reasons in rejected.items():
        ordered = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
        parts += [f"<h3>{html.escape(step)}</h3>", _table(ordered, ("reason", "count"))]
    if summary.get("duplicates"):
        parts.append(f"<p>Duplicate photos set aside: {int(summary['duplicates'])}.</p>")
    return _page("Data funnel", "\n".join(parts))


def write_pages(summary_json: Path, card: Path, funnel_out: Path, card_out: Path) -> None:
    """Both pages from the data summary and the final model card."""
    for path, setting in ((summary_json, "the summary step"), (card, "the final step")):
        if not path.is_file():
            raise MissingInput(f"{path} not found: run {setting} first (snakemake --cores 2)")
    write_text(funnel_out, funnel_page(json.loads(summary_json.read_text())))
    write_text(card_out, card_page(card.read_text()))
