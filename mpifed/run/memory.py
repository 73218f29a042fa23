"""Peak resident memory of this rank, phase by phase (start, training, checkpoints, resume), as the OS
counts it: /proc/self/status VmHWM, whose high-water mark each phase resets through
/proc/self/clear_refs (Linux). With MPIFED_MEMORY_LOG=DIR every rank writes DIR/rank-N.json at the end
(benchmarks/memory.py reads them); without it nothing is measured."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOG = "MPIFED_MEMORY_LOG"


def _high_water() -> int:
    """Bytes: the highest resident set since the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set to the current one


class Peaks:
    """This rank's peak per phase name (the largest over the phase's occurrences), when LOG is set."""

    def __init__(self, rank: int) -> None:
        self.folder = os.environ.get(LOG, "")
        self.rank = rank
        self.peaks: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str, since_start: bool = False) -> Iterator[None]:
        """Measure the body (`since_start`: from the process's start, without a reset)."""
        if not self.folder:
            yield
            return
        if not since_start:
            _reset()
        try:
            yield
        finally:
            self.peaks[name] = max(self.peaks.get(name, 0), _high_water())

    def write(self) -> None:
        if self.folder:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            (Path(self.folder) / f"rank-{self.rank}.json").write_text(json.dumps(self.peaks))
