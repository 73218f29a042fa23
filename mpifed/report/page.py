"""The HTML page of a report: each run's row of the table (`summary`), the self-contained page with every
plot embedded as a PNG (`render_html`), and `build`, which makes the page and/or the PNG grid in memory.
"""
from __future__ import annotations

import base64
import html
import math
from typing import Sequence

from mpifed.report.plots import figures, grid_figure, png_bytes
from mpifed.report.runs import Run, perplexity


# ---------------------------------------------------------------------------------------------- HTML


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def summary(run: Run) -> dict[str, str]:
    """The run's row of the table, as text: folder, label, rounds, final val_loss and perplexity, tokens,
    MB between sites, wall seconds."""
    final = run.final_val
    first, last = run.rounds[0].round, run.rounds[-1].round
    val = _fmt(final.val_loss, 4) if final else "–"
    if final and final.round != last:
        val += f" (round {final.round})"
    return {"folder": str(run.path), "label": run.label,
            "rounds": f"{len(run.rounds)} ({first}–{last})" if len(run.rounds) > 1 else f"1 ({first})",
            "val_loss": val, "perplexity": _fmt(perplexity(final.val_loss), 2) if final else "–",
            "tokens": f"{run.rounds[-1].tokens_total:,}",
            "mb_between_sites": _fmt(float(run.cumulative_mb[-1]), 2),
            "wall_s": _fmt(float(run.cumulative_wall_s[-1]), 1)}


_COLUMNS = {"folder": "folder", "label": "label", "rounds": "rounds", "val_loss": "final val loss",
            "perplexity": "perplexity", "tokens": "tokens", "mb_between_sites": "MB between sites",
            "wall_s": "wall time (s)"}

_CSS = """body{font-family:sans-serif;margin:1.5em auto;max-width:60em;color:#222}
table{border-collapse:collapse;font-size:0.9em;margin-bottom:1.5em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left}td.n{text-align:right}
figure{margin:1.5em 0}img{max-width:100%}figcaption{font-weight:bold;margin-bottom:0.3em}
.note{color:#8a5a00}"""


def render_html(runs: Sequence[Run], plots: Sequence[tuple[str, bytes]], notes: Sequence[str] = ()) -> str:
    """One self-contained page: the table of runs, any notes, then each plot as an embedded PNG."""
    header = "".join(f"<th>{html.escape(text)}</th>" for text in _COLUMNS.values())
    rows = []
    for run in runs:
        cells = summary(run)
        rows.append("<tr>" + "".join(
            f"<td{'' if key in ('folder', 'label') else ' class=n'}>{html.escape(cells[key])}</td>"
            for key in _COLUMNS) + "</tr>")
    figs = [f'<figure><figcaption>{html.escape(title)}</figcaption>'
            f'<img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
            f"</figure>" for title, png in plots]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mpifed report: {html.escape(', '.join(run.name for run in runs))}</title>",
        f"<style>{_CSS}</style></head><body>", "<h1>mpifed report</h1>",
        f"<table><thead><tr>{header}</tr></thead><tbody>", *rows, "</tbody></table>",
        *(f'<p class="note">note: {html.escape(n)}</p>' for n in notes), *figs, "</body></html>", ""])


def build(runs: Sequence[Run], html_page: bool, png_grid: bool, notes: Sequence[str] = ()
          ) -> tuple[str | None, bytes | None]:
    """The report in memory, nothing written: the HTML page and/or the PNG grid, as asked."""
    page = grid = None
    if html_page:
        plots = [(title, png_bytes(fig)) for title, fig in figures(runs)]
        page = render_html(runs, plots, notes)
    if png_grid:
        grid = png_bytes(grid_figure(runs))
    return page, grid
