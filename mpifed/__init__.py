"""mpifed: one MPI program that trains a language model across several HPC facilities at once.

Each facility trains locally; every H local steps the facilities' roots reduce what they learned over
MPI, apply an outer optimizer and checkpoint the global model to HDF5. See README.md.
"""

import os
from pathlib import Path

__version__ = "0.1.0"

STOPPED_EXIT = 75
"""Exit code of a run that was asked to stop (SIGUSR1 or SIGTERM, as a batch job gets ahead of its
walltime) and did, after checkpointing the round it was in: a restart with --resume auto continues it.
(EX_TEMPFAIL: the generated batch scripts restart on it.)"""


def cache_dir() -> Path:
    """Where mpifed caches what is slow to rebuild (the embedded corpus, DeepSpeed's JIT build):
    $MPIFED_CACHE, else $XDG_CACHE_HOME/mpifed or ~/.cache/mpifed."""
    base = os.environ.get("MPIFED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mpifed")
    return Path(base)
