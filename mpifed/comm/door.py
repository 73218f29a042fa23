"""The hub's front door: a TCP listener of mpifed's own, on the hub's leader, where every facility
knocks before anything of MPI is shown to it.

MPI's own accept is no place to meet strangers: MPICH's `MPI_Comm_accept` crashed (signal 7 or 11) when
eight connections reached it within a second, before any of our code could look at them, and a port
name once published lets anyone in. So the rendezvous file and the hub's terminal name the door
("HOST:PORT"), never an MPI port. Each caller is handled on a thread of its own (at most GUESTS at once;
beyond that a connection is closed unanswered), with no MPI, through the handshake of
mpifed/comm/handshake.py: the caller proves first, the door checks what it says (`differences`) and
proves back. Then, over the sealed stream:

- during the join (`running` false) an admitted facility waits in `arrivals` until the hub's accept
  loop (mpifed/comm/join.py) sends it the MPI port and a one-time ticket; it connects, and proves
  again over MPI with the ticket, so the connection the hub accepts is the one the door admitted (a
  relay that passed the sealed bytes on learns neither);
- while the federation trains, a facility coming back says `later` (it builds first) or sends the MPI
  port it waits on; the door answers with the round the federation trains, and the federation
  connects there at its next round boundary (mpifed/comm/rejoin.py).

The door listens on MPIFED_GATEWAY_HOST (an interface or address of the hub's leader node; else the
address its name resolves to), on the first free port of MPIFED_GATEWAY_PORTS (LOW-HIGH; else one the
OS picks). Nothing here is unpickled; a caller's words reach no parser but the bounded one.
"""
from __future__ import annotations

import json
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mpifed.comm import handshake
from mpifed.comm.handshake import Sealed, shown
from mpifed.comm.topology import listen_on, store_address
from mpifed.comm.wire import StreamWire, Unanswered

GATEWAY_HOST = "MPIFED_GATEWAY_HOST"
"""An interface or address of the hub's leader node for its door (where other sites can reach it)."""
GATEWAY_PORTS = "MPIFED_GATEWAY_PORTS"
"""The ports the hub's door may listen on, "LOW-HIGH", tried in order; unset, a port the OS picks."""
GUESTS = 16
"""Callers handled at once; a connection beyond them waits in the kernel's backlog for a free one. Each
has HANDSHAKE_S for its whole handshake, however it spaces its messages, so a flood of slow strangers
delays a facility (which knocks again) but never holds the door."""


@dataclass(frozen=True)
class Hello:
    """What a facility says about itself when it joins."""

    facility: str
    ranks: int
    fingerprint: str
    config: str
    """The digest of what the sites must agree on (configfile.digest)."""
    settings: dict[str, str] = field(default_factory=dict)
    """Those settings one by one (configfile.settings), so that a mismatch can name each key."""
    mpi: str = ""
    """The MPI library the launch runs, name and version (`join.mpi_library`): two implementations, or
    two versions of one, cannot share the connection the join makes next."""


def differences(hub: Hello, new: dict, expected: dict[str, int], joined: set[str]) -> list[str]:
    """What in a newcomer's hello keeps it out (empty: nothing)."""
    name = new.get("facility") if isinstance(new.get("facility"), str) else "?"
    out = []
    if name not in expected:
        out.append(f"facility {shown(name)} is not in the configuration (facilities: {', '.join(expected)})")
    elif name in joined:
        out.append(f"facility {name!r} has already joined")
    elif new.get("ranks") != expected[name]:
        out.append(f"facility {name} launched {shown(new.get('ranks'))} ranks, the configuration gives it "
                   f"{expected[name]}")
    if new.get("fingerprint") != hub.fingerprint:
        out.append(f"the flat-layout fingerprint differs (hub {hub.fingerprint[:12]}, {shown(name)} "
                   f"{str(new.get('fingerprint'))[:12]}): the model or LoRA settings are not the same")
    if new.get("mpi", "") != hub.mpi:
        out.append(f"the MPI libraries differ (hub {shown(hub.mpi)}, {shown(name)} {shown(new.get('mpi', '(unset)'))}): "
                   "every site must run the same MPI implementation and version (the site profile's [mpi] "
                   "libmpi, or the mpich wheel on both)")
    if new.get("config") != hub.config:
        keys = _differing_keys(hub.settings, new.get("settings"), shown(name)[1:-1])
        said = f"in {keys}" if keys else (f"(digest hub {hub.config[:12]}, {shown(name)} "
                                          f"{str(new.get('config'))[:12]})")
        out.append(f"the configuration differs {said}: use the same config file on every site")
    return out


SHOWN_KEYS = 8
"""Differing keys a refusal names one by one (it counts the others)."""
SETTINGS_BYTES = 8 << 10
"""The most a hello's settings may take (as JSON): the whole hello, and the hub's answer that repeats
its own, must stay within the handshake's 16 KiB. Larger (many facilities): the digests alone."""


def bounded(settings: dict[str, str]) -> dict[str, str]:
    """`settings` for a hello, or {} where they would not fit one (a mismatch then shows digests)."""
    return settings if len(json.dumps(settings)) <= SETTINGS_BYTES else {}


def _differing_keys(ours: dict[str, str], theirs: object, name: str) -> str:
    """The keys whose values differ, each with both values ("train.lr: hub 0.001, b 0.002"); "" when the
    newcomer sent no usable settings (an older version, or nonsense: what a stranger sends is bounded by
    the handshake's size and shown escaped and cut short)."""
    if not isinstance(theirs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in theirs.items()):
        return ""
    keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if not keys:
        return ""
    listed = [f"{shown(k)[1:-1]}: hub {shown(ours.get(k, '(unset)'))}, {name} {shown(theirs.get(k, '(unset)'))}"
              for k in keys[:SHOWN_KEYS]]
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return "; ".join(listed) + more


@dataclass
class Arrival:
    """A facility admitted at the door during the join, waiting to be told the MPI port."""

    name: str
    link: Sealed
    ticket: str
    """What it must show again over MPI (mpifed/comm/join.py)."""

    def close(self) -> None:
        self.link.close()


class Door:
    """The hub leader's TCP listener (see the module's docstring): `address` is what the rendezvous file
    names. `ends`: when (monotonic) the join's window closes, as callers are told."""

    def __init__(self, hub: Hello, token: bytes, expected: dict[str, int], ends: float,
                 say: Callable[[str], None]) -> None:
        self.hub, self.token, self.expected, self.ends, self.say = hub, token, expected, ends, say
        host = store_address(single_node=False, setting=GATEWAY_HOST)
        self._listener = listen_on(host, GATEWAY_PORTS)
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self.running = False
        self.round = 0
        self._refused: dict[str, str] = {}  # why each facility of the configuration that knocked was refused
        self.beacon = None
        """The rendezvous file's writer (mpifed/comm/join.py), stopped with the door."""
        self._lock = threading.Lock()
        self._members = {hub.facility}
        self._claimed: set[str] = set()  # admitted at the door, not in yet
        self._arrivals: queue.Queue[Arrival] = queue.Queue()
        self._waiting: queue.Queue[tuple[str, str]] = queue.Queue()
        self._guests = threading.BoundedSemaphore(GUESTS)
        self._closed = False
        threading.Thread(target=self._serve, name="mpifed-door", daemon=True).start()

    # ----------------------------------------------------------------------------------- the listener
    def _serve(self) -> None:
        told = False
        while not self._closed:
            self._guests.acquire()  # all taken: the next caller waits in the backlog
            try:
                conn, _ = self._listener.accept()
                threading.Thread(target=self._guest, args=(conn,), name="mpifed-door-guest", daemon=True).start()
                continue
            except (OSError, RuntimeError) as exc:  # shut, out of descriptors, out of threads
                self._guests.release()
                if self._closed:
                    return
                if not told:
                    self.say(f"the hub's door could not take a caller ({exc}); it goes on trying")
                    told = True
            time.sleep(0.5)

    def _guest(self, conn: socket.socket) -> None:
        wire, kept = StreamWire(conn, within_s=handshake.HANDSHAKE_S), False
        try:
            kept = self._receive(wire)
        except Unanswered as exc:
            self.say(f"dropped a connection that {exc}")
        except Exception as exc:  # noqa: BLE001 - a caller must never take the door down
            self.say(f"dropped a connection to the door ({type(exc).__name__})")
        finally:
            self._guests.release()
            if not kept:
                wire.close()

    def _decide(self, hello: dict) -> dict:
        """The verdict on a caller's hello; an admitted name is claimed at once, so that two callers
        cannot both be admitted as one facility."""
        with self._lock:
            problems = differences(self.hub, hello, self.expected, self._members | self._claimed)
            if not problems:
                self._claimed.add(hello["facility"])
            running = self.running
        return {**self.hub.__dict__, "remaining_s": max(0.0, self.ends - time.monotonic()), "running": running,
                "problems": problems}

    def _receive(self, wire: StreamWire) -> bool:
        """One caller: True when its stream is kept (an arrival the accept loop will answer). A name
        claimed for a caller that then fails, or comes back later, is released."""
        claimed: list[str] = []
        told: dict = {}

        def decide(hello: dict) -> dict:
            told.update(self._decide(hello))
            if not told["problems"]:
                claimed.append(hello["facility"])
            return told

        admitted = False
        try:
            outcome = handshake.listen(wire, self.token, "join", decide)
            name = outcome.hello.get("facility")
            if outcome.problems:
                if name in self.expected:
                    with self._lock:
                        self._refused[name] = "; ".join(outcome.problems)
                who = name if name in self.expected else shown(name) if isinstance(name, str) else "without a name"
                self.say(f"refused facility {who}: {'; '.join(outcome.problems)}")
                return False
            if outcome.link is None:  # a wake-up call has no business here
                return False
            if not told["running"]:  # as the caller was told; the join may have ended since
                with self._lock:
                    admitted = not self.running
                    if admitted:
                        self._arrivals.put(Arrival(name, outcome.link, secrets.token_hex(16)))
                return admitted
            said = outcome.link.receive()
            if isinstance(said.get("port"), str) and said["port"]:
                outcome.link.send({"round": self.round})
                self._waiting.put((name, said["port"]))
                self.say(f"facility {name} is back; it joins at the next round boundary")
                admitted = True
            return False  # a facility coming back later, once it has built (rejoin.later), is released
        finally:
            if not admitted:
                for name in claimed:
                    self.release(name)

    # -------------------------------------------------------------------------- during the join
    def next_arrival(self, until: float) -> Arrival | None:
        """The next facility admitted at the door, waiting for the MPI port; None once `until`
        (monotonic) has passed."""
        try:
            return self._arrivals.get(timeout=max(0.0, until - time.monotonic()))
        except queue.Empty:
            return None

    def release(self, name: str) -> None:
        """A claimed facility that did not come in after all: it may knock again."""
        with self._lock:
            self._claimed.discard(name)

    def entered(self, name: str) -> None:
        with self._lock:
            self._claimed.discard(name)
            self._members.add(name)

    def refusals(self) -> dict[str, str]:
        """Why each facility of the configuration that knocked was refused, last time (a copy)."""
        with self._lock:
            return dict(self._refused)

    def train(self, members: Sequence[str]) -> None:
        """The join is over and the federation trains with `members`: callers from now on are facilities
        coming back (see the module's docstring)."""
        with self._lock:
            self._members = set(members)
            self.running = True
            while not self._arrivals.empty():  # admitted too late for the join: told no port, free to knock
                late = self._arrivals.get_nowait()
                self._claimed.discard(late.name)
                late.close()

    # ---------------------------------------------------------- while training: facilities coming back
    def waiting(self) -> int:
        """How many admitted facilities wait for a round boundary."""
        return self._waiting.qsize()

    def take(self) -> tuple[str, str]:
        """The facility that waited longest: its name and the MPI port it waits on."""
        name, port = self._waiting.get_nowait()
        self.entered(name)
        return name, port

    def forget(self, names: Sequence[str]) -> None:
        """Facilities that left: they may come back."""
        with self._lock:
            self._members.difference_update(names)

    def at_round(self, round_: int) -> None:
        """The federation trains round `round_` now (what a facility coming back is told: it trains ahead
        only in the round after the one it left at)."""
        self.round = round_

    def close(self) -> None:
        """Stop admitting: nothing listens any more, and the rendezvous file, which told whoever waits
        that the federation is there, is removed."""
        self._closed = True
        if self.beacon is not None:
            self.beacon.stop()
        try:  # shutdown wakes the thread blocked in accept(), which close alone does not
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
