"""Planned stops: the signals a job gets ahead of its end become a request the whole federation honours
at the next round boundary.

SLURM sends SIGUSR1 `--signal` seconds before the walltime (the generated batch scripts ask for it) and
SIGTERM when a job is cancelled or pre-empted; mpiexec forwards both to its ranks. Only noting the
signal: the round in progress finishes, every facility learns of the request in the round's closing
reduction (`Trainer._summarise`), the round is checkpointed, and every rank exits with
`mpifed.STOPPED_EXIT`. A second signal of either kind, or of SIGINT, ends the process at once with that
signal's default action, also while the main thread is blocked in MPI: a watcher thread reads each
signal from the interpreter's wakeup pipe, since Python-level handlers run only in the main thread and
only between bytecodes.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""The signals that ask for a planned stop."""
ENDING = (*SIGNALS, signal.SIGINT)
"""The signals of which a second one ends the process at once."""

_received = 0  # the first planned-stop signal's number, once one came
_watch: tuple[int, int] | None = None  # the pipe the interpreter writes each signal's number into


def _note(number: int, frame: FrameType | None) -> None:
    """The Python-level handler: nothing to do here (the watcher counts), but having one makes the
    interpreter's C handler write the signal into the wakeup pipe."""


def _die_of(number: int) -> None:
    """End the process now with signal `number`'s default action, from any thread: `signal.signal` may
    only be called from the main thread, which may be blocked in MPI; the C library's may not."""
    libc = ctypes.CDLL(None)
    libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
    libc.signal(number, 0)  # SIG_DFL
    os.kill(os.getpid(), number)


def _watch_signals(read_end: int) -> None:
    """Read the signal numbers the interpreter's C handler writes, as they come. The main thread runs
    Python-level handlers only between bytecodes, never while it is blocked in an MPI call (a peer that
    vanished); this thread sees each signal at once, whatever the main thread does."""
    global _received
    seen = 0
    while True:
        data = os.read(read_end, 64)
        if not data:  # uninstalled
            os.close(read_end)
            return
        for number in data:
            if number not in ENDING:
                continue
            seen += 1
            if seen >= 2:
                _die_of(number)
            if number in SIGNALS and not _received:  # (a first SIGINT interrupts as usual, when it can)
                _received = number


def install() -> None:
    """From now on SIGUSR1 and SIGTERM ask for a planned stop, and a second of either (or of SIGINT) ends
    the process at once, even while the main thread is blocked in MPI (main thread only, as for any
    handler)."""
    global _received, _watch
    uninstall()
    _received = 0
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # a full pipe must never block a signal handler
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    _watch = read_end, write_end
    for sig in SIGNALS:
        signal.signal(sig, _note)
    threading.Thread(target=_watch_signals, args=(read_end,), name="mpifed-signals", daemon=True).start()


def uninstall() -> None:
    """Back to the default actions."""
    global _watch
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    if _watch is not None:
        signal.set_wakeup_fd(-1)
        os.close(_watch[1])  # the watcher reads the end of the pipe and returns
        _watch = None


def requested() -> int:
    """The number of the signal that asked this rank to stop (0 while none has)."""
    return _received
