"""What sealing a link costs on one core (mpifed/comm/seal.py), against a plain copy of the same bytes.

A 64 MiB payload is cut into frames (4 MiB, the link's chunk, and 1 MiB). One caller->hub Channel pair
seals every frame and opens it again; side by side, in alternating pairs (this machine is shared and
noisy), the same frames are copied once into fresh buffers. Medians over the pairs:

- seal+open with the allocating API (`seal`, `open`): each frame is dropped once opened and each payload
  once consumed, as on a link, so a steady heap serves the buffers;
- seal+open into reused buffers (`seal_into`, `open_into`): what the link gets with a send buffer and the
  weights as the destination;
- both AEADs the module could use, raw (encrypt_into then decrypt_into on reused buffers): the numbers
  behind the choice of cipher.

The process is pinned to one core, and times are this thread's CPU seconds (the machine is shared: a wall
clock would count other processes' turns on the core; `--wall` uses it anyway). Run from the repository
root:

    .venv/bin/python benchmarks/seal.py [--payload-mib 64] [--pairs 9] [--wall]

Ends with one line `RESULT {json}`: cipher, seal_open_gbps, seal_gbps, open_gbps, copy_gbps, ratio_vs_copy
(copy seconds / seal+open seconds), frame_bytes, pairs (all for 4 MiB frames), seal_open_into_gbps,
seal_open_gbps_1mib, raw_seal_open_gbps (per cipher). GB/s is payload bytes / seconds / 1e9.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305  # noqa: E402

from mpifed.comm.seal import CIPHER, NONCE_BYTES, OVERHEAD, Channel, derive  # noqa: E402

MIB = 1 << 20
# CPU seconds of this thread, not wall seconds: the machine is shared, and while another process holds the
# core a wall clock counts its time as ours. Page faults and the kernel's page zeroing are this thread's
# system time, so they are counted. `--wall` measures wall time instead.
clock = time.thread_time


def link() -> tuple[Channel, Channel]:
    token, caller_nonce, hub_nonce = (secrets.token_bytes(n) for n in (32, NONCE_BYTES, NONCE_BYTES))
    return (Channel(derive(token, caller_nonce, hub_nonce, "caller", "bench"), "bench (caller)"),
            Channel(derive(token, caller_nonce, hub_nonce, "hub", "bench"), "bench (hub)"))


def seal_open(tx: Channel, rx: Channel, frames: list[memoryview]) -> tuple[float, float]:
    """Seconds sealing and seconds opening every frame, with the allocating API."""
    sealing = opening = 0.0
    for chunk in frames:
        t0 = clock()
        frame = tx.seal(chunk)
        t1 = clock()
        payload = rx.open(frame)
        t2 = clock()
        sealing, opening = sealing + t1 - t0, opening + t2 - t1
        del frame, payload                    # sent, and consumed
    return sealing, opening


def seal_open_into(tx: Channel, rx: Channel, frames: list[memoryview], send: bytearray, dest: np.ndarray) -> float:
    t0 = clock()
    offset = 0
    for chunk in frames:
        n = tx.seal_into(chunk, send)
        offset += rx.open_into(memoryview(send)[:n], dest[offset:offset + len(chunk)])
    return clock() - t0


def copy(frames: list[memoryview]) -> float:
    t0 = clock()
    for chunk in frames:
        out = bytearray(chunk)
        del out
    return clock() - t0


def raw(aead: AESGCM | ChaCha20Poly1305, chunk: memoryview, sealed: bytearray, opened: bytearray) -> float:
    t0 = clock()
    aead.encrypt_into(bytes(12), chunk, None, sealed)
    aead.decrypt_into(bytes(12), sealed, None, opened)
    return clock() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--payload-mib", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=9)
    parser.add_argument("--wall", action="store_true", help="time with the wall clock, not this thread's CPU")
    args = parser.parse_args()
    global clock
    clock = time.perf_counter if args.wall else time.thread_time
    if hasattr(os, "sched_setaffinity"):
        core = max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        print(f"pinned to core {core}")
    size = args.payload_mib * MIB
    payload = memoryview(np.random.default_rng(0).bytes(size))
    gbps = lambda seconds, nbytes=size: nbytes / seconds / 1e9  # noqa: E731
    result: dict = {"cipher": CIPHER, "pairs": args.pairs, "payload_bytes": size,
                    "clock": "wall" if args.wall else "thread cpu", "load_average_1min": os.getloadavg()[0]}
    print(f"timing with {result['clock']} time; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    for frame_mib in (4, 1):
        frame_bytes = frame_mib * MIB
        frames = [payload[o:o + frame_bytes] for o in range(0, size, frame_bytes)]
        send, dest = bytearray(frame_bytes + OVERHEAD), np.empty(size, np.uint8)
        seals, opens, both, intos, copies = [], [], [], [], []
        for pair in range(args.pairs + 1):      # the first pair warms the heap and the caches, and is dropped
            tx, rx = link()
            s, o = seal_open(tx, rx, frames)
            i = seal_open_into(tx, rx, frames, send, dest)
            c = copy(frames)
            if pair:
                seals.append(s), opens.append(o), both.append(s + o), intos.append(i), copies.append(c)
        assert dest.tobytes() == payload.tobytes(), "open_into did not give back the payload"
        med = {k: statistics.median(v) for k, v in
               dict(seal=seals, open=opens, both=both, into=intos, copy=copies).items()}
        print(f"{frame_mib} MiB frames, {size // MIB} MiB payload, {args.pairs} pairs, medians: "
              f"seal+open {gbps(med['both']):.2f} GB/s (seal {gbps(med['seal']):.2f}, open {gbps(med['open']):.2f}),"
              f" into reused buffers {gbps(med['into']):.2f} GB/s, copy {gbps(med['copy']):.2f} GB/s, "
              f"seal+open takes {med['both'] / med['copy']:.1f}x the copy")
        if frame_mib == 4:
            result.update(seal_open_gbps=round(gbps(med["both"]), 3), seal_gbps=round(gbps(med["seal"]), 3),
                          open_gbps=round(gbps(med["open"]), 3), copy_gbps=round(gbps(med["copy"]), 3),
                          ratio_vs_copy=round(med["copy"] / med["both"], 4), frame_bytes=frame_bytes,
                          seal_open_into_gbps=round(gbps(med["into"]), 3))
        else:
            result.update(seal_open_gbps_1mib=round(gbps(med["both"]), 3),
                          seal_open_into_gbps_1mib=round(gbps(med["into"]), 3))

    # The two AEADs the module could use, raw, on one 4 MiB frame, alternating.
    chunk = payload[:4 * MIB]
    sealed, opened = bytearray(len(chunk) + 16), bytearray(len(chunk))
    ciphers = {"AES-256-GCM": AESGCM(secrets.token_bytes(32)),
               "ChaCha20-Poly1305": ChaCha20Poly1305(secrets.token_bytes(32))}
    times: dict[str, list[float]] = {name: [] for name in ciphers}
    for _ in range(4 * args.pairs):
        for name, aead in ciphers.items():
            times[name].append(raw(aead, chunk, sealed, opened))
    result["raw_seal_open_gbps"] = {name: round(gbps(statistics.median(t), len(chunk)), 3) for name, t in times.items()}
    print("raw encrypt_into+decrypt_into, 4 MiB, reused buffers: " +
          ", ".join(f"{name} {v:.2f} GB/s" for name, v in result["raw_seal_open_gbps"].items()))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
