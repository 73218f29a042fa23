"""Facilities coming back to a running federation (separate launches, `federation.min_facilities` >= 1).

A facility that left (its job's time ran out: mpifed/run/stop.py) starts again in its next job and
finds the hub as on a first join, through the rendezvous file or `--port`. What differs is that the
federation is training, and MPI_Comm_accept blocks: with MPICH, a thread waiting in it holds the library's
lock, so not even another thread of the process can make progress. So the hub never accepts while
it trains:

  1. The hub's door (mpifed/comm/door.py, a TCP listener on the hub's leader, served by threads that
     touch no MPI) stays open while the federation trains, and the rendezvous file goes on naming it.
     A caller runs the handshake of a first join there (token, layout fingerprint, configuration
     digest, a facility that is not in). A refused caller is told why; the federation does not notice.
  2. A newcomer the door would admit says it comes back later (`later`), builds its engine and
     restores its own state, over its own job alone (the model it left at, kept in its checkpoint
     part, and its data position); then it knocks again (the same handshake), opens an MPI port of its
     own, sends it (sealed) to the door, which answers with the round the federation is training, and
     waits in an accept on that port *on a thread of its own* (`Waiting`). Meanwhile its main thread
     trains ahead from the model it kept, as long as that is the model the federation's round started
     from (mpifed/run/elastic.py), and touches no MPI: the accept holds the library. MPICH's accept polls
     a core without pause for as long as it waits, so that thread runs at the lowest CPU priority
     (`lowest_priority`): it takes only what training leaves.
  3. The global root reports in every round's closing reduction that someone waits, so every rank
     learns it at the same round boundary. There the whole federation connects to the newcomer's port
     (`admit`; the newcomer is already in its accept, so this does not wait), the intercommunicator is
     merged into the new world, and the hub tells every rank, old and new, who is in and where the run
     stands (round, tokens trained). The newcomer stops training ahead at its next step, and the
     federation rebuilds its communicators over the new world (mpifed/run/rank.py).

A newcomer waits as long as the hub keeps rewriting the rendezvous file (with `--port`, at most
`federation.join_timeout_s`); then it wakes its own accept with a proved call, and stops. A newcomer that
dies while it waits makes the federation's connect fail at the boundary (MPICH's own connect timeout,
180 s), and the job stop.

Every connection proves the token first (mpifed/comm/handshake.py): a newcomer at the door, the
federation at a newcomer's port (the admit), a wake-up call. What the door and a newcomer say after
their handshake (later, the port, the round) is sealed under the keys it derived; a caller at the
newcomer's port that cannot prove is dropped and the port goes on accepting. Messages are JSON:
nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from mpi4py import MPI

from mpifed.comm import control, handshake
from mpifed.comm.door import Door
from mpifed.comm.handshake import HANDSHAKE_S
from mpifed.comm.join import HEARTBEAT_S, STALE_S, Admitted, JoinError, wake
from mpifed.comm.wire import MPIWire, Unanswered, drain


def admit(world: MPI.Intracomm, door: Door | None, order: Sequence[str], members: Sequence[str],
          state: dict) -> tuple[MPI.Intracomm, dict]:
    """At a round boundary, on every rank of the federation (`door` on the hub's leader, None
    elsewhere): connect to the newcomer that waited longest and merge it into the world. Returns the new
    world (the caller frees the old one) and what every rank, newcomers included, now knows: `state`
    (the round, tokens trained) with "joined", the facilities in, in the configuration's `order`.
    Collective over `world`."""
    name, port = door.take() if door is not None else ("", "")
    inter = world.Connect(port, root=0)
    problems = []
    if world.rank == 0:
        try:
            problems = handshake.call(MPIWire(inter), {"admit": True, "facility": name}, door.token, "join").problems
        except Unanswered as exc:
            problems = [f"it {exc}"]
    problems = json.loads(control.bcast_str(world, json.dumps(problems) if world.rank == 0 else None))
    if problems:  # the door heard this port from a newcomer that proved the token: a fault, not a guest
        inter.Disconnect()
        raise JoinError(f"facility {name} could not be admitted at the round boundary: {'; '.join(problems)}")
    merged = inter.Merge(high=False)
    inter.Free()
    joined = [n for n in order if n in members or n == name]
    told = control.bcast_str(merged, json.dumps({**state, "joined": joined}) if merged.rank == 0 else None)
    return merged, json.loads(told)


def later(comm: MPI.Intracomm, admitted: Admitted) -> None:
    """On a newcomer the door would admit (collective over its job): it builds first, and knocks
    again with its port once it can wait in an accept (`Waiting`)."""
    if comm.rank == 0:
        try:
            admitted.link.send({"later": True})
        except Unanswered:  # the door hears the hang-up alike
            pass
    admitted.close()


class Waiting:
    """A newcomer the door admitted, waiting for a round boundary (collective over its job): it opens a
    port, tells the door, and learns the `round` the federation trains now; `start` then waits in an
    accept on that port on a thread of its own, where the federation connects at its next round
    boundary and proves the token (a caller that does not is dropped, and the accept goes on). It
    waits as long as the hub keeps rewriting the `rendezvous` file (without one, `timeout_s`). Between
    `start` and `arrived` being true, this process must not call MPI: the accept holds the library."""

    def __init__(self, comm: MPI.Intracomm, admitted: Admitted, token: bytes, rendezvous: str,
                 timeout_s: float, say: Callable[[str], None] = lambda line: None) -> None:
        self.comm, self.token, self.rendezvous, self.timeout_s, self.say = comm, token, rendezvous, timeout_s, say
        self.leader = comm.rank == 0
        port = MPI.Open_port() if self.leader else ""
        said = {}
        if self.leader:
            try:
                admitted.link.send({"port": port})
                said = admitted.link.receive()
            except Unanswered:
                said = {}
        said = json.loads(control.bcast_str(comm, json.dumps({**said, "port": port})))
        self.port = said["port"]
        self.round = said.get("round") if isinstance(said.get("round"), int) else 0
        """The round the federation was training when the door took this port (0: not known)."""
        admitted.close()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._outcome: MPI.Intercomm | BaseException | None = None

    def start(self) -> None:
        """Wait in the accept on a thread of this process (see the class docstring)."""
        self._thread = threading.Thread(target=self._accept, name="mpifed-rejoin", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Wake the accept (no MPI: a helper process calls), so that this process can use MPI again, to
        end. `merge` then raises JoinError."""
        if self._thread is not None and not self._done.is_set():
            # The caller waits for its call to be disconnected: it runs beside, and this side hangs up.
            threading.Thread(target=wake, args=(self.port, self.token), daemon=True).start()
            self._done.wait(HANDSHAKE_S)
            if isinstance(self._outcome, MPI.Intercomm):
                self._outcome.Disconnect()

    def arrived(self) -> bool:
        """Whether the federation connected (or the wait ended): `merge` will not block."""
        return self._done.is_set()

    def merge(self) -> tuple[MPI.Intracomm, dict]:
        """The merged world and what `admit` told every rank, once the federation connected (waits for
        it). Raises JoinError when the hub was gone first. All but the accept runs here, on the calling
        thread, at its own priority."""
        if self._thread is None:
            self.start()
        self._thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        if self.leader:
            MPI.Close_port(self.port)
        world = self._outcome.Merge(high=True)
        self._outcome.Free()
        return world, json.loads(control.bcast_str(world, None))

    def _accept(self) -> None:
        """The accept, on its own thread at the lowest priority: it polls a core for as long as it waits.
        Until the federation proves itself: a wake-up call ends the wait, anyone else is dropped."""
        lowest_priority(threading.get_native_id())
        waiting = threading.Event()
        waiting.set()
        try:
            if self.leader:  # an accept cannot time out: wake it, as the hub wakes its own
                threading.Thread(target=_wake_when_gone, args=(self.port, self.token, self.rendezvous, self.timeout_s,
                                                               waiting), daemon=True).start()
            while True:
                inter = self.comm.Accept(self.port, root=0)
                verdict = control.bcast_str(self.comm, self._hear(inter) if self.leader else "")
                if verdict == "admit":
                    self._outcome = inter
                    break
                if self.leader:
                    drain(inter)
                inter.Disconnect()
                if verdict == "wake":
                    self._outcome = JoinError(
                        "the federation ended before the next round boundary, or its hub stopped admitting (" +
                        (f"{self.rendezvous} was not rewritten for {STALE_S:g} s)" if self.rendezvous else
                         f"none within {self.timeout_s:g} s, federation.join_timeout_s)"))
                    break
                self.say(verdict)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread by `merge`
            self._outcome = exc
        waiting.clear()
        self._done.set()

    def _hear(self, inter: MPI.Intercomm) -> str:
        """On the leader: the handshake with whoever connected to the waiting port: "admit" for the
        federation, "wake" for our own wake-up call, else the line that says why it was dropped."""
        def decide(hello: dict) -> dict:
            return {"problems": [] if hello.get("admit") is True else ["this port admits the federation alone"]}

        try:
            outcome = handshake.listen(MPIWire(inter), self.token, "join", decide)
        except Unanswered as exc:
            return f"dropped a connection to the port this facility waits on, that {exc}"
        if outcome.wake:
            return "wake"
        if outcome.problems:
            return f"dropped a connection to the port this facility waits on: {'; '.join(outcome.problems)}"
        return "admit"


def lowest_priority(task: int) -> None:
    """Give the thread `task` (its native id) the lowest CPU priority (nice 19). MPICH's MPI_Comm_accept
    polls without pause, a whole core for as long as it waits (measured: 99%); at nice 19 the poll takes
    only what training leaves, and training on the same cores runs at the speed it would without it.
    Where the system refuses, nothing changes."""
    try:
        os.setpriority(os.PRIO_PROCESS, task, 19)
    except OSError:
        pass


def _wake_when_gone(port: str, token: bytes, rendezvous: str, timeout_s: float, waiting: threading.Event) -> None:
    """While `waiting`: wake the accept on `port` once the hub's rendezvous file has not been rewritten
    for STALE_S (the hub ended the run, or is gone), or, without one, after `timeout_s`. No MPI here:
    the accept holds the library."""
    seen, since, ends = None, time.monotonic(), time.monotonic() + timeout_s
    while waiting.is_set():
        now = time.monotonic()
        if rendezvous:
            try:
                text = Path(rendezvous).read_text()
            except OSError:
                text = ""
            if text != seen:
                seen, since = text, now
            if now - since > STALE_S:
                break
        elif now > ends:
            break
        time.sleep(HEARTBEAT_S / 4)
    if waiting.is_set():
        wake(port, token)
