"""Reading run folders (`metrics.jsonl` + the resolved `mpifed.toml`) into plain dataclasses, and naming
each run by its key settings: the `Round` and `Run` dataclasses, `read_metrics`, `load_run(s)`, the labels
(`label`, `unique_labels`) and the notes a reader of a report should see.

Reads files only: no torch, no MPI, no matplotlib. Every mistake in the input is a `ReportError` whose
message is one line naming the folder, file or line.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mpifed import configfile
from mpifed.config import ConfigError, RunConfig

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "mpifed.toml"
MB = 1e6
"""Bytes per MB, as the progress line counts them."""
PPL_CAP = 50.0
"""Losses above this are shown as exp(50) perplexity, as the metrics log caps them."""

# Keys every round's JSON object must hold, with a number; val_loss and facility_val_loss may be null.
_NUMBERS = ("train_loss", "tokens_total", "sync_s", "idle_s", "ckpt_s", "bytes_inter", "wall_s")


class ReportError(ValueError):
    """Bad input to a report (a missing folder or file, an unreadable metrics line); one line."""


@dataclass(frozen=True)
class Round:
    """The numbers of one logged round that the report uses."""

    round: int
    train_loss: float
    val_loss: float | None
    tokens_total: int
    sync_s: float
    idle_s: float
    ckpt_s: float
    bytes_inter: int
    wall_s: float
    facility_val_loss: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """One run folder: where it is, its configuration (None without an mpifed.toml), its rounds in
    order, and the label its lines carry (set by `load_runs`, unique among the runs of a report)."""

    path: Path
    """The folder as the user named it."""
    config: RunConfig | None
    rounds: list[Round]
    label: str = ""

    @property
    def name(self) -> str:
        """The folder's own name."""
        return self.path.resolve().name or str(self.path)

    def column(self, key: str) -> np.ndarray:
        """One number per round, as floats (NaN where a round has no value, e.g. val_loss)."""
        return np.array([np.nan if getattr(r, key) is None else float(getattr(r, key)) for r in self.rounds])

    @property
    def round_numbers(self) -> np.ndarray:
        """The rounds' numbers, as floats (the x of the per-round plots)."""
        return np.array([r.round for r in self.rounds], dtype=float)

    @property
    def cumulative_mb(self) -> np.ndarray:
        """Bytes sent between sites up to and including each round, in MB."""
        return np.cumsum(self.column("bytes_inter")) / MB

    @property
    def cumulative_wall_s(self) -> np.ndarray:
        """Seconds of the run up to the end of each round (time between a stop and a resume not counted)."""
        return np.cumsum(self.column("wall_s"))

    @property
    def final_val(self) -> Round | None:
        """The last round that was evaluated."""
        return next((r for r in reversed(self.rounds) if r.val_loss is not None), None)

    @property
    def facilities(self) -> list[str]:
        """Facility names, in the order they first appear in the rounds."""
        names: dict[str, None] = {}
        for r in self.rounds:
            names.update(dict.fromkeys(r.facility_val_loss))
        return list(names)


def perplexity(loss: float) -> float:
    """exp(loss), capped as the metrics log caps it (NaN stays NaN)."""
    return math.exp(min(loss, PPL_CAP)) if not math.isnan(loss) else math.nan


def perplexity_ratio(run: "Run", reference: "Run") -> tuple[np.ndarray, np.ndarray]:
    """(tokens, ratio): `run`'s validation perplexity over `reference`'s at equal tokens, at each of
    `run`'s evaluated rounds that falls within the reference's evaluated tokens (the reference's loss
    interpolated linearly in tokens between its evaluations). How the gap moves as training goes on."""
    def evaluated(r: Run) -> tuple[np.ndarray, np.ndarray]:
        tokens, loss = r.column("tokens_total"), r.column("val_loss")
        keep = ~np.isnan(loss)
        order = np.argsort(tokens[keep], kind="stable")
        return tokens[keep][order], np.minimum(loss[keep][order], PPL_CAP)

    ref_tokens, ref_loss = evaluated(reference)
    tokens, loss = evaluated(run)
    if len(ref_tokens) == 0:
        return tokens[:0], loss[:0]
    inside = (tokens >= ref_tokens[0]) & (tokens <= ref_tokens[-1])
    return tokens[inside], np.exp(loss[inside] - np.interp(tokens[inside], ref_tokens, ref_loss))


# ---------------------------------------------------------------------------------------------- reading


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_round(obj: Any, where: str) -> Round:
    if not isinstance(obj, dict):
        raise ReportError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("round"), int) or isinstance(obj.get("round"), bool):
        raise ReportError(f"{where}: no integer 'round'")
    missing = [k for k in _NUMBERS if not _number(obj.get(k))]
    if missing:
        raise ReportError(f"{where}: expected numbers for {', '.join(missing)}")
    val = obj.get("val_loss")
    if val is not None and not _number(val):
        raise ReportError(f"{where}: val_loss must be a number or null, got {val!r}")
    local = obj.get("facility_val_loss") or {}
    if not isinstance(local, dict) or not all(_number(v) for v in local.values()):
        raise ReportError(f"{where}: facility_val_loss must map facility names to numbers")
    return Round(round=obj["round"], val_loss=None if val is None else float(val),
                 facility_val_loss={str(k): float(v) for k, v in local.items()},
                 **{k: obj[k] for k in _NUMBERS})


def read_metrics(path: Path) -> list[Round]:
    """The rounds of a metrics.jsonl file, ordered by round; blank lines are skipped. A line that is not
    a round's JSON object, a round logged twice, or a file without rounds raises ReportError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    rounds: dict[int, Round] = {}
    first_line: dict[int, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{where}: not JSON ({exc.msg})") from None
        r = _parse_round(obj, where)
        if r.round in rounds:
            raise ReportError(f"{where}: round {r.round} is logged again (first on line {first_line[r.round]})")
        rounds[r.round], first_line[r.round] = r, number
    if not rounds:
        raise ReportError(f"{path}: no rounds logged yet")
    return [rounds[k] for k in sorted(rounds)]


def _read_config(folder: Path) -> RunConfig | None:
    path = folder / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return configfile.from_dict(configfile.load(path))
    except ConfigError as exc:
        text = str(exc)
        raise ReportError(text if str(path) in text else f"{path}: {text}") from None


def load_run(path: Path) -> Run:
    """A run folder read into a Run (label not set yet); ReportError when it is not a usable run folder."""
    if not path.exists():
        raise ReportError(f"{path}: no such run folder")
    if not path.is_dir():
        raise ReportError(f"{path}: not a folder; give the run folder (the --out of `mpifed simulate`)")
    config = _read_config(path)
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        elsewhere = (f"; its {CONFIG_FILE} logs to {config.metrics.file}"
                     if config is not None and config.metrics.file else "; run a training there first")
        raise ReportError(f"{path}: run folder has no {METRICS_FILE}{elsewhere}")
    return Run(path=path, config=config, rounds=read_metrics(metrics))


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """Every run folder read and labelled; a folder named twice is an error."""
    seen: dict[Path, Path] = {}
    for path in paths:
        key = Path(path).resolve()
        if key in seen:
            raise ReportError(f"{path}: run folder given twice (also as {seen[key]})")
        seen[key] = Path(path)
    runs = [load_run(Path(p)) for p in paths]
    for run, text in zip(runs, unique_labels(runs)):
        run.label = text
    return runs


# ---------------------------------------------------------------------------------------------- labels


def label(cfg: RunConfig) -> str:
    """A run's key settings in a few words: facilities x ranks, engine(s), H, outer optimizer and what
    crosses between sites, e.g. `4 fac x 1 rank, replica, H=25, diloco, int8` (fp32 is compress=none)."""
    ranks = [f.ranks for f in cfg.facility]
    if len(set(ranks)) == 1:
        shape = f"{len(ranks)} fac x {ranks[0]} rank{'s' if ranks[0] != 1 else ''}"
    else:
        shape = f"{len(ranks)} fac, {'+'.join(map(str, ranks))} ranks"
    engines = "+".join(dict.fromkeys(f.engine for f in cfg.facility))
    wire = "fp32" if cfg.federation.compress == "none" else cfg.federation.compress
    return f"{shape}, {engines}, H={cfg.train.local_steps}, {cfg.federation.outer}, {wire}"


def unique_labels(runs: Sequence[Run]) -> list[str]:
    """Each run's label; runs that would share one get their folder name added (their path as given
    when even that is shared); a run without a configuration is named by its folder."""
    base = [label(r.config) if r.config is not None else r.name for r in runs]
    out = [b if base.count(b) == 1 or r.config is None else f"{b} ({r.name})" for b, r in zip(base, runs)]
    return [o if out.count(o) == 1 else f"{base[i]} ({runs[i].path})" for i, o in enumerate(out)]


def no_common_rounds(runs: Sequence[Run]) -> str | None:
    """A note when several runs share no round number (each is then plotted over its own rounds)."""
    if len(runs) < 2 or set.intersection(*({r.round for r in run.rounds} for run in runs)):
        return None
    names = [str(run.path) for run in runs]
    listed = f"{', '.join(names[:-1])} and {names[-1]}"
    return f"runs {listed} have no rounds in common; plotting what each has"


def notes(runs: Sequence[Run]) -> list[str]:
    """What a reader of the report should know that is not an error: runs without a configuration
    (named by their folder) and runs without a round in common."""
    out = [f"{run.path} has no {CONFIG_FILE}; its lines are labelled by the folder name"
           for run in runs if run.config is None]
    common = no_common_rounds(runs)
    return out + ([common] if common else [])
