"""Drawing the seven plots that compare runs side by side: `PLOTS` (each plot's title and what draws it),
one figure per plot (`figures`), all of them in one grid (`grid_figure`), and a figure as PNG bytes
(`png_bytes`).

matplotlib (the `report` extra) is imported when a figure is drawn, never at import, and only through its
object API on an Agg canvas: no display, and no global backend switched under a caller. Images are written
as 8-bit palette PNGs, small enough to commit.
"""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from mpifed.report.runs import PPL_CAP, ReportError, Run, perplexity_ratio

if TYPE_CHECKING:  # only for annotations; matplotlib is imported lazily
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_HINT = "matplotlib is not installed; pip install 'mpifed[report]'"
DPI = 90
COLORMAP = "tab10"
"""Run i is drawn in colour i of this map (after 10 runs the colours repeat)."""


# ---------------------------------------------------------------------------------------------- plots


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ReportError(INSTALL_HINT) from None
    return matplotlib


def _style(n: int) -> dict[str, Any]:
    """Markers while the points are few enough to tell apart (a one-round run is still visible)."""
    return {"marker": "o", "markersize": 3.5} if n <= 40 else {}


def _colors(runs: Sequence[Run]) -> list[Any]:
    cycle = _matplotlib().colormaps[COLORMAP]
    return [cycle(i % 10) for i in range(len(runs))]


def _val_against(x_of: Callable[[Run], np.ndarray]) -> Callable[[Axes, Sequence[Run], list], list]:
    """A plot of the global validation loss against a per-round quantity (evaluated rounds only)."""

    def draw(ax: Axes, runs: Sequence[Run], colors: list) -> list:
        for run, color in zip(runs, colors):
            x, y = x_of(run), run.column("val_loss")
            keep = ~np.isnan(y)
            ax.plot(x[keep], y[keep], color=color, label=run.label, **_style(int(keep.sum())))
        ax.set_ylabel("validation loss")
        return []

    return draw


def _draw_val_tokens(ax: Axes, runs: Sequence[Run], colors: list) -> list:
    _val_against(lambda run: run.column("tokens_total"))(ax, runs, colors)
    from matplotlib.ticker import EngFormatter

    ax.set_xlabel("tokens trained (all facilities)")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ppl = ax.secondary_yaxis("right", functions=(lambda loss: np.exp(np.minimum(loss, PPL_CAP)),
                                                 lambda p: np.log(np.maximum(p, 1e-300))))
    ppl.set_ylabel("perplexity")
    return []


def _draw_gap(ax: Axes, runs: Sequence[Run], colors: list) -> list:
    """Each run's perplexity over the first run's at equal tokens: the gap to a reference (e.g.
    centralized training) as training goes on."""
    from matplotlib.ticker import EngFormatter

    for run, color in zip(runs, colors):
        x, y = perplexity_ratio(run, runs[0])
        ax.plot(x, y, color=color, label=run.label, **_style(len(x)))
    ax.axhline(1.0, color="0.5", linewidth=0.8)
    ax.set_xlabel("tokens trained (all facilities)")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_ylabel("perplexity / the first run's")
    return []


def _draw_val_bytes(ax: Axes, runs: Sequence[Run], colors: list) -> list:
    _val_against(lambda run: run.cumulative_mb)(ax, runs, colors)
    ax.set_xlabel("MB sent between sites (cumulative)")
    return []


def _draw_val_wall(ax: Axes, runs: Sequence[Run], colors: list) -> list:
    _val_against(lambda run: run.cumulative_wall_s)(ax, runs, colors)
    ax.set_xlabel("wall time (s, cumulative)")
    return []


def _per_round(ax: Axes, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _draw_train(ax: Axes, runs: Sequence[Run], colors: list) -> list:
    for run, color in zip(runs, colors):
        ax.plot(run.round_numbers, run.column("train_loss"), color=color, label=run.label,
                **_style(len(run.rounds)))
    _per_round(ax, "train loss (inner steps, token-weighted)")
    return []


_MARKERS = "osD^vP*X<>"


def _draw_drift(ax: Axes, runs: Sequence[Run], colors: list) -> list:
    """Each facility's local model (markers tell facilities apart) and, dashed, the global model after
    the exchange: the spread between them is how far the facilities drifted in the round."""
    from matplotlib.lines import Line2D

    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.facilities))
    marker = {name: _MARKERS[i % len(_MARKERS)] for i, name in enumerate(names)}
    for run, color in zip(runs, colors):
        for name in run.facilities:
            points = [(r.round, r.facility_val_loss[name]) for r in run.rounds if name in r.facility_val_loss]
            x, y = zip(*points)
            ax.plot(x, y, color=color, marker=marker[name], markersize=4, linewidth=1.0, alpha=0.85,
                    markevery=max(1, len(x) // 20))
        y = run.column("val_loss")
        keep = ~np.isnan(y)
        ax.plot(run.round_numbers[keep], y[keep], color=color, linestyle="--", linewidth=1.0)
    _per_round(ax, "validation loss")
    keys = [Line2D([], [], color="0.4", marker=marker[n], linewidth=1.0, markersize=4, label=f"{n} (local)")
            for n in names]
    keys.append(Line2D([], [], color="0.4", linestyle="--", linewidth=1.0, label="global"))
    if not names:
        ax.text(0.5, 0.5, "no facility evaluations logged (eval.facilities = false)", transform=ax.transAxes,
                ha="center", va="center", color="0.4", fontsize=9)
    return keys


_TIMES = (("sync_s", "sync", "-"), ("idle_s", "idle", "--"), ("ckpt_s", "checkpoint", ":"))


def _draw_times(ax: Axes, runs: Sequence[Run], colors: list) -> list:
    from matplotlib.lines import Line2D

    for run, color in zip(runs, colors):
        for key, _, dash in _TIMES:
            ax.plot(run.round_numbers, run.column(key), color=color, linestyle=dash, **_style(len(run.rounds)))
    _per_round(ax, "seconds per round")
    return [Line2D([], [], color="0.4", linestyle=dash, label=name) for _, name, dash in _TIMES]


PLOTS: list[tuple[str, Callable[[Axes, Sequence[Run], list], list]]] = [
    ("Validation loss and perplexity against tokens", _draw_val_tokens),
    ("Perplexity over the first run's at equal tokens", _draw_gap),
    ("Validation loss against data moved between sites", _draw_val_bytes),
    ("Validation loss against wall time", _draw_val_wall),
    ("Training loss per round", _draw_train),
    ("Each facility's local validation loss before the exchange (drift)", _draw_drift),
    ("Synchronisation, idle and checkpoint time per round", _draw_times),
]
"""Every plot of a report, in order: its title and what draws it into an Axes (returning legend keys
beyond the runs, e.g. line styles)."""


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _legend_columns(labels: Sequence[str], width_chars: int) -> int:
    """As many legend columns as entries of this length fit side by side in `width_chars`."""
    longest = max((len(t) for t in labels), default=1)
    return max(1, min(len(labels), width_chars // (longest + 6)))


def _run_legend(fig: Figure, runs: Sequence[Run], colors: list, width_chars: int, fontsize: float) -> None:
    """One legend entry per run, below the plots, so that no entry covers a line."""
    from matplotlib.lines import Line2D

    labels = [run.label for run in runs]
    handles = [Line2D([], [], color=color, linewidth=2.0) for color in colors]
    fig.legend(handles, labels, loc="outside lower center", ncols=_legend_columns(labels, width_chars),
               fontsize=fontsize, frameon=False)


def _panel(ax: Axes, title: str, draw: Callable[[Axes, Sequence[Run], list], list], runs: Sequence[Run],
           colors: list, fontsize: float) -> None:
    keys = draw(ax, runs, colors)
    ax.set_title(title, fontsize=fontsize)
    ax.grid(True, alpha=0.3)
    if keys:  # what the line styles mean (facilities; sync/idle/checkpoint): beside the axes, off the lines
        ax.legend(handles=keys, fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                  handlelength=2.5)


def figures(runs: Sequence[Run]) -> list[tuple[str, Figure]]:
    """One titled figure per plot, the runs' legend under its axes."""
    _matplotlib()
    colors = _colors(runs)
    out = []
    for title, draw in PLOTS:
        fig = _new_figure(7.2, 4.4 + 0.2 * len(runs))
        _panel(fig.add_subplot(), title, draw, runs, colors, 11)
        _run_legend(fig, runs, colors, 100, 8)
        out.append((title, fig))
    return out


def grid_figure(runs: Sequence[Run]) -> Figure:
    """All plots in one figure, 3 columns, one legend of the runs below them."""
    _matplotlib()
    colors = _colors(runs)
    cols = 3
    rows = math.ceil(len(PLOTS) / cols)
    fig = _new_figure(15.0, 4.2 * rows + 0.25 * len(runs))
    fig.get_layout_engine().set(wspace=0.05)  # room between a panel's right axis and the next
    for i, (title, draw) in enumerate(PLOTS):
        _panel(fig.add_subplot(rows, cols, i + 1), title, draw, runs, colors, 10)
    _run_legend(fig, runs, colors, 190, 9)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as an 8-bit palette PNG (Pillow, which matplotlib depends on, quantizes it). Plots are
    lines and text on white, so 256 colours look the same as full colour at a third of the size."""
    from PIL import Image

    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    out = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, "PNG", optimize=True)
    return out.getvalue()
