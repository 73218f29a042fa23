"""Communicators: which rank belongs to which facility, who the roots are, and how facilities talk.

`Topology` is built once at start from a communicator and this rank's facility, validated, and passed
down; library code never reads the launch's world communicator (only mpifed/run/rank.py does). This
module also bootstraps each facility's torch.distributed process group from the facility communicator
(the leader binds a free port and broadcasts it).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Mapping, Sequence

from mpi4py import MPI

from mpifed.comm import control

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Topology:
    """The communicators of one federated job, seen from one rank.

    world: every rank of every facility, ordered by facility.
    facility: this rank's facility.
    roots: root r of every facility, ordered by facility, where this rank is root r; else COMM_NULL.
    inter: facility index -> intercommunicator; the hub (facility 0) holds one per other facility,
        every other facility one to the hub.
    """

    world: MPI.Intracomm
    facility: MPI.Intracomm
    roots: MPI.Intracomm
    inter: Mapping[int, MPI.Intercomm]
    facility_index: int
    facility_names: tuple[str, ...]
    facility_sizes: tuple[int, ...]
    n_roots: int = 1

    def __post_init__(self) -> None:
        problems = []
        n = len(self.facility_names)
        if n != len(self.facility_sizes) or len(set(self.facility_names)) != n:
            problems.append(f"facility names {self.facility_names} must be unique, one per size")
        if not 0 <= self.facility_index < n:
            problems.append(f"facility index {self.facility_index} is not in 0..{n - 1}")
        elif self.facility.size != self.facility_sizes[self.facility_index]:
            problems.append(f"facility communicator has {self.facility.size} ranks, "
                            f"expected {self.facility_sizes[self.facility_index]}")
        if self.world.size != sum(self.facility_sizes):
            problems.append(f"world has {self.world.size} ranks, facilities add up to {sum(self.facility_sizes)}")
        if not 1 <= self.n_roots <= min(self.facility_sizes, default=0):
            problems.append(f"{self.n_roots} roots per facility, smallest facility has "
                            f"{min(self.facility_sizes, default=0)} ranks")
        if (self.roots != MPI.COMM_NULL) != (self.facility.rank < self.n_roots):
            problems.append("roots communicator must exist exactly on the first n_roots ranks of a facility")
        expected_inter = set(range(1, n)) if self.facility_index == 0 else {0}
        if set(self.inter) != expected_inter:
            problems.append(f"intercommunicators to {sorted(self.inter)}, expected {sorted(expected_inter)}")
        if problems:
            raise ValueError("invalid topology: " + "; ".join(problems))

    @property
    def n_facilities(self) -> int:
        return len(self.facility_names)

    @property
    def facility_name(self) -> str:
        return self.facility_names[self.facility_index]

    @property
    def facility_offsets(self) -> tuple[int, ...]:
        """World rank of each facility's leader."""
        return tuple(sum(self.facility_sizes[:i]) for i in range(self.n_facilities))

    @property
    def root_index(self) -> int | None:
        """r if this rank is root r of its facility, else None."""
        return self.facility.rank if self.facility.rank < self.n_roots else None

    @property
    def is_leader(self) -> bool:
        """Rank 0 of its facility: speaks for the facility (its loss, tokens, checkpoint part)."""
        return self.facility.rank == 0

    @property
    def is_global_root(self) -> bool:
        """Root 0 of facility 0: prints progress, writes metrics."""
        return self.world.rank == 0

    def close(self) -> None:
        """Free every communicator this topology created."""
        for comm in (*self.inter.values(), self.roots, self.facility, self.world):
            if comm != MPI.COMM_NULL:
                comm.Free()


def facility_of_ranks(sizes: Sequence[int], appnums: Sequence[int]) -> list[int]:
    """Facility index of every rank of a single launch.

    An MPMD launch (`mpiexec -n 2 A : -n 2 B`) numbers its programs with MPI_APPNUM: program i is facility
    i. A plain launch assigns ranks to facilities in listing order by their sizes.
    """
    total = sum(sizes)
    if len(appnums) != total:
        raise ValueError(f"the job has {len(appnums)} ranks but the facilities list {total} "
                         f"({', '.join(map(str, sizes))}); launch exactly {total} ranks")
    if max(appnums) == 0:
        return [i for i, size in enumerate(sizes) for _ in range(size)]
    counts = [appnums.count(i) for i in range(len(sizes))]
    if max(appnums) >= len(sizes) or counts != list(sizes):
        raise ValueError(f"the MPMD launch has {max(appnums) + 1} programs with {counts} ranks, but the "
                         f"facilities list {list(sizes)} ranks; give one program per facility")
    return list(appnums)


def build(comm: MPI.Intracomm, facility_index: int, names: Sequence[str], n_roots: int = 1) -> Topology:
    """Single-launch constructor: split `comm` by facility. Collective over `comm`."""
    indices = control.allgather_int(comm, facility_index)
    sizes = tuple(indices.count(i) for i in range(len(names)))
    if 0 in sizes or len(set(indices) - set(range(len(names)))) > 0:
        raise ValueError(f"every facility needs at least one rank (ranks per facility: {sizes})")
    world = comm.Split(0, key=facility_index * comm.size + comm.rank)
    facility = world.Split(facility_index, key=world.rank)
    offsets = [sum(sizes[:i]) for i in range(len(names))]
    inter: dict[int, MPI.Intercomm] = {}
    # A star around the hub, the same shape that separate launches produce through Comm_connect.
    if facility_index == 0:
        for other in range(1, len(names)):
            inter[other] = facility.Create_intercomm(0, world, offsets[other], tag=other)
    else:
        inter[0] = facility.Create_intercomm(0, world, offsets[0], tag=facility_index)
    color = facility.rank if facility.rank < n_roots else MPI.UNDEFINED
    roots = world.Split(color, key=facility_index)
    return Topology(world=world, facility=facility, roots=roots, inter=inter, facility_index=facility_index,
                    facility_names=tuple(names), facility_sizes=sizes, n_roots=n_roots)


def local_ranks_on_node(comm: MPI.Intracomm) -> int:
    """How many ranks of `comm` share this node (to divide its cores among them)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.size
    finally:
        node.Free()


def start_process_group(facility: MPI.Intracomm, backend: str = "gloo", timeout_s: float = 600.0
                        ) -> tuple["torch.distributed.ProcessGroup", int]:
    """Initialise torch.distributed over exactly this facility's ranks.

    The leader starts the rendezvous store on a port the OS picks (no fixed port, no race) and broadcasts
    its address; ranks all on one node use loopback. MPIFED_STORE_HOST overrides the address on
    multi-homed nodes. Sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun would (DeepSpeed
    reads them). Returns the facility's process group (what engines are given) and the local rank (this
    rank's place among the facility's ranks on its node). Collective over `facility`.
    """
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    hosts = control.allgather_str(facility, MPI.Get_processor_name())
    host = os.environ.get("MPIFED_STORE_HOST") or ("127.0.0.1" if len(set(hosts)) == 1 else socket.gethostname())
    store = None
    if facility.rank == 0:
        store = dist.TCPStore(host, 0, facility.size, is_master=True, timeout=timeout, wait_for_workers=False)
    port = control.bcast_int(facility, store.port if store is not None else None, root=0)
    if store is None:
        store = dist.TCPStore(host, port, facility.size, is_master=False, timeout=timeout)
    node = facility.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node.rank, node.size
    node.Free()
    os.environ.update(RANK=str(facility.rank), WORLD_SIZE=str(facility.size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local_size))
    dist.init_process_group(backend, store=store, rank=facility.rank, world_size=facility.size, timeout=timeout)
    return dist.group.WORLD, local_rank


def stop_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
