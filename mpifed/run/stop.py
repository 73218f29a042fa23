"""Planned stops: the signals a job gets ahead of its end become a request the whole federation honours
at the next round boundary.

SLURM sends SIGUSR1 `--signal` seconds before the walltime (the generated batch scripts ask for it) and
SIGTERM when a job is cancelled or pre-empted; mpiexec forwards both to its ranks. The handler only
notes the signal: the round in progress finishes, every facility learns of the request in the round's
closing reduction (`Trainer._summarise`), the round is checkpointed, and every rank exits with
`mpifed.STOPPED_EXIT`. A second signal of either kind ends the process at once, as if no handler were
installed.
"""
from __future__ import annotations

import os
import signal
from types import FrameType

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""The signals that ask for a planned stop."""

_received = 0  # the first such signal's number, once one came


def _note(number: int, frame: FrameType | None) -> None:
    global _received
    if _received:  # asked twice: stop now
        uninstall()
        os.kill(os.getpid(), number)
        return
    _received = number


def install() -> None:
    """From now on SIGUSR1 and SIGTERM ask for a planned stop (main thread only, as for any handler)."""
    global _received
    _received = 0
    for sig in SIGNALS:
        signal.signal(sig, _note)


def uninstall() -> None:
    """Back to the default actions."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def requested() -> int:
    """The number of the signal that asked this rank to stop (0 while none has)."""
    return _received
