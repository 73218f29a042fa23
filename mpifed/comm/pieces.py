"""Flat arrays that live spread over the ranks of a communicator, each rank holding some ranges (pieces)
of them: streamed to one rank, or from one rank back to whoever holds each piece, bucket by bucket, so
that no rank ever holds more than one bucket beyond its own pieces.

Pieces of a bucket travel as one message per rank: the rank at the other end lays them out with an MPI
indexed datatype over the bucket (offset order on both sides), so nothing is packed or copied twice.
Used by the federation (segments to and from their roots) and by checkpoints (parts to and from a
facility's writer).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from mpi4py import MPI

from mpifed.comm import control

Range = tuple[int, int]
View = tuple[int, np.ndarray]


def clip(ranges: Sequence[Range], lo: int, hi: int) -> list[Range]:
    """The parts of `ranges` inside [lo, hi)."""
    return [(max(a, lo), min(b, hi)) for a, b in ranges if max(a, lo) < min(b, hi)]


def ranges_of(views: Sequence[View]) -> list[Range]:
    return [(offset, offset + len(values)) for offset, values in views]


def everyones(comm: MPI.Intracomm, ranges: Sequence[Range]) -> list[list[Range]]:
    """Every rank's ranges, each list sorted (collective over `comm`)."""
    flat = control.allgather_str(comm, ",".join(f"{a}:{b}" for a, b in sorted(ranges)))
    return [[tuple(map(int, item.split(":"))) for item in text.split(",") if item] for text in flat]


def _indexed(pieces: Sequence[Range], lo: int) -> MPI.Datatype:
    return MPI.FLOAT.Create_indexed([b - a for a, b in pieces], [a - lo for a, b in pieces]).Commit()


def _with_each(comm: MPI.Intracomm, root: int, everyone: Sequence[Sequence[Range]], b_lo: int, b_hi: int,
               post: Callable[[list, int], MPI.Request]) -> Callable[[], None]:
    """On the root: `post([buffer spec], rank)` for every other rank with pieces in [b_lo, b_hi), each
    through an indexed datatype over the bucket; returns what waits for them all and frees the types."""
    requests, types = [], []
    for k, ranges in enumerate(everyone):
        theirs = clip(ranges, b_lo, b_hi)
        if k != root and theirs:
            types.append(_indexed(theirs, b_lo))
            requests.append(post([1, types[-1]], k))

    def finish() -> None:
        MPI.Request.Waitall(requests)
        for dtype in types:
            dtype.Free()

    return finish


def gather(comm: MPI.Intracomm, root: int, mine: Sequence[Range], everyone: Sequence[Sequence[Range]],
           produce: Callable[[int, int, np.ndarray], None], lo: int, hi: int, bucket: int,
           sink: Callable[[int, int, np.ndarray], None] | None = None, into: np.ndarray | None = None) -> None:
    """[lo, hi) assembled on `root` from every rank's pieces, one bucket at a time: `produce(x, y, out)`
    writes this rank's values [x, y) (within one of its ranges `mine`) into `out`; on the root each
    bucket [b_lo, b_hi) goes to `sink(b_lo, b_hi, values)`, or straight into `into` (the whole [lo, hi),
    received in place). Collective over `comm`."""
    mine = sorted(mine)  # the order of the root's indexed datatype
    for b_lo in range(lo, hi, bucket):
        b_hi = min(hi, b_lo + bucket)
        pieces = clip(mine, b_lo, b_hi)
        if comm.rank == root:
            target = into[b_lo - lo:b_hi - lo] if into is not None else np.empty(b_hi - b_lo, np.float32)
            finish = _with_each(comm, root, everyone, b_lo, b_hi,
                                lambda spec, k: comm.Irecv([target, *spec], source=k, tag=7401))
            for x, y in pieces:
                produce(x, y, target[x - b_lo:y - b_lo])
            finish()
            if sink is not None:
                sink(b_lo, b_hi, target)
        elif pieces:  # in offset order: the order of the root's indexed datatype for this rank
            buf = np.empty(sum(y - x for x, y in pieces), np.float32)
            at = 0
            for x, y in pieces:
                produce(x, y, buf[at:at + y - x])
                at += y - x
            comm.Send(buf, dest=root, tag=7401)


def scatter(comm: MPI.Intracomm, root: int, mine: Sequence[Range], everyone: Sequence[Sequence[Range]],
            source: Callable[[int, int], np.ndarray] | None, take: Callable[[int, int, np.ndarray], None],
            lo: int, hi: int, bucket: int) -> None:
    """The reverse of `gather`: on `root`, `source(b_lo, b_hi)` gives each bucket of [lo, hi); every rank
    gets its pieces of it through `take(x, y, values)`. Collective over `comm`."""
    mine = sorted(mine)
    for b_lo in range(lo, hi, bucket):
        b_hi = min(hi, b_lo + bucket)
        pieces = clip(mine, b_lo, b_hi)
        if comm.rank == root:
            values = source(b_lo, b_hi)
            finish = _with_each(comm, root, everyone, b_lo, b_hi,
                                lambda spec, k: comm.Isend([values, *spec], dest=k, tag=7402))
            for x, y in pieces:
                take(x, y, values[x - b_lo:y - b_lo])
            finish()
        elif pieces:
            buf = np.empty(sum(y - x for x, y in pieces), np.float32)
            comm.Recv(buf, source=root, tag=7402)
            at = 0
            for x, y in pieces:
                take(x, y, buf[at:at + y - x])
                at += y - x


def locate(views: Sequence[View], x: int, y: int) -> np.ndarray:
    """Values [x, y) inside whichever of `views` holds them."""
    for offset, local in views:
        if offset <= x and y <= offset + len(local):
            return local[x - offset:y - offset]
    raise ValueError(f"no view holds [{x}, {y})")


def into_views(views: Sequence[View]) -> Callable[[int, int, np.ndarray], None]:
    """A `take` that writes values [x, y) into whichever of `views` holds them."""
    def take(x: int, y: int, values: np.ndarray) -> None:
        locate(views, x, y)[:] = values
    return take


def from_views(views: Sequence[View]) -> Callable[[int, int, np.ndarray], None]:
    """A `produce` that copies values [x, y) out of whichever of `views` holds them."""
    def produce(x: int, y: int, out: np.ndarray) -> None:
        np.copyto(out, locate(views, x, y))
    return produce
