"""Links between gateways: how bytes pass from one facility (site) to another in the exchange across
facilities, point to point and sealed, never by an MPI collective that spans sites.

A `Link` is one gateway's end of its link to one other facility's gateway: whole messages whose sizes
both ends know beforehand (the exchange computes them alike on every root). Where the federation holds a
token (facilities launched separately, or a single launch given one), both ends agreed keys by a proved
handshake (mpifed/comm/handshake.py) and every message travels as sealed frames (mpifed/comm/seal.py:
AES-256-GCM, one key and counter per direction); without one the bytes go as they are (one launch, one
site). A frame that does not open, or a message of another size than both ends agreed, raises `LinkError`
naming the link, and the link is not trusted again.

A `Mesh` is the links from one gateway to the same gateway (root r) of every other facility, in facility
order, with the few group operations the exchange needs, each made of point-to-point messages: every
member sends to and receives from every other (`exchange`, and `allgather`, `bcast` on top of it). A
`subset` of the members is taken locally, with no message at all (the exchange leaves out a facility the
guard refused). Today's transport is MPI point-to-point on a communicator of the gateways; a stream
through an SSH tunnel is the next kind and needs only `Link`'s two `post_` methods.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
from mpi4py import MPI

from mpifed.comm import handshake, seal, watchdog
from mpifed.comm.wire import MPIWire, Unanswered

TAG = 7301
"""The MPI tag of a link's messages (its handshake uses the wire's own)."""
FRAME_BYTES = 4 << 20
"""Payload bytes per sealed frame: large enough that the 24 bytes a frame adds do not count, small
enough that a frame stays far under seal.FRAME_LIMIT (benchmarks/seal.py: 1-4 MiB frames sealed into a
reused buffer run at the cipher's speed)."""


class LinkError(RuntimeError):
    """A link that broke: its handshake failed, or a message did not open or had the wrong size. One
    line naming the link (both facilities and the gateway)."""


def wait_all(requests: Sequence[MPI.Request], statuses: list[MPI.Status], poll_s: float = 0.0) -> None:
    """Wait for every request, their statuses into `statuses` (which a caller can read after an error):
    MPI's own wait (spinning), or with `poll_s` > 0 a test every `poll_s` seconds and a sleep in between
    (an exchange in the background leaves the cores to training)."""
    requests = list(requests)
    statuses[:] = [MPI.Status() for _ in requests]
    if poll_s <= 0:
        MPI.Request.Waitall(requests, statuses)
    else:
        while not MPI.Request.Testall(requests, statuses):
            time.sleep(poll_s)


def _bytes(buffer: np.ndarray | bytearray | memoryview) -> memoryview:
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _frames(nbytes: int) -> list[tuple[int, int]]:
    """[lo, hi) of the payload in each frame of a message of `nbytes` (one empty frame for none)."""
    return [(lo, min(nbytes, lo + FRAME_BYTES)) for lo in range(0, max(nbytes, 1), FRAME_BYTES)]


def _broken(name: str, what: str) -> LinkError:
    """The one line for a link that broke: the phase this rank is in, the link (both facilities and the
    gateway), and what came."""
    return LinkError(f"{watchdog.current_phase()}: link {name}: {what}; the link is not trusted again")


class Link:
    """This gateway's end of the link to gateway `peer` of `comm`, named `name` in every error."""

    def __init__(self, comm: MPI.Intracomm, peer: int, name: str, channel: seal.Channel | None) -> None:
        self.comm, self.peer, self.name, self.channel = comm, peer, name, channel
        self._buffers: dict[str, np.ndarray] = {}

    @property
    def sealed(self) -> bool:
        return self.channel is not None

    def wire_bytes(self, nbytes: int) -> int:
        """What a message of `nbytes` payload bytes takes on the wire."""
        return nbytes + (seal.OVERHEAD * len(_frames(nbytes)) if self.sealed else 0)

    def _buffer(self, which: str, size: int) -> memoryview:
        # Kept for the next message: fresh large buffers cost their page faults every time.
        if which not in self._buffers or len(self._buffers[which]) < size:
            self._buffers[which] = np.empty(size, np.uint8)
        return memoryview(self._buffers[which])[:size]

    def release(self) -> None:
        """Let go of the buffers kept for the next message (between blocking exchanges a root holds
        nothing of them while it trains)."""
        self._buffers.clear()

    def post_send(self, payload: np.ndarray | bytearray | memoryview) -> MPI.Request:
        """Start sending `payload` (left untouched; unsealed it must stay as it is until the request ends)."""
        data = _bytes(payload)
        if self.channel is None:
            return self.comm.Isend([data, MPI.BYTE], self.peer, TAG)
        out = self._buffer("send", self.wire_bytes(data.nbytes))
        at = 0
        for lo, hi in _frames(data.nbytes):
            at += self.channel.seal_into(data[lo:hi], out[at:])
        return self.comm.Isend([out, MPI.BYTE], self.peer, TAG)

    def post_recv(self, into: np.ndarray | bytearray | memoryview) -> tuple[MPI.Request, Callable[[MPI.Status], None]]:
        """Start receiving a message of exactly `into`'s size; once the request ends, call the function
        returned with its status: it opens the message into `into`, or raises LinkError."""
        data = _bytes(into)
        expected = self.wire_bytes(data.nbytes)
        # Sealed, one byte more than agreed: a longer message shows as too long, not as MPI's own error.
        room = data if self.channel is None else self._buffer("recv", expected + 1)
        request = self.comm.Irecv([room, MPI.BYTE], self.peer, TAG)

        def opened(status: MPI.Status) -> None:
            count = status.Get_count(MPI.BYTE)
            if count != expected:
                raise _broken(self.name, f"a message of {count} bytes where {expected} were agreed (cut short, "
                                         "padded or injected on the way)")
            if self.channel is None:
                return
            at = 0
            try:
                for lo, hi in _frames(data.nbytes):
                    at += self.channel.open_into(room[at:at + hi - lo + seal.OVERHEAD], data[lo:hi]) + seal.OVERHEAD
            except seal.SealError as exc:
                what = str(exc).removeprefix(f"{self.channel.name}: ")
                raise _broken(self.name, f"a frame does not open ({what})") from None

        return request, opened


class Mesh:
    """The links from this gateway to the same gateway of every other member (facility) of a group, in
    facility order: `links[m]` for member m, None at `rank`, this gateway's own place."""

    def __init__(self, links: Sequence[Link | None], rank: int, names: Sequence[str], comm: MPI.Intracomm | None = None
                 ) -> None:
        self.links, self.rank, self.names = list(links), rank, list(names)
        self.comm = comm
        """The communicator the links were made on, where this mesh owns it (`close` frees it)."""

    @property
    def size(self) -> int:
        return len(self.links)

    @property
    def sealed(self) -> bool:
        return any(link is not None and link.sealed for link in self.links)

    @classmethod
    def connect(cls, comm: MPI.Intracomm, names: Sequence[str], label: str, token: bytes | None,
                owned: bool = False, wait_s: float = handshake.HANDSHAKE_S) -> "Mesh":
        """The mesh of `comm` (one gateway per facility, `names[i]` at rank i), each link keyed by its
        own proved handshake where a `token` is given (the later facility calls the earlier; each waits
        up to `wait_s` for the other to get there, then HANDSHAKE_S a message). Every pair meets in the
        same order on both sides (by the lower index, then the higher), so no two wait on each other.
        Collective over `comm` in effect; raises LinkError naming the link that failed."""
        me, links = comm.rank, []
        for other in range(comm.size):
            if other == me:
                links.append(None)
                continue
            first, second = sorted((me, other))
            name = f"{names[first]}<->{names[second]} ({label})"
            channel = None if token is None else _agree(comm, other, me > other, name, names, token, wait_s)
            links.append(Link(comm, other, name, channel))
        return cls(links, me, names, comm if owned else None)

    def subset(self, members: Sequence[bool]) -> "Mesh":
        """The mesh of the members marked True (this gateway among them); no message is sent."""
        assert members[self.rank], "a gateway takes part in the subsets it builds"
        kept = [m for m, keep in enumerate(members) if keep]
        return Mesh([self.links[m] for m in kept], kept.index(self.rank), [self.names[m] for m in kept])

    def exchange(self, sends: dict[int, np.ndarray | memoryview], receives: dict[int, np.ndarray | memoryview],
                 poll_s: float = 0.0) -> None:
        """Send `sends[m]` to member m and receive `receives[m]` (its agreed size) from member m, all at
        once; back when every message is in and opened. Raises LinkError."""
        posted = [(m, *self.links[m].post_recv(into)) for m, into in receives.items()]
        requests = [request for _, request, _ in posted] + [self.links[m].post_send(data) for m, data in sends.items()]
        statuses: list[MPI.Status] = []
        try:
            wait_all(requests, statuses, poll_s)
        except MPI.Exception as exc:
            # A message longer than agreed is MPI's truncation: ERR_TRUNCATE, or with several requests
            # ERR_IN_STATUS and the truncation in that request's status. Anything else is a peer gone,
            # which the watchdog's roll call names.
            cut = [m for (m, _, _), status in zip(posted, statuses)
                   if MPI.Get_error_class(status.Get_error()) == MPI.ERR_TRUNCATE]
            if exc.Get_error_class() not in (MPI.ERR_TRUNCATE, MPI.ERR_IN_STATUS) or (
                    exc.Get_error_class() == MPI.ERR_IN_STATUS and not cut):
                raise
            name = self.links[cut[0]].name if cut else f"of {self.names[self.rank]}"
            raise _broken(name, "a message longer than agreed (padded or injected on the way)") from None
        for (_, _, opened), status in zip(posted, statuses):
            opened(status)

    def allgather(self, mine: np.ndarray, out: np.ndarray, poll_s: float = 0.0) -> None:
        """out[m] = member m's `mine` (every member's the same shape and type)."""
        out[self.rank] = mine
        others = [m for m in range(self.size) if m != self.rank]
        self.exchange({m: mine for m in others}, {m: out[m] for m in others}, poll_s)

    def bcast(self, values: np.ndarray, root: int, poll_s: float = 0.0) -> None:
        """Every member's `values` become member `root`'s."""
        if self.rank == root:
            self.exchange({m: values for m in range(self.size) if m != root}, {}, poll_s)
        else:
            self.exchange({}, {root: values}, poll_s)

    def release(self) -> None:
        """Every link lets go of its buffers (see Link.release)."""
        for link in self.links:
            if link is not None:
                link.release()

    def close(self) -> None:
        """Free the communicator this mesh owns (collective over it)."""
        if self.comm is not None:
            self.comm.Free()
            self.comm = None


def _agree(comm: MPI.Intracomm, other: int, calls: bool, name: str, names: Sequence[str], token: bytes,
           wait_s: float) -> seal.Channel:
    """The keys of the link to gateway `other` of `comm`, from a proved handshake over MPI (this side
    calls where `calls`); raises LinkError saying why it failed."""
    wire = MPIWire(comm, other)
    context = f"mpifed/link|{name}"
    me, them = names[comm.rank], names[other]
    try:
        if calls:
            outcome = handshake.call(wire, {"facility": me}, token, context, first_s=wait_s)
        else:
            outcome = handshake.listen(wire, token, context, lambda hello: {"problems": [] if hello.get("facility") == them
                                       else [f"the caller says it is {handshake.shown(hello.get('facility'))}, "
                                             f"not {them}"]}, first_s=wait_s)
    except Unanswered as exc:
        raise LinkError(f"link {name}: the other gateway {exc} during the link's handshake") from None
    if outcome.problems or outcome.link is None:
        raise LinkError(f"link {name}: {'; '.join(outcome.problems) or 'the handshake did not finish'}")
    return outcome.link.channel
