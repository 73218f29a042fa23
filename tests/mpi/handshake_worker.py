"""Two ranks: rank 0 listens, rank 1 calls, over an intercommunicator between them (what Accept/Connect
give a hub and a newcomer). Runs the case named in argv[1] and writes what each rank saw as JSON to
argv[2]/rank{N}.json (the ranks' stdout could interleave); the test reads them. Tokens come from the
environment (never printed)."""
import json
import os
import sys
from pathlib import Path

from mpi4py import MPI

from mpifed.comm import handshake, wire

case = sys.argv[1]
world = MPI.COMM_WORLD
side = world.Split(world.rank, 0)
inter = wire.MPIWire(side.Create_intercomm(0, world, 1 - world.rank, 0))
right = os.environ["T_RIGHT"].encode()
wrong = os.environ["T_WRONG"].encode()
said: list[bytes] = []
real_send = wire.MPIWire.send_bytes


def recording(self, data):  # what the caller puts on the wire, for the replay case
    said.append(bytes(data))
    real_send(self, data)


def report(**what):
    (Path(sys.argv[2]) / f"rank{world.rank}.json").write_text(json.dumps({"rank": world.rank, **what}))


def decide(hello):
    return {"hub": "h", "problems": [] if hello.get("facility") == "f" else ["unknown facility"]}


def listen():
    try:
        out = handshake.listen(inter, right, "test", decide)
    except handshake.Unanswered as exc:
        return {"unanswered": str(exc)}
    result = {"problems": out.problems, "sealed": out.link is not None, "wake": out.wake}
    if out.link is not None:
        try:
            result["got"] = out.link.receive()
            out.link.send({"back": result["got"].get("x", 0) + 1})
        except handshake.Unanswered as exc:
            result["unanswered"] = str(exc)
    return result


if world.rank == 0:
    rounds = 2 if case == "replay" else 1
    report(results=[listen() for _ in range(rounds)])
else:
    if case == "flood":  # 15 KiB of '[' (under the size limit), then a valid-looking nonce never comes
        inter.send_bytes(b"[" * (15 << 10))
        report(sent="flood")
    elif case == "replay":
        wire.MPIWire.send_bytes = recording
        first = handshake.call(inter, {"facility": "f"}, right, "test")
        first.link.send({"x": 1})
        first.link.receive()
        wire.MPIWire.send_bytes = real_send
        # a stranger replays the honest caller's hello and proof, word for word, on a new handshake
        inter.send_bytes(said[0])
        handshake.receive(inter)
        inter.send_bytes(said[1])
        report(replayed=handshake.receive(inter))
    else:
        token = wrong if case == "wrong" else right
        out = handshake.call(inter, {"facility": "f"}, token, "test")
        result = {"problems": out.problems, "sealed": out.link is not None}
        if out.link is not None:
            if case == "flip":
                frame = bytearray(out.link.channel.seal(json.dumps({"x": 1}).encode()))
                frame[-1] ^= 1
                inter.send_bytes(bytes(frame))
            else:
                out.link.send({"x": 41})
                result["back"] = out.link.receive()
        report(**result)
MPI.Finalize()
