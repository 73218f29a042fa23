"""Benchmark of mpifed's HDF5 checkpoints against other ways to put the same bytes on disk, side by side
in one run (the machine is shared and the disk noisy: only ratios of neighbouring runs mean something).

    python benchmarks/checkpoint.py [--sizes 10,100] [--pairs 7] [--writers 2] [--dir DIR]

For each model size (millions of fp32 parameters, in tensors of about 1M like a real model) it runs
--pairs rounds; in each, every way below writes the same model (then reads it back, cold where the
page cache can be dropped), in an order that rotates from round to round, each into a freshly emptied
folder, everything fsynced:
  raw          numpy tofile / fromfile of one flat buffer (the disk's limit here)
  mpifed       checkpoint.write_main (write with hashes, fsync, reopen and check, publish) / read_flat
  mpifed+f32   the same with HDF5's fletcher32 filter
  part         a facility part as a run writes it: checkpoint.part_writer fed in 64 MB buckets
  torch        torch.save / torch.load(weights_only=True) of the tensors
  safetensors  safetensors save_file / load_file
A ratio is raw's time over the other's in the same round; the figure is the median over rounds. Then
the parallel case: --writers processes at once, each the root of its own segment of the model
(checkpoint.write_segment, as with federation.roots = --writers) against as many raw writers of the
same segments, alternating, the median of the pairs' ratios of the slowest writer's time.
The last line is `RESULT {json}`: write_ratio_vs_raw, read_ratio_vs_raw, parallel_write_ratio_vs_raw
(at the largest size) and the others' ratios.
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
from typing import Callable

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


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _model(millions: int) -> tuple[FlatLayout, np.ndarray]:
    slots, offset = [], 0
    for i in range(millions):
        slots.append(ParamSlot(f"layers.{i}.weight", (1000, 1000), "float32", offset))
        offset += 1_000_000
    return FlatLayout(tuple(slots)), np.random.default_rng(0).standard_normal(offset).astype(np.float32)


def measure(millions: int, pairs: int, folder: Path, cold: bool) -> dict:
    """Median ratios (raw / way) of single-writer writes and reads over `pairs` rotating rounds."""
    import torch
    from safetensors.numpy import load_file, save_file

    layout, flat = _model(millions)
    numel = len(flat)
    tensors = {s.name: v for s, v in zip(layout.slots, layout.unflatten(flat).values())}
    attrs = dict(tokens=0, model_config="{}", facilities="[]", config="")
    main = folder / checkpoint.main_name(1)
    bucket = 16 * 2 ** 20  # values: 64 MB

    def mpifed_write(f32: bool) -> Callable[[], None]:
        def write() -> None:
            checkpoint.publish(checkpoint.write_main(folder, 1, attrs, layout, [(0, numel)], [], [], model=flat,
                                                     outer={}, fletcher32=f32))
        return write

    def part_write() -> None:
        writer = checkpoint.part_writer(folder, 1, "f0", {}, {}, {"optimizer/exp_avg": numel})
        for lo in range(0, numel, bucket):
            writer.write("optimizer/exp_avg", lo, flat[lo:lo + bucket])
        writer.close().commit()

    def torch_write() -> None:
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / "t.pt")
        _fsync(folder / "t.pt")

    def st_write() -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "m.safetensors"))
        _fsync(folder / "m.safetensors")

    def raw_write() -> None:
        flat.tofile(folder / "raw.bin")
        _fsync(folder / "raw.bin")

    ways: dict[str, tuple[Callable[[], None], Callable[[], object]]] = {
        "raw": (raw_write, lambda: np.fromfile(folder / "raw.bin", dtype=np.float32)),
        "mpifed": (mpifed_write(False), lambda: checkpoint.read_flat(main, layout, "model")),
        "mpifed_f32": (mpifed_write(True), lambda: checkpoint.read_flat(main, layout, "model")),
        "part": (part_write, lambda: checkpoint.read_range(folder / checkpoint.facility_name(1, "f0"),
                                                           "optimizer/exp_avg", 0, numel)),
        "torch": (torch_write, lambda: torch.load(folder / "t.pt", weights_only=True)),
        "safetensors": (st_write, lambda: load_file(str(folder / "m.safetensors"))),
    }
    names = list(ways)
    ratios: dict[str, list[float]] = {f"{n}_{k}": [] for n in names[1:] for k in ("write", "read")}
    speeds: dict[str, list[float]] = {f"{n}_{k}": [] for n in names for k in ("write", "read")}
    for round_ in range(pairs):
        seconds = {}
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            write, read = ways[name]
            _empty(folder)
            t0 = time.perf_counter()
            write()
            seconds[f"{name}_write"] = time.perf_counter() - t0
            if cold:
                _drop_caches()
            t0 = time.perf_counter()
            back = read()
            seconds[f"{name}_read"] = time.perf_counter() - t0
            if name in ("raw", "mpifed", "part"):
                assert np.array_equal(back, flat), name
        for key in ratios:
            ratios[key].append(seconds[f"raw_{key.rsplit('_', 1)[1]}"] / seconds[key])
        for key in speeds:
            speeds[key].append(flat.nbytes / 1e6 / seconds[key])
    _empty(folder)
    row: dict = {"params_m": millions, "bytes": flat.nbytes}
    row.update({f"{key}_ratio": _median(values) for key, values in ratios.items()})
    row.update({f"{key}_mb_s": _median(values) for key, values in speeds.items()})
    return row


def _empty(folder: Path) -> None:
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _parallel_writer(kind: str, folder: str, r: int, start: int, stop: int, go, done) -> None:
    """One of the parallel writers (a forked process): waits for `go`, writes its segment, reports."""
    values = np.random.default_rng(r).standard_normal(stop - start).astype(np.float32)
    go.wait()
    t0 = time.perf_counter()
    if kind == "mpifed":
        checkpoint.write_segment(Path(folder), 1, r, start, values, {})
    else:
        path = Path(folder) / f"raw-{r}.bin"
        values.tofile(path)
        _fsync(path)
    done.put(time.perf_counter() - t0)


def measure_parallel(millions: int, pairs: int, writers: int, folder: Path) -> dict:
    """Median ratio of the slowest of `writers` raw writers over the slowest of as many mpifed roots."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    numel = millions * 1_000_000
    bounds = np.linspace(0, numel, writers + 1).astype(int)

    def once(kind: str) -> float:
        _empty(folder)
        go, done = context.Event(), context.Queue()
        procs = [context.Process(target=_parallel_writer,
                                 args=(kind, str(folder), r, bounds[r], bounds[r + 1], go, done))
                 for r in range(writers)]
        for proc in procs:
            proc.start()
        time.sleep(0.5)  # every writer has made its values
        go.set()
        slowest = max(done.get(timeout=600) for _ in procs)
        for proc in procs:
            proc.join()
            if proc.exitcode:
                sys.exit(f"a {kind} writer failed (exit {proc.exitcode})")
        return slowest

    ratios = []
    for pair in range(pairs):
        order = ("raw", "mpifed") if pair % 2 == 0 else ("mpifed", "raw")
        seconds = {kind: once(kind) for kind in order}
        ratios.append(seconds["raw"] / seconds["mpifed"])
    _empty(folder)
    return {"parallel_write_ratio": _median(ratios), "writers": writers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100", help="model sizes in millions of parameters")
    parser.add_argument("--pairs", type=int, default=7, help="rounds of every way side by side")
    parser.add_argument("--writers", type=int, default=2, help="writers at once in the parallel case")
    parser.add_argument("--dir", default=None, help="folder on the file system to measure (default: a temp dir)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mpifed-ckpt-bench-", dir=args.dir))
    cold = _drop_caches()
    print(f"writing to {folder}; reads {'cold (page cache dropped)' if cold else 'from the page cache'}; "
          f"median of {args.pairs} rounds")
    try:
        rows = [measure(int(m), args.pairs, folder, cold) for m in args.sizes.split(",")]
        largest = max(rows, key=lambda r: r["params_m"])
        largest.update(measure_parallel(largest["params_m"], args.pairs, args.writers, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ways = ("raw", "mpifed", "mpifed_f32", "part", "torch", "safetensors")
    print(f"{'params':>7} {'MB':>6} | write MB/s: " + " ".join(f"{w:>11}" for w in ways))
    for r in rows:
        print(f"{r['params_m']:>6}M {r['bytes'] / 1e6:>6.0f} |             " +
              " ".join(f"{r[f'{w}_write_mb_s']:>11.0f}" for w in ways))
        print(f"{'':>14} | read MB/s:  " + " ".join(f"{r[f'{w}_read_mb_s']:>11.0f}" for w in ways))
        print(f"{'':>14} | vs raw:     {'':>11} " +
              " ".join(f"{r[f'{w}_write_ratio']:>5.2f}/{r[f'{w}_read_ratio']:<5.2f}" for w in ways[1:]) +
              "  (write/read, median of per-round ratios)")
    print(f"{largest['params_m']}M with {largest['writers']} writers at once: mpifed roots vs raw writers "
          f"{largest['parallel_write_ratio']:.2f} (median of pairs)")
    print("RESULT " + json.dumps({
        "write_ratio_vs_raw": round(largest["mpifed_write_ratio"], 3),
        "read_ratio_vs_raw": round(largest["mpifed_read_ratio"], 3),
        "parallel_write_ratio_vs_raw": round(largest["parallel_write_ratio"], 3),
        "part_write_ratio_vs_raw": round(largest["part_write_ratio"], 3),
        "fletcher32_write_ratio_vs_raw": round(largest["mpifed_f32_write_ratio"], 3),
        "torch_write_ratio_vs_raw": round(largest["torch_write_ratio"], 3),
        "safetensors_write_ratio_vs_raw": round(largest["safetensors_write_ratio"], 3),
        "params_m": largest["params_m"], "writers": largest["writers"], "pairs": args.pairs, "cold_reads": cold}))


if __name__ == "__main__":
    main()
