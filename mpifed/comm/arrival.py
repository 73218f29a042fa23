"""The meeting point after a round's inner steps: every facility arrives before anything crosses sites.

Facilities differ in speed, and with `federation.sample` some sit a round out. Neither may look like a
lost site. So this wait's deadline does not start when a rank gets here but when the first facility
that trained does: from then the slowest has `timeout_s` to finish its inner steps. Until then (a
facility that sat the round out, waiting for those that train) nothing times out, but every `timeout_s`
the roll call asks whether the facilities still awaited are there at all: one that is gone ends the job,
named, instead of a wait without end.

Facility leaders tell each other that they arrived, one byte to each, on their own duplicate of the
leaders' communicator; a facility's other ranks wait for their leader.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
from mpi4py import MPI

from mpifed.comm import watchdog
from mpifed.comm.topology import Topology

_TAG = 7301
_POLL_S = 0.005


class Arrival:
    """The meeting point of one job's facilities, built collectively over the world from its topology."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.leaders = topo.roots.Dup() if topo.is_leader else MPI.COMM_NULL
        """Facility leaders, in facility order (the communicator of root 0 of every facility)."""

    def wait(self, trained: Sequence[bool], seconds: float, what: str) -> float:
        """Return once every facility got here; `trained[f]` says whether facility f trained this round
        (the deadline of `seconds` starts with the first of those to arrive). Collective over the world;
        returns the seconds this rank waited."""
        start = time.monotonic()
        watchdog.set_phase(what)
        if self.topo.is_leader:
            self._meet(trained, seconds, what, start)
        self.topo.facility.Barrier()  # the leader bounds this wait; the others hear from it
        return time.monotonic() - start

    def _meet(self, trained: Sequence[bool], seconds: float, what: str, start: float) -> None:
        comm, me, names = self.leaders, self.leaders.rank, self.topo.facility_names
        note, heard = np.zeros(1, np.uint8), np.zeros(comm.size, np.uint8)
        others = [f for f in range(comm.size) if f != me]
        sends = [comm.Isend([note, MPI.BYTE], dest=f, tag=_TAG) for f in others]
        receives = {f: comm.Irecv([heard[f:f + 1], MPI.BYTE], source=f, tag=_TAG) for f in others}
        clock = start if trained[me] else None  # when the first facility that trained arrived
        ask_at = start + seconds
        while receives:
            for f in [f for f, request in receives.items() if request.Test()]:
                del receives[f]
                if trained[f] and clock is None:
                    clock = time.monotonic()
            now = time.monotonic()
            awaited = ", ".join(names[f] for f in receives)
            if clock is not None and receives and now - clock > seconds:
                watchdog.expire(self.topo.world, seconds, f"{what} (still training: {awaited})")
            if clock is None and now > ask_at:
                watchdog.check_alive(self.topo.world, f"{what} (waiting for {awaited} to train)")
                ask_at = now + seconds
            time.sleep(_POLL_S)
        MPI.Request.Waitall(sends)

    def close(self) -> None:
        """Free the leaders' duplicate (collective over the leaders)."""
        if self.leaders != MPI.COMM_NULL:
            self.leaders.Free()
