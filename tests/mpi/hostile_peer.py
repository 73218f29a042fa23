"""A stranger at an mpifed port (no token): waits for the port in the rendezvous file argv[1], connects,
and does argv[2]: silent (nothing), big (a 64 MiB message), garbage (random bytes), nest (15 KiB of '['),
hello (a valid-looking hello, then a proof of random bytes), admit ({"admit": true}, as the rejoin's
admit once was). It keeps MPI progressing for a while, then leaves without a word."""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

path, mode = Path(sys.argv[1]), sys.argv[2]
while not path.exists() or not path.read_text().strip():
    time.sleep(0.1)
inter = MPI.COMM_WORLD.Connect(path.read_text().split()[0])


def send(data: bytes):
    return inter.Isend([np.frombuffer(data, np.uint8), MPI.BYTE], dest=0, tag=7101)


pending = {"silent": lambda: MPI.REQUEST_NULL,
           "big": lambda: send(bytes(64 << 20)),
           "garbage": lambda: send(os.urandom(4096)),
           "nest": lambda: send(b"[" * (15 << 10)),
           "admit": lambda: send(json.dumps({"admit": True}).encode()),
           "hello": lambda: send(json.dumps({"facility": "edge", "ranks": 1, "nonce": os.urandom(16).hex(),
                                             "protocol": 2}).encode())}[mode]()
if mode == "hello":
    pending.Wait()
    pending = send(json.dumps({"proof": os.urandom(32).hex()}).encode())
ends = time.monotonic() + 20
while time.monotonic() < ends:  # keep MPI progressing the send, which nobody may receive
    pending.Test()
    time.sleep(0.01)
os._exit(0)
