"""`mpifed report`: plots of one or more run folders side by side, as a self-contained HTML page and/or a
PNG grid. Run as

    mpifed report RUN [RUN...] --out FILE.html [--png FILE.png]

The command checks its options and output paths, then hands over to `mpifed.report` (which reads the
runs and draws); every input mistake is one line and exit code 2, and nothing is written unless all of
the report could be made.
"""
from __future__ import annotations

from pathlib import Path

import click

from mpifed import report as reporting
from mpifed.cli.common import UserError, check_writable


def _check_output(path: Path, option: str) -> None:
    """A file we may write: its folder exists (a report does not create folders) and is writable."""
    folder = path.absolute().parent
    if not folder.exists():
        raise UserError(f"{option}: cannot write {path}: folder {folder} does not exist")
    check_writable(path, option, is_dir=False)


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RUN...")
@click.option("--out", type=click.Path(path_type=Path), metavar="FILE.html",
              help="Write one self-contained HTML page: a table of the runs and every plot, embedded.")
@click.option("--png", type=click.Path(path_type=Path), metavar="FILE.png",
              help="Write all plots as one PNG grid (e.g. for a README).")
def report(runs: tuple[Path, ...], out: Path | None, png: Path | None) -> int:
    """Plot runs side by side: validation loss against tokens (with perplexity), each run's perplexity
    over the first RUN's at equal tokens (list the reference first), validation loss against MB sent
    between sites and against wall time; train loss, each facility's drift, and sync/idle/checkpoint seconds
    per round. Each RUN is an output folder of a training: its metrics.jsonl is plotted, and its
    mpifed.toml (which `mpifed simulate` writes there) labels the lines with the run's facilities x ranks,
    engines, H, outer optimizer and compression; without one the folder's name is the label.
    """
    if out is None and png is None:
        raise UserError("nothing to write: give --out FILE.html and/or --png FILE.png")
    if out is not None:
        _check_output(out, "--out")
    if png is not None:
        _check_output(png, "--png")
    if out is not None and png is not None and out.absolute() == png.absolute():
        raise UserError(f"--out and --png both name {out}; give two files")
    try:
        loaded = reporting.load_runs(runs)
        notes = reporting.notes(loaded)
        for note in notes:
            click.echo(f"mpifed report: note: {note}", err=True)
        page, grid = reporting.build(loaded, html_page=out is not None, png_grid=png is not None, notes=notes)
    except reporting.ReportError as exc:
        raise UserError(str(exc)) from None
    written = []
    try:
        if page is not None and out is not None:
            out.write_text(page, encoding="utf-8")
            written.append(f"{out} ({len(reporting.PLOTS)} plots)")
        if grid is not None and png is not None:
            png.write_bytes(grid)
            written.append(f"{png} ({len(grid) / 1024:.0f} kB)")
    except OSError as exc:
        raise UserError(f"cannot write {exc.filename}: {exc.strerror or exc}") from None
    click.echo(f"mpifed report: {len(loaded)} run{'s' if len(loaded) != 1 else ''}; wrote {', '.join(written)}")
    return 0
