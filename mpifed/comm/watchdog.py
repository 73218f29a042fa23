"""Never hang, and say who: deadlines on MPI waits, and aborting the whole job when any rank fails.

MPI collectives cannot time out, so a watchdog thread aborts the job when a wait that involves other
facilities takes longer than allowed; and an exception on one rank aborts every rank through
`MPI_Abort` instead of leaving the others waiting in a collective forever. Each deadline names its
phase; once a roll call is installed (`install`), the error line also names the facility that was lost
and where the others are (see mpifed/comm/rollcall.py).

Rehearsing a loss: a launch started with MPIFED_DIE_AT=PHASE kills its own process group (its mpiexec
and ranks, as a site that goes down) when one of its ranks enters a phase whose name starts with PHASE,
e.g. MPIFED_DIE_AT="round 3: exchange" or "resume".
"""
from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Iterator

from mpi4py import MPI

from mpifed.comm.rollcall import ANSWER_S, RollCall, describe
from mpifed.logs import LOG

ABORT_CODE = 3
DIE_AT = "MPIFED_DIE_AT"
# The launcher forwards a rank's stderr asynchronously and drops what is in flight when the job is
# killed: give the one line that says why a moment to get out first.
_GRACE_S = 0.5
_roll: RollCall | None = None
_phase = "starting"


def _abort(comm: MPI.Comm, code: int) -> None:
    time.sleep(_GRACE_S)
    comm.Abort(code)


def install(roll: RollCall | None) -> None:
    """Name lost facilities in failures from now on (None: stop); the roll call learns this rank's phase."""
    global _roll
    _roll = roll
    if roll is not None:
        roll.phase = _phase


def current_phase() -> str:
    """What this rank is doing now (the phase a failure is reported in)."""
    return _phase


def set_phase(what: str) -> None:
    """What this rank is doing now, as the others' roll calls will hear it."""
    global _phase
    _phase = what
    LOG.debug(f"phase: {what}")
    if _roll is not None:
        _roll.phase = what
    rehearsed = os.environ.get(DIE_AT, "")
    if rehearsed and what.startswith(rehearsed):
        LOG.info(f"{DIE_AT}: this launch goes down at '{what}' (rehearsing the loss of a site)")
        os.killpg(os.getpgid(0), signal.SIGKILL)


def _fail(comm: MPI.Comm, line: str, code: int, ask: bool = True) -> None:
    """Print `line`, with what the roll call learns about the others unless `ask` is False (the line
    says it already), then abort. A rank that does not lead a facility waits first: its leader's line,
    with the same facts, usually ends the job for it."""
    if ask and _roll is not None:
        if _roll.comm.rank not in _roll.leaders:
            time.sleep(ANSWER_S + 4 * _GRACE_S)
        line = f"{line}; {describe(_roll.ask())}"
    LOG.error(f"{line}; aborting the job")
    _abort(comm, code)


def expire(comm: MPI.Comm, seconds: float, what: str, setting: str = "federation.timeout_s") -> None:
    """End the job through `comm`: `what` did not finish within `seconds` (the setting that bounds it)."""
    _fail(comm, f"mpifed: error: {what} did not finish within {seconds:g} s ({setting})", ABORT_CODE)


def check_alive(comm: MPI.Comm, what: str) -> None:
    """During a wait with no deadline of its own (`what`): end the job through `comm`, naming them, if
    the roll call finds facilities gone. Without a roll call it finds nothing."""
    if _roll is not None:
        answers = _roll.ask()
        if None in answers.values():
            _fail(comm, f"mpifed: error: {what}: {describe(answers)}", ABORT_CODE, ask=False)


class Deadline:
    """A running deadline: aborts the MPI job through `comm` when it expires, unless it was stopped."""

    def __init__(self, comm: MPI.Comm, seconds: float, what: str, setting: str) -> None:
        self.comm, self.what, self.setting = comm, what, setting
        self._lock, self._timer, self._stopped, self._generation = threading.Lock(), None, False, 0
        self.restart(seconds)

    def restart(self, seconds: float, what: str = "") -> None:
        """Count `seconds` from now instead (for `what`, the new phase, when given)."""
        if what:
            set_phase(what)
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._generation += 1
            self.what = what or self.what
            self._timer = threading.Timer(seconds, self._expire, args=(self._generation, seconds, self.what))
            self._timer.daemon = True
            self._timer.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()

    def _expire(self, generation: int, seconds: float, what: str) -> None:
        with self._lock:
            if self._stopped or generation != self._generation:
                return  # stopped or restarted while this timer fired
        expire(self.comm, seconds, what, self.setting)


@contextmanager
def deadline(comm: MPI.Comm, seconds: float, what: str, setting: str = "federation.timeout_s") -> Iterator[Deadline]:
    """Abort the MPI job through `comm` if the body has not finished after `seconds` (which the body may
    count afresh through the `Deadline` it is given)."""
    outer = _phase
    set_phase(what)
    watch = Deadline(comm, seconds, what, setting)
    try:
        yield watch
    finally:
        watch.stop()
        set_phase(outer)


@contextmanager
def abort_on_error(comm: MPI.Comm, expected: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn any exception escaping the body on this rank into an abort of the whole job. `expected`
    failures (a situation, not a bug) are printed as their message alone, and so is an MPI error once a
    roll call can say which facility is gone; others with a traceback. The job's exit code is the
    exception's `exit_code` (2 for bad input), else 1."""
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the other ranks must not hang
        if isinstance(exc, MPI.Exception) and _roll is not None:
            first = str(exc).splitlines()[0] if str(exc) else exc.Get_error_string()
            _fail(comm, f"mpifed: error: {_phase}: MPI lost a connection ({first})", 1)
        else:
            detail = "" if isinstance(exc, expected) else "\n" + traceback.format_exc()
            if not detail and comm.Get_rank():
                # A situation (a lying manifest, a refused checkpoint) usually fails every rank at once:
                # the lowest says it and its abort (after its grace) ends the others while they wait; a rank
                # it spared says its own a moment later. One line where there would be one per rank.
                time.sleep(min(3.0, 2 * _GRACE_S + 0.5 + 0.01 * comm.Get_rank()))
            LOG.error(f"mpifed: rank {comm.Get_rank()}: error: {exc}{detail}")
            _abort(comm, getattr(exc, "exit_code", 1))  # 2 for bad input, as the command line exits
        raise SystemExit(1) from None  # MPI_Abort may return before the launcher kills this process
