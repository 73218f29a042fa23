"""Pickle-free collectives for small control values. mpi4py's lowercase methods pickle their payload,
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


def bcast_array(comm: MPI.Intracomm, array: np.ndarray | None, dtype: type, root: int = 0) -> np.ndarray:
    """A 1-D array of `dtype` that only `root` has, delivered to every rank."""
    size = bcast_int(comm, len(array) if comm.rank == root else None, root)
    buf = np.ascontiguousarray(array, dtype=dtype) if comm.rank == root else np.empty(size, dtype=dtype)
    comm.Bcast(buf, root=root)
    return buf
