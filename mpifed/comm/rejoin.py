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
(MPICH's own connect timeout, 180 s), and the job stop.

Every connection proves the token first (mpifed/comm/handshake.py): a newcomer to the doorman, the
federation to a newcomer's port (the admit), a wake-up call. What the doorman and a newcomer say after
their handshake (later, the port, the round) is sealed under the keys it derived; a caller that cannot
prove is dropped and the port goes on accepting. Messages are JSON over MPI byte buffers: nothing is
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

from mpifed.comm import control, handshake
from mpifed.comm.handshake import HANDSHAKE_S, Unanswered, drain
from mpifed.comm.join import (DROPPED, HEARTBEAT_S, STALE_S, WAKE, Admitted, Beacon, Hello, JoinError, handshake_hub,
                              singleton_env, wake)


class Doorman:
    """On the hub's leader while the federation trains: the child process that admits facilities of the
    configuration that are not in (see the module's docstring). `members`: the facilities in now."""

    def __init__(self, hub: Hello, token: bytes, expected: dict[str, int], members: Sequence[str], rendezvous: str,
                 say: Callable[[str], None]) -> None:
        self.say, self.token = say, token
        self._closing = False
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
        if not self._closing:  # it died: its port is dead, so stop advertising it
            code = self._child.wait()
            if self._beacon is not None:
                self._beacon.stop()
            self.say(f"the doorman that admits returning facilities ended (exit code {code}); a facility that "
                     "leaves cannot come back in this job")

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
        self._closing = True
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
    problems = []
    if world.rank == 0:
        try:
            problems = handshake.call(inter, {"admit": True, "facility": name}, doorman.token, "join").problems
        except Unanswered as exc:
            problems = [f"it {exc}"]
    problems = json.loads(control.bcast_str(world, json.dumps(problems) if world.rank == 0 else None))
    if problems:  # the doorman heard this port from a newcomer that proved the token: a fault, not a guest
        inter.Disconnect()
        raise JoinError(f"facility {name} could not be admitted at the round boundary: {'; '.join(problems)}")
    merged = inter.Merge(high=False)
    inter.Free()
    joined = [n for n in order if n in members or n == name]
    told = control.bcast_str(merged, json.dumps({**state, "joined": joined}) if merged.rank == 0 else None)
    return merged, json.loads(told)


def later(comm: MPI.Intracomm, admitted: Admitted) -> None:
    """On a newcomer the doorman would admit (collective over its job): it builds first, and calls
    again with its port once it can wait in an accept (`Waiting`)."""
    if comm.rank == 0:
        admitted.link.send({"later": True})
    admitted.inter.Disconnect()


class Waiting:
    """A newcomer the doorman admitted, waiting for a round boundary (collective over its job): it opens a
    port, tells the doorman, and learns the `round` the federation trains now; `start` then waits in an
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
            outcome = handshake.listen(inter, self.token, "join", decide)
        except Unanswered as exc:
            return f"dropped a connection to the port this facility waits on, that {exc}"
        if outcome.wake:
            return "wake"
        if outcome.problems:
            return f"dropped a connection to the port this facility waits on: {'; '.join(outcome.problems)}"
        return "admit"


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
    callers on a port of its own, reporting on stdout. Whatever a caller does ends with that caller:
    MPI errors are returned, not fatal, and the port goes on accepting."""
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
    MPI.COMM_SELF.Set_errhandler(MPI.ERRORS_RETURN)
    port = MPI.Open_port()
    print(json.dumps({"port": port}), flush=True)
    while True:
        try:
            inter = MPI.COMM_SELF.Accept(port)
        except MPI.Exception as exc:
            print(json.dumps({"say": f"the doorman's accept failed ({exc.Get_error_string()}); it accepts again"}),
                  flush=True)
            continue
        inter.Set_errhandler(MPI.ERRORS_RETURN)
        try:
            said = _door(inter, hub, token, expected, members, waiting)
        except (MPI.Exception, OSError, ValueError) as exc:
            said = {"say": f"dropped a connection to the doorman: {type(exc).__name__}"}
        print(json.dumps(said), flush=True)
        try:
            inter.Disconnect()
        except MPI.Exception:
            pass


def _door(inter: MPI.Intercomm, hub: Hello, token: bytes, expected: dict[str, int], members: dict,
          waiting: set[str]) -> dict:
    """One caller at the doorman: what to report to the hub (a line to say, and a newcomer waiting)."""
    name, problems, link = handshake_hub(inter, hub, token, expected, members["in"] | waiting, 0.0, running=True)
    if name == WAKE:
        return {}
    if problems:
        drain(inter)
        return {"say": problems[0] if name == DROPPED else f"refused facility {name}: {'; '.join(problems)}"}
    try:
        told = link.receive()
    except Unanswered as exc:
        return {"say": f"dropped facility {name} after its handshake: it {exc}"}
    if isinstance(told.get("port"), str):
        link.send({"round": members["round"]})
        waiting.add(name)
        return {"waiting": name, "port": told["port"],
                "say": f"facility {name} is back; it joins at the next round boundary"}
    return {}  # it comes back later, once it has built (`later`)


if __name__ == "__main__":
    _doorman_main()
