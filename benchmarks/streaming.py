"""Does hiding the link cost learning? Validation loss after the same rounds and tokens for the blocking
fp32 exchange against the delayed outer step (landing 3 inner steps after its post, and a whole round
after it), fragments, and the int4, int2 and topk codecs, every run a
real `mpifed simulate` of F facilities of one rank on this machine (the parity study's model, data,
inner optimizer and schedule: benchmarks/parity.py).

    python benchmarks/streaming.py [--facilities 4] [--steps 120] [--h 10] [--out DIR] [--only NAME,...]

Ends with `RESULT {json}`: worst_val_loss_ratio_vs_blocking (the largest final validation loss of a
variant over the blocking fp32 run's) and every run's ratio.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity import ROOT, Run, finished, last_metrics  # noqa: E402  (the study's runs and their reading)

VARIANTS = {
    "blocking": (),
    "delayed": ("federation.overlap=delayed", "federation.overlap_steps=3"),
    "delayed-whole-round": ("federation.overlap=delayed",),
    "fragments4": ("federation.fragments=4",),
    "int4": ("federation.compress=int4",),
    "int2": ("federation.compress=int2",),
    "topk": ("federation.compress=topk",),
    "delayed-fragments4-int4": ("federation.overlap=delayed", "federation.fragments=4", "federation.compress=int4"),
}
"""Run name -> what it sets over the blocking fp32 FedAvg run."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facilities", type=int, default=4)
    parser.add_argument("--preset", default="llama-small")
    parser.add_argument("--steps", type=int, default=120, help="inner steps of every run (a multiple of H)")
    parser.add_argument("--h", type=int, default=10, help="local steps per round")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--val-sequences", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="")
    parser.add_argument("--out", default="run/streaming")
    parser.add_argument("--only", default="", help="comma-separated run names to run again; finished runs are read")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    again = set(filter(None, args.only.split(",")))
    rows = {}
    for name, sets in VARIANTS.items():
        run = Run(name, args.facilities, 1, args.h, sets)
        folder = out / name
        start = time.perf_counter()
        if name in again or not finished(folder, args.steps // args.h):
            done = subprocess.run(run.command(args, out), cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        last, moved = last_metrics(folder)
        rows[name] = {"val_loss": last["val_loss"], "bytes_inter": moved, "wall_s": round(time.perf_counter() - start)}
        print(f"{name:<24} val_loss {last['val_loss']:.4f}  bytes between sites {moved / 1e6:9.1f} MB", flush=True)
    base = rows["blocking"]["val_loss"]
    ratios = {name: round(row["val_loss"] / base, 4) for name, row in rows.items() if name != "blocking"}
    print(f"{'run':<24} {'val loss':>8} {'/ blocking':>10} {'MB between sites':>16}")
    for name, row in rows.items():
        print(f"{name:<24} {row['val_loss']:>8.4f} {row['val_loss'] / base:>10.4f} {row['bytes_inter'] / 1e6:>16.1f}")
    worst = max(ratios, key=ratios.get)
    print("RESULT " + json.dumps({"worst_val_loss_ratio_vs_blocking": ratios[worst], "worst": worst,
                                  "blocking_val_loss": base, "ratios": ratios, "facilities": args.facilities,
                                  "preset": args.preset, "steps": args.steps, "h": args.h}))


if __name__ == "__main__":
    main()
