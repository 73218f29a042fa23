"""Facilities coming back to a running federation (separate launches, `federation.min_facilities` >= 1).

A facility that left (its job's time ran out: mpifed/run/stop.py) starts again in its next job and
finds the hub as on a first join, through the rendezvous file or `--port`. What differs is that the
federation is training, and MPI_Comm_accept blocks: with MPICH, a thread waiting in it holds the library's
lock, so not even another thread of the process can make progress. So the hub never accepts while
it trains:

  1. The hub's leader starts a *doorman*: a child process of its own (an MPI singleton) that accepts on
     the port the rendezvous file names and runs the handshake of a first join with each caller (token,
     layout fingerprint, configuration digest, a facility that is not in). A refused caller is told
     why and disconnected; the federation does not notice. MPICH's accept polls a core without pause
     for as long as it waits, so the doorman runs at the lowest CPU priority (`lowest_priority`), as
     does a newcomer's accept thread: they take only what training leaves.
  2. A newcomer the doorman would admit says it comes back later (`later`), builds its engine and
     restores its own state, over its own job alone (the model it left at, kept in its checkpoint
     part, and its data position); then it calls again (the same handshake), opens a port of its
     own, tells the doorman, which answers with the round the federation is training, disconnects,
     and waits in an accept on that port *on a thread of its own* (`Waiting`). Meanwhile its main thread
     trains ahead from the model it kept, as long as that is the model the federation's round started
     from (mpifed/run/elastic.py), and touches no MPI: the accept holds the library. The doorman tells
     the hub's leader over a pipe (newline-separated JSON).
  3. The global root reports in every round's closing reduction that someone waits, so every rank
     learns it at the same round boundary. There the whole federation connects to the newcomer's port
     (`admit`; the newcomer is already in its accept, so this does not wait), the intercommunicator is
     merged into the new world, and the hub tells every rank, old and new, who is in and where the run
     stands (round, tokens trained). The newcomer stops training ahead at its next step, and the
     federation rebuilds its communicators over the new world (mpifed/run/rank.py).

A newcomer waits as long as the hub keeps rewriting the rendezvous file (with `--port`, at most
`federation.join_timeout_s`); then it wakes its own accept with a signed call, as `join.serve` does, and
stops. A newcomer that dies while it waits makes the federation's connect fail at the boundary
(MPICH's own connect timeout, 180 s), and the job stop. Messages are JSON over MPI byte buffers: nothing is
unpickled.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from mpi4py import MPI

from mpifed.comm import control
from mpifed.comm.join import (DROPPED, HANDSHAKE_S, HEARTBEAT_S, STALE_S, WAKE, Admitted, Beacon, Hello, JoinError, Unanswered,
                              drain, handshake_hub, receive, send, singleton_env, wake)


class Doorman:
    """On the hub's leader while the federation trains: the child process that admits facilities of the
    configuration that are not in (see the module's docstring). `members`: the facilities in now."""

    def __init__(self, hub: Hello, token: bytes, expected: dict[str, int], members: Sequence[str], rendezvous: str,
                 say: Callable[[str], None]) -> None:
        self.say = say
        self._members = list(members)
        self._round = 0
        self._waiting: queue.Queue[tuple[str, str]] = queue.Queue()
        self._child = subprocess.Popen([sys.executable, "-m", "mpifed.comm.rejoin"], env=singleton_env(token),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._tell({"hub": hub.__dict__, "expected": expected, "members": self._members})
        first = json.loads(self._child.stdout.readline() or "{}")
        if "port" not in first:
            raise JoinError("the hub's doorman for returning facilities did not start (see its error above)")
        self.port = first["port"]
        self._beacon = Beacon(Path(rendezvous), self.port) if rendezvous else None
        self._reader = threading.Thread(target=self._read, name="mpifed-doorman", daemon=True)
        self._reader.start()
        say(f"hub {hub.facility} admits returning facilities between rounds on MPI port {self.port}"
            + (f" (written to {rendezvous})" if rendezvous else ""))

    def _tell(self, message: dict) -> None:
        self._child.stdin.write(json.dumps(message) + "\n")
        self._child.stdin.flush()

    def _read(self) -> None:
        for line in self._child.stdout:
            try:
                message = json.loads(line)
            except ValueError:  # not ours (a library's warning): pass it on
                message = {"say": line.rstrip()}
            if "say" in message:
                self.say(message["say"])
            if "waiting" in message:
                self._waiting.put((message["waiting"], message["port"]))

    def waiting(self) -> int:
        """How many admitted newcomers wait for a round boundary."""
        return self._waiting.qsize()

    def take(self) -> tuple[str, str]:
        """The newcomer that waited longest: its name and the port it waits on."""
        name, port = self._waiting.get_nowait()
        self._members.append(name)
        self._tell({"members": self._members, "round": self._round})
        return name, port

    def forget(self, names: Sequence[str]) -> None:
        """Facilities that left: they may come back."""
        self._members = [name for name in self._members if name not in names]
        self._tell({"members": self._members})

    def at_round(self, round_: int) -> None:
        """The federation trains round `round_` now (what the doorman tells a newcomer, which trains
        ahead only in the round after the one it left at)."""
        if round_ != self._round:
            self._round = round_
            try:
                self._tell({"members": self._members, "round": round_})
            except OSError:  # the doorman is gone: nobody can come back, training goes on
                pass

    def close(self) -> None:
        """Stop admitting: end the doorman, and remove the rendezvous file, which tells whoever waits
        that the federation is over (see `Waiting`)."""
        if self._beacon is not None:
            self._beacon.stop()
        self._child.kill()
        self._child.wait()


def admit(world: MPI.Intracomm, doorman: Doorman | None, order: Sequence[str], members: Sequence[str],
          state: dict) -> tuple[MPI.Intracomm, dict]:
    """At a round boundary, on every rank of the federation (`doorman` on the hub's leader, None
    elsewhere): connect to the newcomer that waited longest and merge it into the world. Returns the new
    world (the caller frees the old one) and what every rank, newcomers included, now knows: `state`
    (the round, tokens trained) with "joined", the facilities in, in the configuration's `order`.
    Collective over `world`."""
    name, port = doorman.take() if doorman is not None else ("", "")
    inter = world.Connect(port, root=0)
    if world.rank == 0:
        send(inter, {"admit": True})
    merged = inter.Merge(high=False)
    inter.Free()
    joined = [n for n in order if n in members or n == name]
    told = control.bcast_str(merged, json.dumps({**state, "joined": joined}) if merged.rank == 0 else None)
    return merged, json.loads(told)


def later(comm: MPI.Intracomm, admitted: Admitted) -> None:
    """On a newcomer the doorman would admit (collective over its job): it builds first, and calls
    again with its port once it can wait in an accept (`Waiting`)."""
    if comm.rank == 0:
        send(admitted.inter, {"later": True})
    admitted.inter.Disconnect()


class Waiting:
    """A newcomer the doorman admitted, waiting for a round boundary (collective over its job): it opens a
    port, tells the doorman, and learns the `round` the federation trains now; `start` then waits in an
    accept on that port on a thread of its own, where the federation connects at its next round
    boundary. It waits as long as the hub keeps rewriting the `rendezvous` file (without one,
    `timeout_s`). Between `start` and `arrived` being true, this process must not call MPI: the accept
    holds the library."""

    def __init__(self, comm: MPI.Intracomm, admitted: Admitted, token: bytes, rendezvous: str,
                 timeout_s: float) -> None:
        self.comm, self.token, self.rendezvous, self.timeout_s = comm, token, rendezvous, timeout_s
        self.leader = comm.rank == 0
        port = MPI.Open_port() if self.leader else ""
        said = {}
        if self.leader:
            send(admitted.inter, {"port": port})
            try:
                said = receive(admitted.inter)
            except Unanswered:
                said = {}
        said = json.loads(control.bcast_str(comm, json.dumps({**said, "port": port})))
        self.port, self.round = said["port"], int(said.get("round", 0))
        """The round the federation was training when the doorman took this port (0: not known)."""
        admitted.inter.Disconnect()
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
        comm, inter = self.comm, self._outcome
        said = receive(inter) if self.leader else {}
        if self.leader:
            MPI.Close_port(self.port)
        if not json.loads(control.bcast_str(comm, json.dumps(said))).get("admit"):
            inter.Disconnect()
            raise JoinError("the federation ended before the next round boundary, or its hub stopped admitting (" +
                            (f"{self.rendezvous} was not rewritten for {STALE_S:g} s)" if self.rendezvous else
                             f"none within {self.timeout_s:g} s, federation.join_timeout_s)"))
        world = inter.Merge(high=True)
        inter.Free()
        return world, json.loads(control.bcast_str(world, None))

    def _accept(self) -> None:
        """The accept, on its own thread at the lowest priority: it polls a core for as long as it waits."""
        lowest_priority(threading.get_native_id())
        waiting = threading.Event()
        waiting.set()
        try:
            if self.leader:  # an accept cannot time out: wake it, as the hub wakes its own
                threading.Thread(target=_wake_when_gone, args=(self.port, self.token, self.rendezvous, self.timeout_s,
                                                               waiting), daemon=True).start()
            self._outcome = self.comm.Accept(self.port, root=0)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread by `merge`
            self._outcome = exc
        waiting.clear()
        self._done.set()


def lowest_priority(task: int = 0) -> None:
    """Give a thread (`task`, its native id) or, with 0, every thread of this process the lowest CPU
    priority (nice 19). MPICH's MPI_Comm_accept polls without pause, a whole core for as long as it
    waits (measured: 99%); at nice 19 the poll takes only what training leaves, and training on the
    same cores runs at the speed it would without it. Where the system refuses, nothing changes."""
    try:
        tasks = [task] if task else [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: the calling thread alone
        tasks = [0]
    for one in tasks:
        try:
            os.setpriority(os.PRIO_PROCESS, one, 19)
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


def _doorman_main() -> None:
    """`python -m mpifed.comm.rejoin`, started by `Doorman`: the first line on stdin is the hub's hello,
    the configuration's facilities and those in; later lines update those in. Accepts and handshakes
    callers on a port of its own, reporting on stdout."""
    lowest_priority()  # it waits in an accept all run long, beside the hub's training ranks
    setup = json.loads(sys.stdin.readline())
    hub, expected = Hello(**setup["hub"]), setup["expected"]
    members = {"in": set(setup["members"]), "round": 0}
    token = os.environ.get("MPIFED_TOKEN", "").encode()
    waiting: set[str] = set()

    def follow() -> None:  # no MPI in this thread: the main one waits in an accept
        for line in sys.stdin:
            update = json.loads(line)
            members["in"] = set(update["members"])
            members["round"] = update.get("round", members["round"])
            waiting.difference_update(members["in"])
        os._exit(0)  # the hub is gone

    threading.Thread(target=follow, daemon=True).start()
    port = MPI.Open_port()
    print(json.dumps({"port": port}), flush=True)
    while True:
        inter = MPI.COMM_SELF.Accept(port)
        name, problems = handshake_hub(inter, hub, token, expected, members["in"] | waiting, port, 0.0, running=True)
        try:
            told = receive(inter) if not problems and name != WAKE else {}
        except Unanswered:
            told = {}
        if not problems and name != WAKE and isinstance(told.get("port"), str):
            send(inter, {"round": members["round"]})
            waiting.add(name)
            print(json.dumps({"waiting": name, "port": told["port"],
                              "say": f"facility {name} is back; it joins at the next round boundary"}), flush=True)
        elif problems:
            print(json.dumps({"say": problems[0] if name == DROPPED else f"refused facility {name}: "
                              f"{'; '.join(problems)}"}), flush=True)
            drain(inter)
        inter.Disconnect()


if __name__ == "__main__":
    _doorman_main()
