"""Never hang: deadlines on MPI waits, and aborting the whole job when any rank fails.

MPI collectives cannot time out, so a watchdog thread aborts the job when an exchange with other
facilities takes longer than allowed; and an exception on one rank aborts every rank through
`MPI_Abort` instead of leaving the others waiting in a collective forever."""
from __future__ import annotations

import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Iterator

from mpi4py import MPI

ABORT_CODE = 3
# The launcher forwards a rank's stderr asynchronously and drops what is in flight when the job is
# killed: give the one line that says why a moment to get out first.
_GRACE_S = 0.5


def _abort(comm: MPI.Comm, code: int) -> None:
    time.sleep(_GRACE_S)
    comm.Abort(code)


@contextmanager
def deadline(comm: MPI.Comm, seconds: float, what: str, setting: str = "federation.timeout_s") -> Iterator[None]:
    """Abort the MPI job through `comm` if the body has not finished after `seconds`."""
    done = threading.Event()

    def expire() -> None:
        if not done.is_set():
            print(f"mpifed: error: {what} did not finish within {seconds:g} s "
                  f"({setting}); aborting the job", file=sys.stderr, flush=True)
            _abort(comm, ABORT_CODE)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        done.set()
        timer.cancel()


@contextmanager
def abort_on_error(comm: MPI.Comm, expected: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn any exception escaping the body on this rank into an abort of the whole job. `expected`
    failures (a situation, not a bug) are printed as their message alone; others with a traceback."""
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the other ranks must not hang
        detail = "" if isinstance(exc, expected) else "\n" + traceback.format_exc()
        print(f"mpifed: rank {comm.Get_rank()}: error: {exc}{detail}", file=sys.stderr, flush=True)
        _abort(comm, 1)
        raise SystemExit(1) from None  # MPI_Abort may return before the launcher kills this process
