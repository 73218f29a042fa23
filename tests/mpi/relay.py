"""A man in the middle at the hub's door: it listens on a port of its own (its address written to
argv[2]), and passes each connection on to the door named in the hub's rendezvous file argv[1], bytes
both ways, recording all of them in argv[3]. With argv[4] = flip it flips one bit of the third frame
from the hub (the sealed one that carries the MPI port); with inject it puts a forged frame before it;
with pass it only relays. It runs until killed."""
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

door_file, mine, record, mode = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
listener = socket.create_server(("127.0.0.1", 0))
mine.write_text(f"127.0.0.1:{listener.getsockname()[1]}\n")
lock = threading.Lock()


def note(data: bytes) -> None:
    with lock, record.open("ab") as out:
        out.write(data)


def exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def frames(source: socket.socket, target: socket.socket, tamper: bool) -> None:
    """Pass whole frames from source to target; from the hub, tamper with the third."""
    count = 0
    try:
        while True:
            head = exactly(source, 4)
            body = exactly(source, struct.unpack(">I", head)[0])
            note(head + body)
            count += 1
            if tamper and count == 3 and mode == "flip":
                body = body[:-1] + bytes([body[-1] ^ 1])
            if tamper and count == 3 and mode == "inject":
                forged = os.urandom(len(body))
                target.sendall(struct.pack(">I", len(forged)) + forged)
            target.sendall(head + body)
    except OSError:
        pass
    for sock in (source, target):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


while True:
    caller, _ = listener.accept()
    while not door_file.exists() or not door_file.read_text().strip():
        time.sleep(0.05)
    host, _, port = door_file.read_text().split()[0].rpartition(":")
    hub = socket.create_connection((host, int(port)))
    threading.Thread(target=frames, args=(caller, hub, False), daemon=True).start()
    threading.Thread(target=frames, args=(hub, caller, True), daemon=True).start()
