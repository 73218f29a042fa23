"""Control values between ranks: pickle-free collectives for small numbers, text and flat arrays. mpi4py's lowercase methods pickle their payload,
and mpifed never unpickles what came over the network, so every value crosses as a typed buffer:
numbers as float64/int64 arrays, text as UTF-8 bytes."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from mpi4py import MPI


def allreduce(comm: MPI.Intracomm, values: Sequence[float], op: MPI.Op = MPI.SUM) -> np.ndarray:
    """Element-wise reduction of a few float64 values over `comm`."""
    buf = np.array(values, dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, buf, op=op)
    return buf


def allgather_int(comm: MPI.Intracomm, value: int) -> list[int]:
    out = np.empty(comm.size, dtype=np.int64)
    comm.Allgather(np.array([value], dtype=np.int64), out)
    return [int(v) for v in out]


def bcast_int(comm: MPI.Intracomm, value: int | None, root: int = 0) -> int:
    buf = np.array([value if comm.rank == root else 0], dtype=np.int64)
    comm.Bcast(buf, root=root)
    return int(buf[0])


def allgather_str(comm: MPI.Intracomm, text: str) -> list[str]:
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    sizes = allgather_int(comm, len(data))
    out = np.empty(sum(sizes), dtype=np.uint8)
    comm.Allgatherv(data, [out, sizes])
    offsets = np.cumsum([0, *sizes])
    return [out[offsets[i]:offsets[i + 1]].tobytes().decode("utf-8") for i in range(comm.size)]


def bcast_str(comm: MPI.Intracomm, text: str | None, root: int = 0) -> str:
    """Text that only `root` has, delivered to every rank."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8) if comm.rank == root else None
    return bcast_array(comm, data, np.uint8, root).tobytes().decode("utf-8")


def bcast_array(comm: MPI.Intracomm, array: np.ndarray | None, dtype: type, root: int = 0) -> np.ndarray:
    """A 1-D array of `dtype` that only `root` has, delivered to every rank."""
    size = bcast_int(comm, len(array) if comm.rank == root else None, root)
    buf = np.ascontiguousarray(array, dtype=dtype) if comm.rank == root else np.empty(size, dtype=dtype)
    comm.Bcast(buf, root=root)
    return buf


def gather_pieces(comm: MPI.Intracomm, pieces: Sequence[tuple[int, np.ndarray]], numel: int,
                  root: int | None = None) -> np.ndarray | None:
    """The length-`numel` float32 vector assembled from every rank's (offset, values) pieces (disjoint
    across ranks, together covering the vector): on every rank, or with `root` only there (None
    elsewhere)."""
    offsets = np.array([offset for offset, _ in pieces], np.int64)
    lengths = np.array([len(values) for _, values in pieces], np.int64)
    mine = np.concatenate([values for _, values in pieces]).astype(np.float32) if pieces else np.empty(0, np.float32)
    counts, sizes = allgather_int(comm, len(pieces)), allgather_int(comm, len(mine))
    here = root is None or comm.rank == root
    all_offsets, all_lengths = np.empty(sum(counts), np.int64), np.empty(sum(counts), np.int64)
    packed = np.empty(sum(sizes) if here else 0, np.float32)
    if root is None:
        comm.Allgatherv(offsets, [all_offsets, counts])
        comm.Allgatherv(lengths, [all_lengths, counts])
        comm.Allgatherv(mine, [packed, sizes])
    else:
        comm.Gatherv(offsets, [all_offsets, counts] if here else None, root=root)
        comm.Gatherv(lengths, [all_lengths, counts] if here else None, root=root)
        comm.Gatherv(mine, [packed, sizes] if here else None, root=root)
    if not here:
        return None
    out = np.full(numel, np.nan, np.float32)
    at = 0
    for offset, length in zip(all_offsets, all_lengths):
        out[offset:offset + length] = packed[at:at + length]
        at += length
    return out
