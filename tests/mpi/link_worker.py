"""Links between gateways (mpifed/comm/link.py): one gateway per rank, facilities f0, f1, ...

    python tests/mpi/link_worker.py CASE OUT        (MPIFED_TOKEN set: sealed links; unset: plain)

CASE "ops": every group operation on messages of several frames (FRAME_BYTES shrunk to 1000), each
rank checking what it got against the values every rank can compute for itself (numpy, seeded).
CASE "across": ranks 0-1, 2 and 3-4 as three facilities (mpifed/comm/across.py): sums, maxima, texts
and broadcasts (text, bytes) over every rank, through the leaders' links only.
CASE flip | replay | inject | short | long | drop: a wrapper around rank 1's link to rank 0 tampers between
sealing and sending; rank 0 records the LinkError it gets ("drop": the exchange's deadline ends the job).
Each rank writes OUT/rankN.json.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpifed.comm import link, watchdog
from mpifed.comm.link import LinkError, Mesh

case, out = sys.argv[1], Path(sys.argv[2])
comm = MPI.COMM_WORLD
names = [f"f{i}" for i in range(comm.size)]
token = os.environ["MPIFED_TOKEN"].encode() if os.environ.get("MPIFED_TOKEN") else None
link.FRAME_BYTES = 1000


def values(rank: int, n: int, salt: int = 0) -> np.ndarray:
    return np.random.default_rng([rank, n, salt]).standard_normal(n).astype(np.float32)


class Tamper:
    """Stands in for rank 1's communicator on its link to rank 0: changes what is sent, after sealing."""

    def __init__(self, comm: MPI.Intracomm, how: str) -> None:
        self.comm, self.how, self.sent, self.kept = comm, how, 0, []

    def Irecv(self, *args, **kwargs):
        return self.comm.Irecv(*args, **kwargs)

    def Isend(self, buf, dest, tag):
        data, kind = buf
        raw = np.frombuffer(data, np.uint8).copy()
        self.sent += 1
        if self.how == "flip":
            raw[len(raw) // 2] ^= 1
        elif self.how == "replay" and self.sent == 2:
            raw = self.kept[0]  # the first message again, in place of the second
        elif self.how == "inject":  # a forged message of the right size, ahead of the real one
            self.kept.append(np.frombuffer(os.urandom(len(raw)), np.uint8).copy())
            self.comm.Isend([self.kept[-1], kind], dest, tag).Wait()
        elif self.how == "short":
            raw = raw[:-5]
        elif self.how == "long":
            raw = np.concatenate([raw, np.zeros(5, np.uint8)])
        elif self.how == "drop":
            return MPI.REQUEST_NULL
        self.kept.append(raw)
        return self.comm.Isend([raw, kind], dest, tag)


if case == "across":
    from mpifed.comm import topology

    index = [0, 0, 1, 2, 2][comm.rank]
    topo = topology.build(comm, index, ["a", "b", "c"], 1, token)
    across, me = topo.across, topo.world.rank
    seen = {"rank": me, "sealed": across.mesh.sealed if across.mesh else None,
            "sum": across.allreduce(values(me, 5).astype(np.float64).tolist()).tolist(),
            "max": across.allreduce([me, -me], MPI.MAX).tolist(),
            "texts": across.allgather_str("é" * me),
            "bcast": across.bcast_str("from the hub" if me == 0 else None),
            # 30 kB that only the hub has (the embedded text's way at start): over 30 frames per link
            "bytes": across.bcast_bytes(np.arange(30_000, dtype=np.uint8) if me == 0 else None, 1 << 20).tolist()[::997]}
    if across.mesh is not None:  # the leaders alone: a root announcing more than the others accept
        from mpifed.comm.across import Across

        try:  # refused before anything is allocated (the last thing this mesh carries)
            Across(MPI.COMM_SELF, across.mesh, [1, 1, 1]).bcast_bytes(np.zeros(2000, np.uint8) if me == 0 else None, 1000)
            seen["over"] = ""
        except LinkError as exc:
            seen["over"] = str(exc)
    (out / f"rank{comm.rank}.json").write_text(json.dumps(seen))
    topo.close()
    sys.exit(0)
mesh = Mesh.connect(comm, names, "gateway 0", token)
seen = {"rank": comm.rank, "sealed": mesh.sealed}
if case == "ops":
    me, n = comm.rank, 2500
    sends = {m: values(me, n + m) for m in range(comm.size) if m != me}  # a message of its own size for each
    receives = {m: np.empty(n + me, np.float32) for m in range(comm.size) if m != me}
    mesh.exchange(sends, receives)
    seen["exchange"] = all(np.array_equal(receives[m], values(m, n + me)) for m in receives)
    everyone = np.empty((comm.size, n), np.float32)
    mesh.allgather(values(me, n, 1), everyone)
    seen["allgather"] = all(np.array_equal(everyone[m], values(m, n, 1)) for m in range(comm.size))
    got = values(me, n, 2)
    mesh.bcast(got, root=1)
    seen["bcast"] = np.array_equal(got, values(1, n, 2))
    if comm.size > 2:  # the guard left f2 out: f0 and f1 go on alone; f2 sends nothing
        if me != 2:
            part = mesh.subset([True, True, False] + [True] * (comm.size - 3))
            both = np.empty((part.size, 7), np.float32)
            part.allgather(values(me, 7, 3), both)
            seen["subset"] = [part.rank, part.size, all(np.array_equal(both[i], values(m, 7, 3))
                                                        for i, m in enumerate([0, 1, *range(3, comm.size)]))]
        mesh.allgather(values(me, n, 4), everyone)  # and the whole mesh again after it
        seen["after_subset"] = all(np.array_equal(everyone[m], values(m, n, 4)) for m in range(comm.size))
else:
    if comm.rank == 1:
        mesh.links[0].comm = Tamper(mesh.links[0].comm, case)
    try:
        with watchdog.deadline(comm, 5, "round 2: exchange: combining the updates"):
            for salt in (1, 2):  # two messages each way: a replay needs one to replay
                got = values(comm.rank, 300, salt)
                mesh.bcast(got, root=1)
                if comm.rank == 0:
                    seen[f"message {salt}"] = bool(np.array_equal(got, values(1, 300, salt)))
    except LinkError as exc:
        seen["error"] = str(exc)
(out / f"rank{comm.rank}.json").write_text(json.dumps(seen))
comm.Barrier()
