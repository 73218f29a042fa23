"""Joining separately launched facilities into one MPI world (`mpifed run CONFIG --facility NAME`).

The hub (the first facility listed) opens an MPI port and publishes its name, in the file
`federation.rendezvous` and on its terminal. Every other facility connects to it. Before any weight
moves, the two leaders run the handshake of mpifed/comm/handshake.py over the new intercommunicator:
the newcomer proves it holds the token first, says who it is (facility, ranks, layout fingerprint,
configuration digest), and the hub answers with its own proof and the verdict: empty, or every
difference found.

Both sides then know the verdict. On a difference, each prints what differs and the intercommunicator
is disconnected: the newcomer stops, and the hub goes on waiting for the others. An accepted newcomer is
merged into the hub's growing world, and takes part in accepting the rest. When the time is up
(`federation.join_timeout_s`), the hub goes on if `federation.min_facilities` have joined, else everyone
stops. MPI_Comm_accept cannot time out, so at the deadline the hub wakes its own accept: a short-lived
helper process connects and proves a wake-up call with the token.

Messages are JSON over MPI byte buffers: nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from mpi4py import MPI

from mpifed.comm import control, handshake, secret, watchdog
from mpifed.comm.handshake import HANDSHAKE_S, Sealed, Unanswered, drain, shown

HEARTBEAT_S = 1.0
"""While the hub admits facilities it rewrites the rendezvous file this often."""
CONNECT_TURN_S = 0.5
"""Facility i (in the configuration's order, the hub being 0) connects (i - 1) times this long after it
found the hub's port, so that connections do not reach the hub's accept at once."""
STALE_S = 3 * HEARTBEAT_S
"""A rendezvous file unchanged for this long was left by a hub that is gone."""
WAKE = "<wake>"  # not a valid facility name
DROPPED = "<dropped>"  # nor this: a connection that broke the handshake's rules
_ACCEPT, _STOP, _ABORT = 0, 1, 2


class JoinError(RuntimeError):
    """A facility that cannot join, or a federation that cannot start; the message says what differs."""


class LaunchError(JoinError):
    """A launch that cannot join as given: its facility name or rank count, its token, no way to find the
    hub, a rendezvous file only a hub that is gone wrote. Found before anything starts, the same on every
    rank of the launch (exit code 2)."""


@dataclass(frozen=True)
class Hello:
    """What a facility says about itself when it joins."""

    facility: str
    ranks: int
    fingerprint: str
    config: str


def read_token(token_file: str) -> bytes:
    """The shared secret (see secret.read_token); a missing, exposed or weak one is a LaunchError."""
    try:
        return secret.read_token(token_file)
    except secret.TokenError as exc:
        raise LaunchError(str(exc)) from None


def _differences(hub: Hello, new: dict, expected: dict[str, int], joined: set[str]) -> list[str]:
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
    if new.get("config") != hub.config:
        out.append(f"the configuration differs (digest hub {hub.config[:12]}, {shown(name)} {str(new.get('config'))[:12]}): "
                   "use the same config file on every site")
    return out


# -------------------------------------------------------------------------------------------- newcomer
def find_hub(comm: MPI.Intracomm, rendezvous: str, port: str, timeout_s: float, say: Callable[[str], None]) -> str:
    """The hub's port name, the same on every rank of this launch: given, or read by the leader from the
    rendezvous file once a live hub writes it. Raises LaunchError on every rank when there is no way
    to find the hub, or the file only ever held the port of a hub that is gone. Collective over `comm`."""
    found = ""
    if comm.rank == 0:
        try:
            found = _read_port(rendezvous, port, timeout_s, say)
        except LaunchError as exc:
            found = f"!{exc}"
    found = control.bcast_str(comm, found)
    if found.startswith("!"):
        raise LaunchError(found[1:])
    return found


def _read_port(rendezvous: str, port: str, timeout_s: float, say: Callable[[str], None]) -> str:
    """The port in the rendezvous file, once the file has been seen to change: a live hub rewrites it
    every HEARTBEAT_S (see `Beacon`), a file that stays the same was left by a hub that is gone."""
    if port:
        return port
    if not rendezvous:
        raise LaunchError("no way to find the hub: set federation.rendezvous to a file both sites see, or pass "
                              "--port with the name the hub printed")
    path, ends = Path(rendezvous), time.monotonic() + timeout_s
    seen, since, told = "", 0.0, ""
    while time.monotonic() < ends:
        try:
            text = path.read_text()
        except OSError:
            text = ""
        now = time.monotonic()
        if text.strip() and seen and text != seen:
            return text.split()[0]  # rewritten since we first read it: its hub is alive
        if text.strip() and text != seen:
            seen, since = text, now
        elif not text.strip():
            seen = ""
        state = "stale" if seen and now - since > STALE_S else "" if seen else "absent"
        if state and state != told:
            say(f"{path} holds the port of a hub that is gone (not rewritten for {STALE_S:g} s); waiting for the hub "
                "to write a new one" if state == "stale" else f"waiting for the hub to publish its port in {path}")
            told = state
        time.sleep(0.2)
    if seen:
        raise LaunchError(f"federation.rendezvous {path}: holds the port of a hub that is gone (the file was not "
                              f"rewritten within {timeout_s:g} s, federation.join_timeout_s); start the hub facility, "
                              "which writes a new one, or remove the file")
    raise LaunchError(f"federation.rendezvous {path}: the hub did not publish its port within {timeout_s:g} s "
                          "(federation.join_timeout_s); is the hub facility running?")


@dataclass(frozen=True)
class Admitted:
    """A newcomer the hub let in: the intercommunicator to the hub (or to the hub's doorman, when the
    federation is `running` already: see mpifed/comm/rejoin.py), and the seconds the hub will still
    admit others."""

    inter: MPI.Intercomm
    remaining_s: float
    running: bool
    link: Sealed | None = None
    """On the newcomer's leader: the sealed messages that may follow the handshake (a rejoin's)."""

    def merge(self) -> MPI.Intracomm:
        """The world of the hub's ranks and this job's (a first join), in which this job takes part in
        admitting the remaining facilities (see `_admit`)."""
        world = self.inter.Merge(high=True)
        self.inter.Free()
        return world


def connect(comm: MPI.Intracomm, port: str, me: Hello, token: bytes) -> Admitted:
    """Join the hub at `port` (collective over this facility's job): the handshake, and its verdict on
    every rank. Raises JoinError when the hub refused this facility."""
    inter = comm.Connect(port, root=0)
    problems, remaining, running, link = [], 0.0, False, None
    if comm.rank == 0:
        try:
            outcome = handshake.call(inter, me.__dict__, token, "join")
            problems, link = outcome.problems, outcome.link
            remaining = outcome.hello.get("remaining_s", 0.0)
            running = outcome.hello.get("running") is True
        except Unanswered as exc:
            problems = [f"the hub {exc} during the handshake"]
    verdict = json.loads(control.allgather_str(comm, json.dumps([problems, remaining, running]))[0])
    if verdict[0]:
        inter.Disconnect()
        raise JoinError(f"facility {me.facility} was refused by the hub: {'; '.join(verdict[0])}")
    remaining = verdict[1] if isinstance(verdict[1], (int, float)) else 0.0
    return Admitted(inter, float(remaining), bool(verdict[2]), link)


# ------------------------------------------------------------------------------------------------ hub
class Beacon:
    """The rendezvous file while the hub admits facilities: the port name and a count, rewritten every
    HEARTBEAT_S (each time whole, by rename), so a newcomer can tell a live hub's file from one a killed
    hub left behind; removed when the hub stops admitting."""

    def __init__(self, path: Path, port: str) -> None:
        self.path, self.port = path, port
        self._stop = threading.Event()
        self._write(0)
        self._thread = threading.Thread(target=self._beat, name="mpifed-rendezvous", daemon=True)
        self._thread.start()

    def _write(self, beat: int) -> None:
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        tmp.write_text(f"{self.port}\nbeat {beat}\n")
        os.replace(tmp, self.path)

    def _beat(self) -> None:
        beat = 0
        while not self._stop.wait(HEARTBEAT_S):
            beat += 1
            try:
                self._write(beat)
            except OSError:  # a shared filesystem's hiccup: the next beat tries again
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def singleton_env(token: bytes) -> dict[str, str]:
    """The environment of a helper process that starts MPI on its own (a singleton, outside the job's
    launcher), holding the token in MPIFED_TOKEN (never on its command line)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "PMIX_"))}
    env["MPIFED_TOKEN"] = token.decode(errors="surrogateescape")
    return env


def wake(port: str, token: bytes) -> None:
    """Connect to our own port from a helper process, so the blocked accept returns."""
    subprocess.run([sys.executable, "-m", "mpifed.comm.join", port], env=singleton_env(token), timeout=120,
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def handshake_hub(inter: MPI.Intercomm, hub: Hello, token: bytes, expected: dict[str, int], joined: set[str],
                  ends: float, running: bool = False) -> tuple[str, list[str], Sealed | None]:
    """On the hub leader: (WAKE, [], None) for our own wake-up call, else (newcomer name, its problems,
    the sealed link to it where it is admitted). A peer that goes silent, oversteps the message size or
    sends no valid hello is dropped: (DROPPED, [why], None). `running`: the federation trains already (a
    facility coming back, see mpifed/comm/rejoin.py), as the hub tells it."""
    def decide(hello: dict) -> dict:
        return {**hub.__dict__, "remaining_s": max(0.0, ends - time.monotonic()), "running": running,
                "problems": _differences(hub, hello, expected, joined)}

    try:
        outcome = handshake.listen(inter, token, "join", decide)
    except Unanswered as exc:
        return DROPPED, [f"dropped a connection that {exc}"], None
    if outcome.wake:
        return WAKE, [], None
    name = outcome.hello.get("facility")  # as the caller said it: a line of ours shows a stranger's quoted
    return (name if name in expected else shown(name)), outcome.problems, outcome.link


def serve(comm: MPI.Intracomm, hub: Hello, token: bytes, expected: dict[str, int], rendezvous: str,
          timeout_s: float, min_facilities: int, say: Callable[[str], None]) -> tuple[MPI.Intracomm, list[str]]:
    """On the hub's job: admit every other facility in `expected` (name -> ranks). Returns the merged
    world and the names that joined (the hub's first). Collective over `comm`."""
    port = MPI.Open_port() if comm.rank == 0 else ""
    wanted = [name for name in expected if name != hub.facility]
    beacon = Beacon(Path(rendezvous), port) if comm.rank == 0 and rendezvous else None
    if comm.rank == 0:
        say(f"hub {hub.facility} is waiting up to {timeout_s:g} s for {', '.join(wanted)} on MPI port {port}"
            + (f" (written to {rendezvous})" if rendezvous else " (pass it to them with --port)"))
        timer = threading.Timer(timeout_s, wake, args=(port, token))
        timer.daemon = True
        timer.start()
    try:
        world, joined, refused = _admit(comm, port, hub, token, expected, say, time.monotonic() + timeout_s)
    finally:
        if comm.rank == 0:
            timer.cancel()
            MPI.Close_port(port)
        if beacon is not None:
            beacon.stop()
    missing = [name for name in wanted if name not in joined]
    if missing and (min_facilities == 0 or len(joined) < min_facilities):
        why = "".join(f"; {name} was refused: {refused[name]}" for name in missing if name in refused)
        message = (f"{', '.join(missing)} did not join within {timeout_s:g} s (federation.join_timeout_s){why}; "
                   + (f"{len(joined)} facilities joined, federation.min_facilities = {min_facilities}" if min_facilities
                      else "set federation.min_facilities to go on without them"))
        control.bcast_int(world, _ABORT)
        raise JoinError(message)
    if missing:
        say(f"going on without {', '.join(missing)}: {len(joined)} facilities joined, "
            f"federation.min_facilities = {min_facilities}")
    control.bcast_int(world, _STOP)
    control.allgather_str(world, json.dumps(joined) if world.rank == 0 else "")
    return world, joined


def _accept(world: MPI.Intracomm, port: str, hear: Callable[[MPI.Intercomm], str] | None
            ) -> tuple[str, list[str], MPI.Intracomm | None]:
    """One collective accept on `world`. The hub's leader runs `hear`, the handshake (everyone else passes None)
    and all learn its verdict: (name, problems, the merged world). A wake-up call gives the name WAKE;
    a wake-up call or a refused newcomer is disconnected and gives no merged world."""
    inter = world.Accept(port, root=0)
    verdict = control.allgather_str(world, hear(inter) if hear else "")[0]
    name, problems = (WAKE, []) if verdict == WAKE else json.loads(verdict)
    if name == WAKE or problems:
        if hear:
            drain(inter)
        inter.Disconnect()
        return name, problems, None
    merged = inter.Merge(high=False)
    inter.Free()
    return name, problems, merged


def _admit(comm: MPI.Intracomm, port: str, hub: Hello, token: bytes, expected: dict[str, int],
           say: Callable[[str], None], ends: float) -> tuple[MPI.Intracomm, list[str], dict[str, str]]:
    """The accept loop on the hub's side, until every facility joined or the wake-up call at `ends`
    (monotonic time); joined newcomers run `follow` meanwhile."""
    world, joined, refused = comm, [hub.facility], {}

    def hear(inter: MPI.Intercomm) -> str:
        name, problems, _ = handshake_hub(inter, hub, token, expected, set(joined), ends)
        return WAKE if name == WAKE else json.dumps([name, problems])

    while len(joined) < len(expected):
        if world is not comm:
            control.bcast_int(world, _ACCEPT)  # tell the newcomers already in to accept the next one with us
        name, problems, merged = _accept(world, port, hear if world.rank == 0 else None)
        if name == WAKE:
            break
        if name == DROPPED:
            say(problems[0])
            continue
        if problems:
            refused[name] = "; ".join(problems)
            say(f"refused facility {name}: {refused[name]}")
            continue
        if world is not comm:
            world.Free()
        world = merged
        joined.append(name)
        say(f"facility {name} joined ({len(joined)} of {len(expected)})")
        watchdog.set_phase(f"join: admitting the others ({', '.join(joined)} in)")
    return world, joined, refused


def follow(world: MPI.Intracomm) -> tuple[MPI.Intracomm, list[str]]:
    """On a newcomer that has joined: accept the next facilities together with the hub until it says
    stop. Returns the names that joined, or raises JoinError if the hub gave up."""
    while True:
        code = control.bcast_int(world, None)
        if code == _ABORT:
            raise JoinError("the hub stopped: not every facility joined in time (see the hub's message)")
        if code != _ACCEPT:
            return world, json.loads(control.allgather_str(world, "")[0])
        _, _, merged = _accept(world, "", None)
        if merged is not None:
            world.Free()
            world = merged


def _wake_main(port: str) -> None:
    """`python -m mpifed.comm.join PORT`: the hub's own wake-up call (see `wake`)."""
    token = os.environ.get("MPIFED_TOKEN", "").encode()
    inter = MPI.COMM_SELF.Connect(port, root=0)
    try:
        handshake.call(inter, {}, token, "join", wake=True)
    except Unanswered:
        pass
    inter.Disconnect()


if __name__ == "__main__":
    _wake_main(sys.argv[1])
