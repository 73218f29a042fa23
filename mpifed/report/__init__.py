"""Reports of finished (or running) runs, the library behind the command

    mpifed report RUN [RUN...] --out FILE.html [--png FILE.png]

which reads run folders (`metrics.jsonl` + the resolved `mpifed.toml`) into plain dataclasses and names
each run by its key settings (runs), draws the seven plots that compare runs side by side (plots), and
writes them as one self-contained HTML page or one PNG grid (page). Imports point one way: page -> plots
-> runs.

Reads files only: no torch, no MPI. matplotlib (the `report` extra) is imported when a figure is drawn,
never at import, and only through its object API on an Agg canvas: no display, and no global backend
switched under a caller. Images are written as 8-bit palette PNGs, small enough to commit.
Every mistake in the input is a `ReportError` whose message is one line naming the folder, file or line.
"""
from mpifed.report.page import build, summary
from mpifed.report.plots import PLOTS
from mpifed.report.runs import ReportError, Run, label, load_runs, notes, read_metrics, unique_labels

__all__ = ["PLOTS", "ReportError", "Run", "build", "label", "load_runs", "notes", "read_metrics", "summary",
           "unique_labels"]
