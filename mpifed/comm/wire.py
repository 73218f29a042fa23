"""How two gateways' leaders pass whole messages (bytes) to each other: over an MPI intercommunicator
(leader to leader), or over a TCP stream (the hub's front door, mpifed/comm/door.py; later a stream
through `ssh -L`). The handshake and the sealed messages after it (mpifed/comm/handshake.py) are written
against `Wire` alone and do not know which.

Every read has a deadline and a size bound checked before anything is allocated; a peer that breaks
either, or hangs up, raises `Unanswered` (a message saying what it did), never anything else.

On a stream each message is a 4-byte big-endian length, then that many bytes.
"""
from __future__ import annotations

import socket
import struct
import time
from typing import Protocol

import numpy as np
from mpi4py import MPI

TAG = 7101
"""The MPI tag of a wire's messages."""


class Unanswered(Exception):
    """The other side broke the exchange: silent, too large, gone, not JSON, not a proof, or a sealed
    message that does not open. The message says which, as "<it> ..." (e.g. "said nothing within 10 s")."""


class Tampered(Unanswered):
    """A sealed message that does not open: someone on the path changed, forged or replayed it. Never
    tried again on the same path."""


class Wire(Protocol):
    """Whole messages between two leaders."""

    def send_bytes(self, data: bytes | bytearray) -> None:
        """Send one message."""

    def receive_bytes(self, limit: int, timeout_s: float) -> bytes:
        """The next message, at most `limit` bytes, within `timeout_s`; raises Unanswered otherwise."""


class MPIWire:
    """Messages between the leaders (rank 0 of each side) of an MPI intercommunicator, or between this
    rank and rank `peer` of a communicator."""

    def __init__(self, inter: MPI.Intercomm | MPI.Intracomm, peer: int = 0) -> None:
        self.inter, self.peer = inter, peer

    def send_bytes(self, data: bytes | bytearray) -> None:
        self.inter.Send([np.frombuffer(data, np.uint8), MPI.BYTE], dest=self.peer, tag=TAG)

    def receive_bytes(self, limit: int, timeout_s: float) -> bytes:
        status, ends = MPI.Status(), time.monotonic() + timeout_s
        while not self.inter.Iprobe(source=self.peer, tag=TAG, status=status):
            if time.monotonic() > ends:
                raise Unanswered(f"said nothing within {timeout_s:g} s")
            time.sleep(0.005)
        size = status.Get_count(MPI.BYTE)
        if size > limit:
            drain(self.inter, self.peer)
            raise Unanswered(f"sent a {size}-byte message, more than a handshake may hold ({limit})")
        data = np.empty(size, np.uint8)
        self.inter.Recv([data, MPI.BYTE], source=self.peer, tag=TAG)
        return data.tobytes()


def drain(inter: MPI.Intercomm | MPI.Intracomm, source: int = MPI.ANY_SOURCE) -> None:
    """Consume, unread, whatever a peer about to be dropped has sent (`source`, else anyone): left
    unmatched, a message could be matched later by another connection that happens to reuse the same
    MPI context."""
    inter.Set_errhandler(MPI.ERRORS_RETURN)
    status = MPI.Status()
    while inter.Iprobe(source=source, tag=MPI.ANY_TAG, status=status):
        try:  # into no buffer at all: MPI reports the truncation and the message is gone
            inter.Recv([np.empty(0, np.uint8), MPI.BYTE], source=status.Get_source(), tag=status.Get_tag())
        except MPI.Exception:
            pass


class StreamWire:
    """Length-prefixed messages on a connected TCP socket (which this object then owns)."""

    def __init__(self, sock: socket.socket, within_s: float | None = None) -> None:
        self.sock = sock
        self.within_s = within_s
        self.ends = time.monotonic() + within_s if within_s is not None else None
        """Where set, no read waits past this (monotonic): a caller that dribbles its messages, each just
        inside its own deadline, cannot hold the other side longer than `within_s` in all."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small handshake messages, sent at once

    @classmethod
    def connect(cls, address: str, timeout_s: float) -> "StreamWire":
        """A wire to `address` ("HOST:PORT"). Raises OSError when nothing answers there in time."""
        host, port = split_address(address)
        return cls(socket.create_connection((host, port), timeout=timeout_s))

    def send_bytes(self, data: bytes | bytearray) -> None:
        try:
            self.sock.sendall(struct.pack(">I", len(data)) + bytes(data))
        except OSError as exc:
            raise Unanswered(f"hung up ({exc.strerror or exc})") from None

    def receive_bytes(self, limit: int, timeout_s: float) -> bytes:
        ends = time.monotonic() + timeout_s
        if self.ends is not None and self.ends < ends:  # the whole exchange's time runs out first
            ends, timeout_s = self.ends, self.within_s
        size = struct.unpack(">I", self._exactly(4, ends, timeout_s))[0]
        if size > limit:
            raise Unanswered(f"sent a {size}-byte message, more than a handshake may hold ({limit})")
        return self._exactly(size, ends, timeout_s)

    def _exactly(self, count: int, ends: float, timeout_s: float) -> bytes:
        chunks, have = [], 0
        while have < count:
            left = ends - time.monotonic()
            if left <= 0:
                raise Unanswered(f"said nothing within {timeout_s:g} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(min(count - have, 1 << 20))
            except socket.timeout:
                raise Unanswered(f"said nothing within {timeout_s:g} s") from None
            except OSError as exc:
                raise Unanswered(f"hung up ({exc.strerror or exc})") from None
            if not chunk:
                raise Unanswered("hung up")
            chunks.append(chunk)
            have += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def split_address(address: str) -> tuple[str, int]:
    """("HOST", PORT) of "HOST:PORT"; raises ValueError naming what is wrong."""
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
