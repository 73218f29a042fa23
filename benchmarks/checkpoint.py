"""Benchmark of mpifed's HDF5 checkpoints against other ways to put the same bytes on disk, side by side
in one run (the machine is shared and noisy: only the ratios mean something).

    python benchmarks/checkpoint.py [--sizes 10,100] [--reps 3] [--dir DIR]

For each model size (millions of fp32 parameters, in tensors of about 1M like a real model) it writes
and reads back, best of --reps, everything fsynced:
  raw          numpy tofile / fromfile of one flat buffer (the disk's limit here)
  mpifed       checkpoint.write_main (write with hashes, fsync, reopen and check, publish) / read_flat
  mpifed+f32   the same with HDF5's fletcher32 filter
  torch        torch.save / torch.load(weights_only=True) of the tensors
  safetensors  safetensors save_file / load_file
The last line is `RESULT {json}` with write_ratio_vs_raw and read_ratio_vs_raw of mpifed at the
largest size. Reads come from the page cache unless the machine lets us drop it (then it says so).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mpifed.checkpoint import format as checkpoint  # noqa: E402
from mpifed.layout import FlatLayout, ParamSlot  # noqa: E402


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _best(fn, reps: int, before=None) -> float:
    times = []
    for _ in range(reps):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(millions: int, reps: int, folder: Path, cold: bool) -> dict:
    import torch
    from safetensors.numpy import load_file, save_file

    numel = millions * 1_000_000
    sizes = [1_000_000] * millions
    slots, offset = [], 0
    for i, n in enumerate(sizes):
        slots.append(ParamSlot(f"layers.{i}.weight", (n // 1000, 1000), "float32", offset))
        offset += n
    layout = FlatLayout(tuple(slots))
    flat = np.random.default_rng(0).standard_normal(numel).astype(np.float32)
    tensors = {s.name: v for s, v in zip(slots, layout.unflatten(flat).values())}
    attrs = dict(tokens=0, model_config="{}", facilities="[]", config="")
    drop = _drop_caches if cold else None
    raw, torch_file, st_file = folder / "raw.bin", folder / "t.pt", folder / "m.safetensors"

    def clean() -> None:
        for p in folder.iterdir():
            p.unlink()

    def mpifed_write(f32: bool):
        def write() -> None:
            pending = checkpoint.write_main(folder, 1, attrs, layout, [(0, numel)], [], [], model=flat, outer={},
                                            fletcher32=f32)
            checkpoint.publish(pending)
        return write

    def torch_write() -> None:
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, torch_file)
        _fsync(torch_file)

    def st_write() -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(st_file))
        _fsync(st_file)

    def raw_write() -> None:
        flat.tofile(raw)
        _fsync(raw)

    row = {"params_m": millions, "bytes": flat.nbytes}
    row["raw_write_s"] = _best(raw_write, reps)
    row["raw_read_s"] = _best(lambda: np.fromfile(raw, dtype=np.float32), reps, drop)
    row["torch_write_s"] = _best(torch_write, reps)
    row["torch_read_s"] = _best(lambda: torch.load(torch_file, weights_only=True), reps, drop)
    row["safetensors_write_s"] = _best(st_write, reps)
    row["safetensors_read_s"] = _best(lambda: load_file(str(st_file)), reps, drop)
    clean()
    row["mpifed_f32_write_s"] = _best(mpifed_write(True), reps, clean)
    row["mpifed_f32_read_s"] = _best(lambda: checkpoint.read_flat(folder / "round_00001.h5", layout, "model"), reps, drop)
    row["mpifed_write_s"] = _best(mpifed_write(False), reps, clean)
    row["mpifed_read_s"] = _best(lambda: checkpoint.read_flat(folder / "round_00001.h5", layout, "model"), reps, drop)
    assert np.array_equal(checkpoint.read_flat(folder / "round_00001.h5", layout, "model"), flat)
    clean()
    for kind in ("write", "read"):
        for name in ("mpifed", "mpifed_f32", "torch", "safetensors"):
            row[f"{name}_{kind}_ratio"] = row[f"raw_{kind}_s"] / row[f"{name}_{kind}_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100", help="model sizes in millions of parameters")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder on the file system to measure (default: a temp dir)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mpifed-ckpt-bench-", dir=args.dir))
    cold = _drop_caches()
    print(f"writing to {folder}; reads {'cold (page cache dropped)' if cold else 'from the page cache'}")
    try:
        rows = [measure(int(m), args.reps, folder, cold) for m in args.sizes.split(",")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{'params':>7} {'MB':>6} | {'write MB/s':>10}: {'raw':>6} {'mpifed':>7} {'+f32':>6} {'torch':>6} {'safet':>6} "
          f"| {'read MB/s':>9}: {'raw':>6} {'mpifed':>7} {'+f32':>6} {'torch':>6} {'safet':>6}")
    for r in rows:
        mb = r["bytes"] / 1e6
        w = [mb / r[f"{n}_write_s"] for n in ("raw", "mpifed", "mpifed_f32", "torch", "safetensors")]
        rd = [mb / r[f"{n}_read_s"] for n in ("raw", "mpifed", "mpifed_f32", "torch", "safetensors")]
        print(f"{r['params_m']:>6}M {mb:>6.0f} | {'':>10}  " + " ".join(f"{x:>6.0f}" for x in w[:1]) +
              f" {w[1]:>7.0f} " + " ".join(f"{x:>6.0f}" for x in w[2:]) + f" | {'':>9}  " +
              " ".join(f"{x:>6.0f}" for x in rd[:1]) + f" {rd[1]:>7.0f} " + " ".join(f"{x:>6.0f}" for x in rd[2:]))
    for r in rows:
        print(f"{r['params_m']:>6}M ratios vs raw: write mpifed {r['mpifed_write_ratio']:.2f}, +fletcher32 "
              f"{r['mpifed_f32_write_ratio']:.2f}, torch {r['torch_write_ratio']:.2f}, safetensors "
              f"{r['safetensors_write_ratio']:.2f}; read mpifed {r['mpifed_read_ratio']:.2f}, torch "
              f"{r['torch_read_ratio']:.2f}, safetensors {r['safetensors_read_ratio']:.2f}")
    largest = max(rows, key=lambda r: r["params_m"])
    print("RESULT " + json.dumps({
        "write_ratio_vs_raw": largest["mpifed_write_ratio"], "read_ratio_vs_raw": largest["mpifed_read_ratio"],
        "fletcher32_write_ratio_vs_raw": largest["mpifed_f32_write_ratio"],
        "torch_write_ratio_vs_raw": largest["torch_write_ratio"],
        "safetensors_write_ratio_vs_raw": largest["safetensors_write_ratio"],
        "params_m": largest["params_m"], "cold_reads": cold}))


if __name__ == "__main__":
    main()
