"""Control values across facilities through their leaders alone: the few numbers and texts every rank of
every facility must agree on (losses, token counts, metrics, layout fingerprints, checkpoint digests)
travel inside each facility by MPI as before, and between facilities only as messages on the leaders'
links (mpifed/comm/link.py: point to point, sealed where the federation holds a token). No MPI
collective spans two sites for them.

Each operation is a facility collective to the leader, one group operation of the leaders' mesh, and a
facility broadcast back; results come in the world's order (facility by facility, rank by rank), and a
reduction combines the facilities' parts in facility order with MPI's own operator, so every rank of
every facility holds the same bits. Like `control`, nothing is pickled.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from mpi4py import MPI

from mpifed.comm import control, pieces
from mpifed.comm.link import LinkError, Mesh


TEXTS_LIMIT = 16 << 20
"""Bytes a facility's part of a list of texts may hold (fingerprints and digests: a few KiB)."""


class Across:
    """Collectives over every rank of every facility, through the leaders' `mesh` (None off the
    leaders); `facility` is this rank's facility's communicator, its rank 0 the leader; `sizes` the
    ranks of every facility, in order."""

    def __init__(self, facility: MPI.Intracomm, mesh: Mesh | None, sizes: Sequence[int]) -> None:
        assert (mesh is not None) == (facility.rank == 0), "the leaders, and only they, hold the mesh"
        self.facility, self.mesh, self.sizes = facility, mesh, list(sizes)

    def allreduce(self, values: Sequence[float], op: MPI.Op = MPI.SUM) -> np.ndarray:
        """Element-wise reduction of a few float64 values over every rank (control.allreduce's)."""
        mine = np.array(values, dtype=np.float64)
        here = np.empty_like(mine)
        self.facility.Reduce(mine, here, op=op, root=0)
        if self.mesh is not None:
            every = np.empty((self.mesh.size, len(mine)), np.float64)
            self.mesh.allgather(here, every)
            here = every[0].copy()
            for part in every[1:]:  # facility order: the same bits on every leader
                op.Reduce_local(part, here)
        self.facility.Bcast(here, root=0)
        return here

    def allgather_str(self, text: str) -> list[str]:
        """Every rank's `text`, in the world's order."""
        data = np.frombuffer(text.encode("utf-8"), np.uint8)
        sizes = control.allgather_int(self.facility, len(data))
        packed = np.empty(sum(sizes) if self.facility.rank == 0 else 0, np.uint8)
        self.facility.Gatherv(data, [packed, sizes] if self.facility.rank == 0 else None, root=0)
        blob = None
        if self.mesh is not None:  # a facility's part: its ranks' sizes (int64), then their bytes
            part = np.concatenate([np.array([len(sizes), *sizes], "<i8").view(np.uint8), packed])
            lengths = np.empty((self.mesh.size, 1), np.int64)
            self.mesh.allgather(np.array([len(part)], np.int64), lengths)
            if not all(0 <= int(n) <= TEXTS_LIMIT for n in lengths[:, 0]):
                raise LinkError(f"a facility's leader announced a list of texts of {lengths[:, 0].tolist()} "
                                f"bytes (at most {TEXTS_LIMIT})")
            parts = {m: np.empty(int(lengths[m, 0]), np.uint8) for m in range(self.mesh.size) if m != self.mesh.rank}
            self.mesh.exchange({m: part for m in parts}, parts)
            parts[self.mesh.rank] = part
            blob = np.concatenate([parts[m] for m in range(self.mesh.size)])
        return _texts(control.bcast_array(self.facility, blob, np.uint8), self.sizes)

    def bcast_str(self, text: str | None) -> str:
        """Text only the global root (the first facility's leader) has, on every rank."""
        return self.allgather_str(text or "")[0]

    def bcast_bytes(self, data: np.ndarray | None, limit: int) -> np.ndarray:
        """uint8 bytes only the global root has (None elsewhere), on every rank: over the leaders' links,
        then from each leader inside its facility. A size over `limit` announced by the root is a
        LinkError (nothing is allocated for it)."""
        blob = None
        if self.mesh is not None:
            size = np.array([len(data) if self.mesh.rank == 0 else 0], np.int64)
            self.mesh.bcast(size, 0)
            if not 0 <= int(size[0]) <= limit:
                raise LinkError(f"the global root announced {int(size[0])} bytes to share (at most {limit})")
            blob = np.ascontiguousarray(data, np.uint8) if self.mesh.rank == 0 else np.empty(int(size[0]), np.uint8)
            self.mesh.bcast(blob, 0)
        return control.bcast_array(self.facility, blob, np.uint8)


def spread(facility: MPI.Intracomm, mesh: Mesh | None, mine: Sequence[pieces.Range],
           source: Callable[[int, int], np.ndarray] | None, take: Callable[[int, int, np.ndarray], None],
           lo: int, hi: int, bucket: int) -> None:
    """Values [lo, hi) that only the first facility's leader has (`source` gives each bucket there) to
    every rank of every facility, each rank taking the pieces of its ranges `mine` (pieces.scatter's
    `take`). Each bucket crosses each of the leaders' links (`mesh`, on the leaders) once, then spreads
    inside every facility from its own leader: nothing else crosses sites. No rank holds more than one
    bucket beyond its pieces (a leader, while it runs, also a sealed copy of one bucket per link).
    Collective over every facility."""
    everyone = pieces.everyones(facility, mine)
    relay = source
    if mesh is not None and mesh.rank == 0:
        def relay(b_lo: int, b_hi: int) -> np.ndarray:
            values = np.ascontiguousarray(source(b_lo, b_hi), np.float32)
            mesh.exchange({m: values for m in range(1, mesh.size)}, {})
            return values
    elif mesh is not None:
        room = np.empty(min(bucket, hi - lo), np.float32)

        def relay(b_lo: int, b_hi: int) -> np.ndarray:
            mesh.exchange({}, {0: room[:b_hi - b_lo]})
            return room[:b_hi - b_lo]
    pieces.scatter(facility, 0, mine, everyone, relay, take, lo, hi, bucket)
    if mesh is not None:
        mesh.release()  # the sealed copies of the last bucket: nothing of the model stays behind


def _texts(blob: np.ndarray, sizes: Sequence[int]) -> list[str]:
    """The texts of the facilities' parts, one after another, each part holding one text per rank of
    its facility (`sizes`). A part that does not parse (only a peer holding the token could have sent
    it) raises LinkError, never an IndexError or a list in the wrong order."""
    out, at, raw = [], 0, blob.tobytes()
    try:
        for facility, expected in enumerate(sizes):
            count = int.from_bytes(raw[at:at + 8], "little", signed=True) if at + 8 <= len(raw) else -1
            if count != expected:
                raise ValueError(f"facility {facility} holds {count} texts, not {expected}")
            at += 8
            lengths = [int.from_bytes(raw[at + 8 * i:at + 8 * i + 8], "little", signed=True) for i in range(count)]
            at += 8 * count
            if min(lengths, default=0) < 0 or at + sum(lengths) > len(raw):
                raise ValueError("lengths past its end")
            for length in lengths:
                out.append(raw[at:at + length].decode("utf-8"))
                at += length
        if at != len(raw):
            raise ValueError(f"{len(raw) - at} bytes after the last part")
    except ValueError as exc:  # UnicodeDecodeError is one too
        raise LinkError(f"a facility's leader sent a list of texts that does not parse ({exc})") from None
    return out
