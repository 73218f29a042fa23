"""Benchmark of the cross-facility codecs: encode (with error feedback) + decode (added into a sum, as a
root does) of one fp32 buffer, against a plain copy of the same buffer, side by side.

    python benchmarks/codecs.py [--millions 64] [--threads 1,2] [--pairs 9]

Each codec is timed in pairs with `np.copyto` of the same buffer, alternating which goes first; its
figure is the median over the pairs of copy time / (encode time + decode time), so a slow spell of the
shared machine hits both halves of a pair. Encode and decode stream the buffer in chunks through
preallocated buffers on `--threads` threads (numpy releases the GIL inside each operation); the copy is
numpy's single call. The last line is `RESULT {json}` with worst_codec_vs_copy (the slowest codec at the
most threads) and every figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mpifed.federation.compress import CODECS, decode, encode, make_codec  # noqa: E402


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--millions", type=float, default=64, help="fp32 values in the buffer, in millions")
    parser.add_argument("--threads", default="1,2", help="thread counts to time the codecs at")
    parser.add_argument("--pairs", type=int, default=9)
    args = parser.parse_args()
    n = int(args.millions * 1e6)
    x = (np.random.default_rng(0).standard_normal(n) * 1e-3).astype(np.float32)
    copy = np.empty_like(x)
    threads = [int(t) for t in args.threads.split(",")]
    print(f"codecs: {n / 1e6:.0f}M fp32 values ({4 * n / 2 ** 20:.0f} MiB), {args.pairs} pairs, median of ratios")
    print(f"{'codec':>6} {'threads':>7} {'bytes/value':>11} {'encode GB/s':>11} {'decode GB/s':>11} {'vs copy':>8}")
    figures: dict[str, dict[str, float]] = {}
    for name in [name for name, codec in CODECS.items() if codec is not None]:
        codec = make_codec(name)
        residual, total = np.zeros_like(x), np.zeros_like(x)
        payload = np.empty(codec.payload_bytes(n), np.uint8)
        for count in threads:
            def round_trip() -> tuple[float, float]:
                return (_seconds(lambda: encode(codec, x, residual, payload, count)),
                        _seconds(lambda: decode(codec, payload, n, total, add=True, threads=count)))

            round_trip()  # warm the scratch buffers and the thread pool
            ratios, encodes, decodes = [], [], []
            for pair in range(args.pairs):
                if pair % 2:
                    (enc, dec), plain = round_trip(), _seconds(lambda: np.copyto(copy, x))
                else:
                    plain, (enc, dec) = _seconds(lambda: np.copyto(copy, x)), round_trip()
                ratios.append(plain / (enc + dec))
                encodes.append(enc)
                decodes.append(dec)
            ratio = statistics.median(ratios)
            figures.setdefault(name, {})[f"threads_{count}"] = round(ratio, 3)
            print(f"{name:>6} {count:>7} {payload.nbytes / n:>11.3f} {4 * n / statistics.median(encodes) / 1e9:>11.2f} "
                  f"{4 * n / statistics.median(decodes) / 1e9:>11.2f} {ratio:>8.3f}")
    most = f"threads_{max(threads)}"
    worst = min(figures, key=lambda name: figures[name][most])
    print("RESULT " + json.dumps({"worst_codec_vs_copy": figures[worst][most], "worst_codec": worst,
                                  "threads": max(threads), "millions": args.millions, "ratios": figures}))


if __name__ == "__main__":
    main()
