"""Communicators: which rank belongs to which facility, who the roots are, and how facilities talk.

`Topology` is built once at start from a communicator and this rank's facility, validated, and passed
down; library code never reads the launch's world communicator (only mpifed/run/rank.py does). This
module also bootstraps each facility's torch.distributed process group from the facility communicator
(the leader binds its store to one address, on a port of the allowed range, and broadcasts both).
"""
from __future__ import annotations

import errno
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Mapping, Sequence

from mpi4py import MPI

from mpifed import logs
from mpifed.comm import control
from mpifed.comm.across import Across
from mpifed.comm.link import Mesh

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
    token: the federation's shared secret, where it has one: the roots' links to other facilities
        are sealed under keys derived from it (mpifed/comm/link.py); None: they are not.
    """

    world: MPI.Intracomm
    facility: MPI.Intracomm
    roots: MPI.Intracomm
    inter: Mapping[int, MPI.Intercomm]
    facility_index: int
    facility_names: tuple[str, ...]
    facility_sizes: tuple[int, ...]
    n_roots: int = 1
    token: bytes | None = field(default=None, repr=False)  # never printed
    across: "Across | None" = None
    """Control values over every rank of every facility, through the leaders' links (`build` makes it)."""

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
        if self.across is not None and self.across.mesh is not None:
            self.across.mesh.close()
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


def build(comm: MPI.Intracomm, facility_index: int, names: Sequence[str], n_roots: int = 1,
          token: bytes | None = None) -> Topology:
    """Split `comm` by facility (`token`: see Topology). Collective over `comm`."""
    indices = control.allgather_int(comm, facility_index)
    sizes = tuple(indices.count(i) for i in range(len(names)))
    if 0 in sizes or len(set(indices) - set(range(len(names)))) > 0:
        raise ValueError(f"every facility needs at least one rank (ranks per facility: {sizes})")
    world = comm.Split(0, key=facility_index * comm.size + comm.rank)
    facility = world.Split(facility_index, key=world.rank)
    logs.identify(rank=world.rank, facility=names[facility_index])  # a rebuilt world renumbers the ranks
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
    # The leaders (root 0 of every facility) carry the control values, on links of their own.
    leaders = Mesh.connect(roots.Dup(), names, "leaders", token, owned=True) if facility.rank == 0 else None
    return Topology(world=world, facility=facility, roots=roots, inter=inter, facility_index=facility_index,
                    facility_names=tuple(names), facility_sizes=sizes, n_roots=n_roots, token=token,
                    across=Across(facility, leaders, sizes))


def local_ranks_on_node(comm: MPI.Intracomm) -> int:
    """How many ranks of `comm` share this node (to divide its cores among them)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.size
    finally:
        node.Free()


STORE_HOST = "MPIFED_STORE_HOST"
"""An interface (ib0, hsn0) or an address of the facility leader's node for the facility's torch store;
set it where the node's name resolves to a network the other nodes should not use."""

STORE_PORTS = "MPIFED_STORE_PORTS"
"""The ports the facility's torch store may listen on, "LOW-HIGH" (both included, e.g. 29400-29499),
tried in order; unset, a port the OS picks. Set it where a site's firewall opens only a known range; the
store listens on one address (`store_address`) either way, never on every interface."""

GLOO_INTERFACE = "GLOO_SOCKET_IFNAME"
"""torch's own setting: the interface whose address gloo's pair listeners bind (else the node name's)."""


class NetworkError(ValueError):
    """A network setting this node cannot honour; the message names the setting and the node."""

    exit_code = 2  # bad input, found before anything is written


def _interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (Linux)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("256s", name[:15].encode())
        return socket.inet_ntoa(fcntl.ioctl(probe.fileno(), 0x8915, request)[20:24])  # SIOCGIFADDR


def store_address(single_node: bool, setting: str = STORE_HOST) -> str:
    """Where the facility's torch store listens, as the leader decides it: MPIFED_STORE_HOST (an
    interface of this node or one of its addresses or names); else loopback when the whole facility is
    on this node; else the address this node's name resolves to. Raises NetworkError when this node has
    no such interface or address. `setting`: another variable of the same meaning (the hub's door)."""
    wanted = os.environ.get(setting, "")
    here = socket.gethostname()
    try:
        if not wanted:
            return "127.0.0.1" if single_node else socket.gethostbyname(here)
        if wanted in {name for _, name in socket.if_nameindex()}:
            return _interface_address(wanted)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((wanted, 0))  # only an address of this node can be bound
        return wanted
    except OSError as exc:
        what = f"{setting}={wanted}" if wanted else f"this node's name {here}"
        raise NetworkError(f"{what}: no usable address on node {here} ({exc.strerror or exc}); set {setting} "
                           "to one of its interfaces (ip addr) or addresses") from None


def port_range(setting: str = STORE_PORTS) -> range | None:
    """The ports MPIFED_STORE_PORTS (or `setting`) allows, in the order they are tried; None when it is
    unset (any port). Raises NetworkError when it is not LOW-HIGH with 1 <= LOW <= HIGH <= 65535."""
    text = os.environ.get(setting, "").strip()
    if not text:
        return None
    found = re.fullmatch(r"(\d{1,5})\s*-\s*(\d{1,5})", text)
    if not found or not 1 <= int(found[1]) <= int(found[2]) <= 65535:
        raise NetworkError(f"{setting}={text}: not a port range on node {socket.gethostname()}; write "
                           "LOW-HIGH with 1 <= LOW <= HIGH <= 65535, e.g. 29400-29499")
    return range(int(found[1]), int(found[2]) + 1)


def listen_on(host: str, setting: str = STORE_PORTS) -> socket.socket:
    """A TCP socket listening on `host` alone, on the first free port of the range `setting` names
    (MPIFED_STORE_PORTS for the facility's store, MPIFED_GATEWAY_PORTS for the hub's door; any port when
    it is unset). Raises NetworkError when the setting is malformed or no port of it can be had here."""
    ports = port_range(setting)
    here = socket.gethostname()
    for port in ports or [0]:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Lets a port that an earlier run's connections still hold in TIME_WAIT be bound again (a
            # small range would otherwise run dry between runs); Linux never lets it share a listener's port.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(socket.SOMAXCONN)
            return listener
        except OSError as exc:
            listener.close()
            if exc.errno == errno.EADDRINUSE and ports is not None:
                continue  # taken: try the next port of the range
            what = f"{setting}={os.environ[setting].strip()}" if ports is not None else f"a listener on {host}"
            raise NetworkError(f"{what}: cannot listen on {host} port {port} on node {here} "
                               f"({exc.strerror or exc}); set {setting} to a range of ports open to you") from None
    raise NetworkError(f"{setting}={os.environ[setting].strip()}: every port of it is in use on {host} on "
                       f"node {here}; widen the range or free one of its ports (ss -ltn)")


def _interface_of(address: str) -> str:
    """The name of the interface of this node that holds IPv4 `address`, else ""."""
    for _, name in socket.if_nameindex():
        try:
            if _interface_address(name) == address:
                return name
        except OSError:  # no IPv4 address on it
            continue
    return ""


def gloo_interface(single_node: bool) -> str:
    """The interface gloo's listeners should bind on this rank's node, or "" to leave gloo as it is (it then
    binds the address the node's name resolves to, never every interface). Follows the store: the
    interface MPIFED_STORE_HOST names where this node has it, loopback when the facility is on one node."""
    wanted = os.environ.get(STORE_HOST, "")
    if wanted and wanted in {name for _, name in socket.if_nameindex()}:
        return wanted
    return _interface_of("127.0.0.1") if single_node else ""


def start_process_group(facility: MPI.Intracomm, backend: str = "gloo", timeout_s: float = 600.0
                        ) -> tuple["torch.distributed.ProcessGroup", int]:
    """Initialise torch.distributed over exactly this facility's ranks.

    The leader starts the rendezvous store listening on one address alone (`store_address`: loopback when
    every rank is on its node) and on a port of MPIFED_STORE_PORTS, or one the OS picks (no fixed port,
    no race: the socket it binds is the one the store listens on), and broadcasts the address with the
    port, so ranks on other nodes connect to the leader's node, not their own. Gloo's listeners follow
    (`gloo_interface`). Sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun would (DeepSpeed
    reads them). Returns the facility's process group (what engines are given) and the local rank (this
    rank's place among the facility's ranks on its node). Collective over `facility`.
    """
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    hosts = control.allgather_str(facility, MPI.Get_processor_name())
    single_node = len(set(hosts)) == 1
    store, told = None, ""
    if facility.rank == 0:
        try:
            listener = listen_on(store_address(single_node))
            host, port = listener.getsockname()[:2]  # numeric: every rank reaches the address bound
            try:
                store = dist.TCPStore(host, port, facility.size, is_master=True, timeout=timeout,
                                      wait_for_workers=False, master_listen_fd=listener.fileno())
            finally:
                # The store took the descriptor and closes it when it ends: this object must not close it
                # too (a second close could hit a descriptor reused since).
                listener.detach()
            told = f"{host} {port}"
        except NetworkError as exc:
            told = f"! {exc}"
    told = control.allgather_str(facility, told)[0]  # the leader's word, to every rank
    if told.startswith("!"):
        if facility.rank == 0:
            raise NetworkError(told[2:])
        facility.Barrier()  # never completes: the leader says why, once, and its abort ends the job
    host, port = told.rsplit(" ", 1)
    if store is None:
        store = dist.TCPStore(host, int(port), facility.size, is_master=False, timeout=timeout)
    node = facility.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node.rank, node.size
    node.Free()
    os.environ.update(RANK=str(facility.rank), WORLD_SIZE=str(facility.size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local_size))
    interface = gloo_interface(single_node)
    if interface:  # read by every gloo group made from here on (DeepSpeed's and FSDP's own too); the user's wins
        os.environ.setdefault(GLOO_INTERFACE, interface)
    dist.init_process_group(backend, store=store, rank=facility.rank, world_size=facility.size, timeout=timeout)
    return dist.group.WORLD, local_rank


def stop_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
