"""Metrics: one JSON line per round (always), and the progress line the global root prints."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO


@dataclass(frozen=True)
class RoundMetrics:
    round: int
    train_loss: float
    """Token-weighted mean inner-step loss of all facilities in this round."""
    val_loss: float
    """Loss of the new global model on the shared validation set."""
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

    def line(self, rounds: int) -> str:
        rate = self.tokens / self.wall_s if self.wall_s > 0 else 0.0
        return (f"round {self.round:>3}/{rounds}  train_loss {self.train_loss:.4f}  val_loss {self.val_loss:.4f}  "
                f"tokens/s {rate:,.0f}  inner {self.inner_s:.2f}s  sync {self.sync_s:.3f}s  idle {self.idle_s:.2f}s  "
                f"ckpt {self.ckpt_s:.3f}s  inter {self.bytes_inter / 1e6:.2f} MB")


class MetricsLog:
    """Appends RoundMetrics as JSON lines. A new run starts the file afresh; a resumed one keeps the
    lines of the rounds it resumes after and drops any later ones (from a run that died past them)."""

    def __init__(self, path: Path, after_round: int = 0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if after_round > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("round", 0) <= after_round]
        self._fh: TextIO = path.open("w")
        self._fh.write("".join(line + "\n" for line in kept))

    def write(self, metrics: RoundMetrics) -> None:
        self._fh.write(json.dumps(asdict(metrics)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
