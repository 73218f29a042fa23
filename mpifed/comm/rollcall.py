"""Who is still there: when a wait across facilities runs out of time, or MPI reports a broken
connection, the error should name the facility that was lost and what everyone was doing, not only
that something timed out.

Every facility leader answers questions on a communicator of its own (a duplicate of the world) from a
small thread: "what are you doing?" gets its current phase. On a failure any rank asks every other
facility's leader and waits a few seconds: a leader that answers is alive (and says where it is), one
that does not, or whose connection is broken, is lost. The questions never touch the communicators the
training uses, and the thread costs one probe every 50 ms.

Messages are UTF-8 text in byte buffers: nothing is unpickled.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np
from mpi4py import MPI

_ASK, _ANSWER = 7201, 7202
_MAX_ANSWER = 512  # bytes of a phase description
ANSWER_S = 5.0
"""How long a roll call waits for the other leaders' answers."""


class RollCall:
    """Facility leaders that answer "where are you?" in the background; any rank may ask. Built
    collectively over `world` (it duplicates it); `leaders` are the facility leaders' world ranks and
    `names` their facilities, in order."""

    def __init__(self, world: MPI.Intracomm, leaders: Sequence[int], names: Sequence[str]) -> None:
        self.comm = world.Dup()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.leaders, self.names = list(leaders), list(names)
        self.phase = "starting"
        """What this rank is doing now (set by the deadlines it enters)."""
        self._stop = threading.Event()
        self._thread = None
        if self.comm.rank in self.leaders:
            self._thread = threading.Thread(target=self._answer, name="mpifed-rollcall", daemon=True)
            self._thread.start()

    def _answer(self) -> None:
        status, asked = MPI.Status(), np.empty(1, np.uint8)
        while not self._stop.is_set():
            try:
                while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_ASK, status=status):
                    source = status.Get_source()
                    self.comm.Recv([asked, MPI.BYTE], source=source, tag=_ASK)
                    answer = np.frombuffer(self.phase.encode()[:_MAX_ANSWER], np.uint8)
                    self.comm.Send([answer, MPI.BYTE], dest=source, tag=_ANSWER)
            except MPI.Exception:
                pass  # a broken connection to whoever asked: nothing to answer
            self._stop.wait(0.05)

    def ask(self, within: float = ANSWER_S) -> dict[str, str | None]:
        """Every other facility's phase, or None for a facility whose leader does not answer."""
        me = self.comm.rank
        pending: dict[int, tuple[MPI.Request, np.ndarray]] = {}
        answers: dict[str, str | None] = {}
        for leader, name in zip(self.leaders, self.names):
            if leader == me:
                continue
            answers[name] = None
            try:
                self.comm.Isend([np.zeros(1, np.uint8), MPI.BYTE], dest=leader, tag=_ASK)
                buffer = np.zeros(_MAX_ANSWER, np.uint8)
                pending[leader] = (self.comm.Irecv([buffer, MPI.BYTE], source=leader, tag=_ANSWER), buffer)
            except MPI.Exception:
                continue
        ends = time.monotonic() + within
        while pending and time.monotonic() < ends:
            for leader, (request, buffer) in list(pending.items()):
                status = MPI.Status()
                try:
                    done = request.Test(status)
                except MPI.Exception:
                    del pending[leader]
                    continue
                if done:
                    count = status.Get_count(MPI.BYTE)
                    answers[self.names[self.leaders.index(leader)]] = buffer[:count].tobytes().decode(errors="replace")
                    del pending[leader]
            time.sleep(0.02)
        return answers

    def close(self) -> None:
        """Stop answering (collective: every rank frees its duplicate of the world)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.comm.Free()


def describe(answers: dict[str, str | None]) -> str:
    """One clause for an error line: the facilities lost, and where the others are."""
    lost = [name for name, phase in answers.items() if phase is None]
    alive = [f"{name} is at '{phase}'" for name, phase in answers.items() if phase is not None]
    parts = ([f"lost facility {', '.join(lost)} (no answer)"] if lost else []) + alive
    return "; ".join(parts) if parts else "no other facility"
