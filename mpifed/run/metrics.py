"""Metrics: one JSON line per round (always), the progress line the global root prints, a live bar over
a long round's inner steps on a terminal, and the same numbers in TensorBoard and Weights & Biases when
the run asks for them (neither is required)."""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

from mpifed import logs

PROGRESS_ENV = "MPIFED_PROGRESS"
"""1: show the live bar, 0: never. Under mpiexec a rank's output is a pipe even when the launch runs on a
terminal, so `mpifed simulate` sets it from its own terminal; set it yourself for a hand-run mpiexec."""


def live_view_wanted() -> bool:
    """Whether this process should draw the live bar: MPIFED_PROGRESS if set, else whether stdout is a
    terminal (batch jobs write to files: no bar, just the per-round lines)."""
    if not logs.chatty():  # --quiet: warnings and errors only
        return False
    setting = os.environ.get(PROGRESS_ENV, "")
    return setting == "1" if setting in ("0", "1") else sys.stdout.isatty()


def inner_steps(steps: int, round_: int, rounds: int, live: bool) -> Iterable[int]:
    """range(steps), drawn as a one-line bar of the round's inner steps when `live` (redrawn at most
    twice a second, erased when the round ends: its summary line follows)."""
    if not live:
        return range(steps)
    from tqdm import tqdm

    return tqdm(range(steps), desc=f"round {round_}/{rounds}", unit="step", leave=False, mininterval=0.5,
                file=sys.stdout, dynamic_ncols=True)


@dataclass(frozen=True)
class RoundMetrics:
    """The numbers of one round, as the global root logs them (one JSON line, one progress line)."""

    round: int
    train_loss: float
    """Token-weighted mean inner-step loss of all facilities in this round."""
    val_loss: float | None
    """Loss of the new global model on the shared validation set (None in rounds without evaluation)."""
    tokens: int
    """Tokens trained in this round, all facilities."""
    tokens_total: int
    inner_s: float
    """Seconds of inner training (slowest rank)."""
    sync_s: float
    """Seconds of the federated exchange itself, as seen by the last rank to reach it."""
    idle_s: float
    """Longest time a rank waited at the exchange for slower facilities (load imbalance)."""
    ckpt_s: float
    bytes_inter: int
    """Payload bytes the roots sent between facilities in this round."""
    wall_s: float
    facility_val_loss: dict[str, float] = field(default_factory=dict)
    """Each facility's local model, before the exchange, on the same validation set (eval rounds)."""

    @property
    def val_ppl(self) -> float | None:
        return math.exp(min(self.val_loss, 50.0)) if self.val_loss is not None else None

    def record(self) -> dict[str, Any]:
        """The JSON line: every field, plus val_ppl and the per-facility perplexities."""
        out = asdict(self)
        out["val_ppl"] = self.val_ppl
        out["facility_val_ppl"] = {name: math.exp(min(loss, 50.0)) for name, loss in self.facility_val_loss.items()}
        return out

    def line(self, rounds: int) -> str:
        rate = self.tokens / self.wall_s if self.wall_s > 0 else 0.0
        val = f"val_loss {self.val_loss:.4f} (ppl {self.val_ppl:.1f})" if self.val_loss is not None else "val_loss -"
        local = "".join(f"  {name} {loss:.3f}" for name, loss in self.facility_val_loss.items())
        return (f"round {self.round:>3}/{rounds}  train_loss {self.train_loss:.4f}  {val}  "
                f"tokens/s {rate:,.0f}  inner {self.inner_s:.2f}s  sync {self.sync_s:.3f}s  idle {self.idle_s:.2f}s  "
                f"ckpt {self.ckpt_s:.3f}s  inter {self.bytes_inter / 1e6:.2f} MB" + (f"  local:{local}" if local else ""))


class _Sinks:
    """TensorBoard and wandb, each only when configured; scalars are logged against the round."""

    def __init__(self, tensorboard: str, wandb_project: str, run_config: dict[str, Any]) -> None:
        self._tb = self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard)
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, config=run_config)

    def log(self, metrics: RoundMetrics) -> None:
        scalars = {k: v for k, v in metrics.record().items() if isinstance(v, (int, float)) and k != "round"}
        scalars.update({f"facility_val_loss/{k}": v for k, v in metrics.facility_val_loss.items()})
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, metrics.round)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=metrics.round)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


class MetricsLog:
    """Appends RoundMetrics as JSON lines. A new run starts the file afresh; a resumed one keeps the
    lines of the rounds it resumes after and drops any later ones (from a run that died past them)."""

    def __init__(self, path: Path, after_round: int = 0, tensorboard: str = "", wandb: str = "",
                 run_config: dict[str, Any] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if after_round > 0 and path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            if lines and not _parses(lines[-1]):
                lines.pop()  # the tail of a run killed while writing it: that round was never checkpointed
            kept = [line for line in lines if json.loads(line).get("round", 0) <= after_round]
        self._fh: TextIO = path.open("w")
        self._fh.write("".join(line + "\n" for line in kept))
        self._sinks = _Sinks(tensorboard, wandb, run_config or {})

    def write(self, metrics: RoundMetrics) -> None:
        self._fh.write(json.dumps(metrics.record()) + "\n")
        self._fh.flush()
        self._sinks.log(metrics)

    def close(self) -> None:
        self._fh.close()
        self._sinks.close()
