"""A stranger at the hub's door (no token, no MPI): waits for the address in the rendezvous file
argv[1], connects over TCP and does argv[2]: silent (nothing), big (announces a 64 MiB message), raw
(random bytes, unframed), garbage (a frame of random bytes), nest (a frame of 15 KiB of '['), hello (a
well-formed hello, then a proof of random bytes), admit ({"admit": true}, as the rejoin's admit once
was). It holds the connection open for a while, then leaves without a word."""
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

path, mode = Path(sys.argv[1]), sys.argv[2]
while not path.exists() or not path.read_text().strip():
    time.sleep(0.1)
host, _, port = path.read_text().split()[0].rpartition(":")
sock = socket.create_connection((host, int(port)), timeout=30)


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


hello = {"facility": "edge", "ranks": 1, "nonce": os.urandom(16).hex(), "protocol": 2}
sends = {"silent": [], "big": [struct.pack(">I", 64 << 20) + bytes(4096)], "raw": [os.urandom(4096)],
         "garbage": [frame(os.urandom(4096))], "nest": [frame(b"[" * (15 << 10))],
         "admit": [frame(json.dumps({"admit": True}).encode())],
         "hello": [frame(json.dumps(hello).encode()), frame(json.dumps({"proof": os.urandom(32).hex()}).encode())]}
try:
    for data in sends[mode]:
        sock.sendall(data)
        time.sleep(0.2)
    ends = time.monotonic() + 15
    while time.monotonic() < ends and sock.recv(65536):  # read whatever comes, until the hub hangs up
        pass
except OSError:
    pass
sock.close()
