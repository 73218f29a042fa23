"""Joining separately launched facilities into one MPI world (`mpifed run CONFIG --facility NAME`).

The hub (the first facility listed) opens its door (mpifed/comm/door.py: a TCP listener of mpifed's own)
and publishes its address, in the file `federation.rendezvous` and on its terminal. Every other
facility knocks there: the two leaders run the handshake of mpifed/comm/handshake.py, the newcomer
proving it holds the token first and saying who it is (facility, ranks, layout fingerprint,
configuration digest), the hub answering with its own proof and the verdict: empty, or every
difference found. On a difference each prints what differs; the newcomer stops, and the hub goes on
waiting for the others.

An admitted newcomer waits at the door until the hub's accept loop (`_admit`) takes it: the hub sends
it, sealed, the MPI port and a one-time ticket, accepts (collectively, with the facilities already in),
and the newcomer connects and proves itself again over MPI with the ticket; anyone else who reaches
the port is dropped. The newcomer is merged into the growing world and takes part in accepting the
rest. When the time is up (`federation.join_timeout_s`), the hub goes on if `federation.min_facilities`
have joined, else everyone stops. MPI_Comm_accept cannot time out, so an admitted newcomer that never
connects is given up on by waking the accept: a short-lived helper process connects and proves a
wake-up call with the token.

Messages are JSON: nothing is unpickled.
"""
from __future__ import annotations

import hmac
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mpi4py import MPI

from mpifed.comm import control, handshake, secret, watchdog
from mpifed.comm.door import Arrival, Door, Hello
from mpifed.comm.handshake import HANDSHAKE_S, Sealed
from mpifed.comm.topology import NetworkError
from mpifed.comm.wire import MPIWire, StreamWire, Tampered, Unanswered, drain, split_address

HEARTBEAT_S = 1.0
"""While the hub admits facilities it rewrites the rendezvous file this often."""
ACCEPT_S = 3 * HANDSHAKE_S
"""How long the hub's accept waits for the newcomer it sent the MPI port to; then it is woken."""
KNOCKS = 3
"""How often a newcomer knocks at the hub's door (2 s apart) before it gives up."""
STALE_S = 3 * HEARTBEAT_S
"""A rendezvous file unchanged for this long was left by a hub that is gone."""
WAKE = "<wake>"  # not a valid facility name
DROPPED = "<dropped>"  # nor this: a connection that broke the handshake's rules
_ACCEPT, _STOP, _ABORT, _CLOSE = 0, 1, 2, 3


class JoinError(RuntimeError):
    """A facility that cannot join, or a federation that cannot start; the message says what differs."""


class Refused(JoinError):
    """The hub heard this facility out and refused it (the token, the model, the configuration, its
    name or ranks): bad input that a restart would only repeat, exit code 2."""

    exit_code = 2


class LaunchError(JoinError):
    """A launch that cannot join as given: its facility name or rank count, its token, no way to find the
    hub, a rendezvous file only a hub that is gone wrote. Found before anything starts, the same on every
    rank of the launch (exit code 2)."""


def read_token(token_file: str) -> bytes:
    """The shared secret (see secret.read_token); a missing, exposed or weak one is a LaunchError."""
    try:
        return secret.read_token(token_file)
    except secret.TokenError as exc:
        raise LaunchError(str(exc)) from None


# -------------------------------------------------------------------------------------------- newcomer
def find_hub(comm: MPI.Intracomm, rendezvous: str, port: str, timeout_s: float, say: Callable[[str], None]) -> str:
    """The hub's door ("HOST:PORT"), the same on every rank of this launch: given, or read by the leader from the
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
        try:
            split_address(port)
        except ValueError:
            raise LaunchError(f"--port {port!r}: not HOST:PORT; pass the address the hub printed "
                              "(\"at its door HOST:PORT\")") from None
        return port
    if not rendezvous:
        raise LaunchError("no way to find the hub: set federation.rendezvous to a file both sites see, or pass "
                          "--port with the address the hub printed")
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
    """A newcomer the hub let in, and the seconds the hub will still admit others. On a first join,
    `inter` connects it to the hub; when the federation is `running` already (a facility coming back,
    see mpifed/comm/rejoin.py) there is none yet, and its leader holds the sealed `link` to the door."""

    inter: MPI.Intercomm | None
    remaining_s: float
    running: bool
    link: Sealed | None = None

    def merge(self) -> MPI.Intracomm:
        """The world of the hub's ranks and this job's (a first join), in which this job takes part in
        admitting the remaining facilities (see `_admit`)."""
        world = self.inter.Merge(high=True)
        self.inter.Free()
        return world

    def close(self) -> None:
        """Hang up at the door (the leader's stream)."""
        if self.link is not None:
            self.link.close()


def mpi_library() -> str:
    """This process's MPI library, name and version: the first line MPI_Get_library_version gives, its
    spacing normalised ("MPICH Version: 5.0.2", "Open MPI v5.0.7, ...", "Intel(R) MPI Library ...")."""
    return " ".join(MPI.Get_library_version().splitlines()[0].split())[:200]


def connect(comm: MPI.Intracomm, address: str, me: Hello, token: bytes) -> Admitted:
    """Join the hub whose door is at `address` (collective over this facility's job): the handshake at
    the door, then (on a first join) the MPI connection the hub's accept loop gives the port of, proved
    again with its ticket. Raises JoinError, on every rank, when the hub refused this facility."""
    said, link, heard = ["", 0.0, False, ""], None, False
    for knock in range(KNOCKS if comm.rank == 0 else 0):  # a door busy with strangers may let one go
        try:
            said, link = _knock(address, me, token)
            heard = True  # the hub's own verdict: a refusal in it is the facility's input
            break
        except Tampered as exc:  # someone on the path: knocking again would only meet them again
            said[0] = f"the hub {exc} during the handshake"
            break
        except Unanswered as exc:
            said[0] = f"the hub {exc} during the handshake"
        except OSError as exc:
            said[0] = f"nothing answers at the hub's door {address} ({exc.strerror or exc})"
        time.sleep(2.0)
    problem, remaining, running, port, heard = json.loads(control.bcast_str(
        comm, json.dumps([*said[:4], heard]) if comm.rank == 0 else None))
    if not problem and not running:
        inter = comm.Connect(port, root=0)
        if comm.rank == 0:
            try:
                problem = "; ".join(handshake.call(MPIWire(inter), {**me.__dict__, "ticket": said[4]}, token,
                                                   "join").problems)
            except Unanswered as exc:
                problem, heard = f"the hub {exc} after giving its MPI port", False
        problem, heard = json.loads(control.bcast_str(comm, json.dumps([problem, heard]) if comm.rank == 0 else None))
        if problem:
            inter.Disconnect()
        if link is not None:
            link.close()
            link = None
    else:
        inter = None
    if problem:
        if link is not None:
            link.close()
        refusal = Refused if heard else JoinError  # a path or a hub that fails may do better next time
        raise refusal(f"facility {me.facility} was refused by the hub: {problem}")
    return Admitted(inter, float(remaining), bool(running), link)


def _knock(address: str, me: Hello, token: bytes) -> tuple[list, Sealed | None]:
    """On the newcomer's leader: the handshake at the hub's door and, on a first join, the MPI port and
    ticket it then sends (once the hub's accept loop takes this facility). [problem, remaining_s, running,
    port, ticket] and the sealed link."""
    wire = StreamWire.connect(address, HANDSHAKE_S)
    try:
        outcome = handshake.call(wire, me.__dict__, token, "join")
        answer, link = outcome.hello, outcome.link
        remaining = answer.get("remaining_s") if isinstance(answer.get("remaining_s"), (int, float)) else 0.0
        running = answer.get("running") is True
        if outcome.problems:
            wire.close()
            return ["; ".join(outcome.problems), remaining, running, ""], None
        if running:
            return ["", remaining, True, ""], link
        told = link.receive(remaining + ACCEPT_S)  # the hub takes the facilities it admitted one at a time
        if not isinstance(told.get("port"), str) or not isinstance(told.get("ticket"), str):
            raise Unanswered("sent no MPI port")
    except Unanswered:
        wire.close()
        raise
    return ["", remaining, False, told["port"], told["ticket"]], link


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


def wake(port: str, token: bytes, tag: str = "") -> None:
    """Connect to our own port from a helper process (an MPI singleton, outside the job's launcher), so
    the blocked accept returns; `tag` says which wait it ends. The port, the token and the tag reach it
    on its standard input, never on its command line or in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "PMIX_", "MPIFED_TOKEN"))}
    told = json.dumps({"port": port, "token": token.hex(), "tag": tag})
    subprocess.run([sys.executable, "-m", "mpifed.comm.join"], input=told, text=True, env=env, timeout=120,
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def serve(comm: MPI.Intracomm, hub: Hello, token: bytes, expected: dict[str, int], rendezvous: str,
          timeout_s: float, min_facilities: int, say: Callable[[str], None]
          ) -> tuple[MPI.Intracomm, list[str], Door | None]:
    """On the hub's job: admit every other facility in `expected` (name -> ranks). Returns the merged
    world, the names that joined (the hub's first) and, on the leader where facilities may come back
    (`min_facilities` >= 1), the door still open, with its rendezvous file (`door.beacon`). Collective
    over `comm`."""
    ends = time.monotonic() + timeout_s
    wanted = [name for name in expected if name != hub.facility]
    door, port, beacon, problem = None, "", None, ""
    if comm.rank == 0:
        try:
            door = Door(hub, token, expected, ends, say)
            port = MPI.Open_port()
        except NetworkError as exc:
            problem = str(exc)
    problem = control.bcast_str(comm, problem)
    if problem:
        raise LaunchError(problem)
    if comm.rank == 0:
        beacon = Beacon(Path(rendezvous), door.address) if rendezvous else None
        say(f"hub {hub.facility} is waiting up to {timeout_s:g} s for {', '.join(wanted)} at its door {door.address}"
            + (f" (written to {rendezvous})" if rendezvous else " (pass it to them with --port)"))
    keep = False
    try:
        world, joined, refused = _admit(comm, port, door, token, hub.facility, expected, say, ends)
        missing = [name for name in wanted if name not in joined]
        if missing and (min_facilities == 0 or len(joined) < min_facilities):
            why = "".join(f"; {name} was refused: {refused[name]}" for name in missing if name in refused)
            message = (f"{', '.join(missing)} did not join within {timeout_s:g} s (federation.join_timeout_s){why}; "
                       + (f"{len(joined)} facilities joined, federation.min_facilities = {min_facilities}"
                          if min_facilities else "set federation.min_facilities to go on without them"))
            control.bcast_int(world, _ABORT)
            raise JoinError(message)
        if missing:
            say(f"going on without {', '.join(missing)}: {len(joined)} facilities joined, "
                f"federation.min_facilities = {min_facilities}")
        control.bcast_int(world, _STOP)
        control.allgather_str(world, json.dumps(joined) if world.rank == 0 else "")
        keep = door is not None and min_facilities > 0
    finally:
        if comm.rank == 0:
            MPI.Close_port(port)
            door.beacon = beacon
            if keep:
                door.train(joined)
            else:
                door.close()
    return world, joined, door if keep else None


def _accept(world: MPI.Intracomm, port: str, hear: Callable[[MPI.Intercomm], str] | None
            ) -> tuple[str, list[str], MPI.Intracomm | None]:
    """One collective accept on `world`. The hub's leader runs `hear`, the handshake (everyone else passes None)
    and all learn its verdict: (name, problems, the merged world). A wake-up call gives the name WAKE;
    a wake-up call or a refused caller is disconnected and gives no merged world."""
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


def _hear(arrival: Arrival, token: bytes) -> Callable[[MPI.Intercomm], str]:
    """On the hub's leader: the check of whoever connected to the MPI port after `arrival` was sent it:
    a caller that proves the token and shows the arrival's ticket is that arrival; the wake-up call
    tagged with its ticket is WAKE (its wait is over); anyone else, a stale wake-up call included, is
    DROPPED, and the port is accepted on again for the same arrival."""
    def decide(hello: dict) -> dict:
        shown_ticket = hello.get("ticket") if isinstance(hello.get("ticket"), str) else ""
        same = hmac.compare_digest(shown_ticket.encode(), arrival.ticket.encode())
        return {"problems": [] if same else [f"not the facility the door admitted ({arrival.name})"]}

    def hear(inter: MPI.Intercomm) -> str:
        try:
            outcome = handshake.listen(MPIWire(inter), token, "join", decide)
        except Unanswered as exc:
            return json.dumps([DROPPED, [f"dropped a connection to the MPI port that {exc}"]])
        if outcome.wake:
            tag = outcome.hello.get("tag") if isinstance(outcome.hello.get("tag"), str) else ""
            return WAKE if hmac.compare_digest(tag.encode(), arrival.ticket.encode()) else \
                json.dumps([DROPPED, ["dropped a wake-up call of an earlier wait"]])
        if outcome.problems:
            return json.dumps([DROPPED, [f"dropped a connection to the MPI port: {'; '.join(outcome.problems)}"]])
        return json.dumps([arrival.name, []])
    return hear


def _admit(comm: MPI.Intracomm, port: str, door: Door | None, token: bytes, hub: str, expected: dict[str, int],
           say: Callable[[str], None], ends: float) -> tuple[MPI.Intracomm, list[str], dict[str, str]]:
    """The accept loop on the hub's side (`door` on its leader, None elsewhere), until every facility
    joined or `ends` (monotonic time): each facility the door admitted in turn is sent the MPI port and
    accepted by everyone in, again until it connects or its wait is woken (ACCEPT_S). Joined newcomers
    run `follow` meanwhile."""
    world, joined, arrival, timer = comm, [hub], None, None
    while len(joined) < len(expected):
        if door is not None and arrival is None:
            arrival = door.next_arrival(ends)
            if arrival is not None:
                timer = threading.Timer(ACCEPT_S, wake, args=(port, token, arrival.ticket))
                timer.daemon = True
                timer.start()
                try:
                    arrival.link.send({"port": port, "ticket": arrival.ticket})
                except Unanswered as exc:  # it hung up: wake the accept now rather than at ACCEPT_S
                    say(f"facility {arrival.name} {exc} before it was sent the MPI port")
                    timer.cancel()
                    threading.Thread(target=wake, args=(port, token, arrival.ticket), daemon=True).start()
        code = control.bcast_int(world, _ACCEPT if arrival is not None else _CLOSE)
        if code == _CLOSE:
            refused = json.loads(control.bcast_str(world, json.dumps(door.refusals()) if door is not None else None))
            return world, joined, refused
        name, problems, merged = _accept(world, port, _hear(arrival, token) if arrival is not None else None)
        if name == DROPPED:  # a stranger or a stale wake-up call: the same arrival is awaited again
            if door is not None:
                say(problems[0])
            continue
        if door is not None:
            timer.cancel()
            arrival.close()
            if merged is None:
                door.release(arrival.name)
                say(f"facility {arrival.name} was admitted at the door but did not connect to the MPI port "
                    f"within {ACCEPT_S:g} s; it may knock again")
            arrival = None
        if merged is None:
            continue
        if world is not comm:
            world.Free()
        world = merged
        joined.append(name)
        if door is not None:
            door.entered(name)
        say(f"facility {name} joined ({len(joined)} of {len(expected)})")
        watchdog.set_phase(f"join: admitting the others ({', '.join(joined)} in)")
    return world, joined, {}


def follow(world: MPI.Intracomm) -> tuple[MPI.Intracomm, list[str]]:
    """On a newcomer that has joined: accept the next facilities together with the hub until it says
    stop. Returns the names that joined, or raises JoinError if the hub gave up."""
    while True:
        code = control.bcast_int(world, None)
        if code == _ABORT:
            raise JoinError("the hub stopped: not every facility joined in time (see the hub's message)")
        if code == _CLOSE:  # the hub's window closed: its verdict follows
            control.bcast_str(world, None)
            continue
        if code != _ACCEPT:
            return world, json.loads(control.allgather_str(world, "")[0])
        _, _, merged = _accept(world, "", None)
        if merged is not None:
            world.Free()
            world = merged


def _wake_main() -> None:
    """`python -m mpifed.comm.join`: a wake-up call to our own port (see `wake`)."""
    told = json.loads(sys.stdin.read())
    inter = MPI.COMM_SELF.Connect(told["port"], root=0)
    try:
        handshake.call(MPIWire(inter), {"tag": told["tag"]}, bytes.fromhex(told["token"]), "join", wake=True)
    except Unanswered:
        pass
    inter.Disconnect()


if __name__ == "__main__":
    _wake_main()
