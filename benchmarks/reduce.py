"""Benchmark of the federated reduction against flat all-reduces of the same buffer, side by side in one
run (the machine is shared and noisy: only the ratios mean something).

    python benchmarks/reduce.py [--sizes 1,10,50] [--facilities 2,3] [--ranks-per-facility 2]

For each model size (millions of fp32 parameters) and facility count it starts mpiexec itself and
times, as the median of several repetitions (slowest rank each time):
  mpifed R=1        one round of mpifed's reduction, one root per facility
  mpifed R=n        the same with every rank a root (the shard-aligned scheme)
  mpifed R=n sealed the same with the roots' links sealed (AES-256-GCM under a token), as between sites
  MPI Allreduce     one flat MPI_Allreduce of the model over all ranks
  gloo all_reduce   torch.distributed gloo all_reduce of the model over all ranks
and reports bytes between facilities per round (fp32, and int8) against what DDP would send in H=50
steps, and the peak extra memory one reduction allocates (tracemalloc). Then, with one rank per
facility and --traffic-facilities (2, 3, 4, 6), the bytes a root receives in one compressed (int8)
exchange against its payload: the reduce-scatter and all-gather keep it about twice the payload at any
number of facilities. The last line is `RESULT {json}` with ratio_vs_flat (mpifed R=n / MPI Allreduce at
the largest size, the worse facility count), ratio_vs_best_flat (the same over the faster of MPI and
gloo), sealed_vs_plain (mpifed R=n sealed / unsealed, the same size and count), int8_bytes_ratio and compressed_bytes_growth (per-root received bytes at the most facilities
over those at 2).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
H = 50


def worker(sizes: list[int], facilities: int, per: int, reps: int) -> None:
    import numpy as np
    from mpi4py import MPI

    sys.path.insert(0, str(ROOT))
    from mpifed import config
    from mpifed.comm import control, topology
    from mpifed.federation.reduce import Federation

    comm = MPI.COMM_WORLD
    names = [f"f{i}" for i in range(facilities)]
    facility = comm.rank // per

    def timed(fn) -> float:
        times = []
        for _ in range(reps):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            times.append(control.allreduce(comm, [time.perf_counter() - t0], MPI.MAX)[0])
        return statistics.median(times)

    import secrets

    token = control.bcast_str(comm, secrets.token_urlsafe(32) if comm.rank == 0 else None).encode()
    topologies = {r: topology.build(comm, facility, names, r) for r in (1, per)}
    topologies["sealed"] = topology.build(comm, facility, names, per, token)
    topology.start_process_group(comm, "gloo", 600)
    import torch
    import torch.distributed as dist

    rows = []
    for millions in sizes:
        numel = millions * 1_000_000
        model = np.random.default_rng(facility).standard_normal(numel).astype(np.float32)
        rank = topologies[1].facility.rank
        start, stop = numel * rank // per, numel * (rank + 1) // per
        owned, held = [(start, model[start:stop])], [(0, model)]
        row = {"params_m": millions, "facilities": facilities, "ranks": comm.size}
        # R=1 and R=n by name, not by comparing roots with per: with one rank per facility they coincide
        for tag, roots, compress in (("1", 1, "none"), ("n", per, "none"), ("n_sealed", per, "none"),
                                     ("n", per, "int8")):
            fed_cfg = config.FederationConfig(roots=roots, compress=compress, max_norm_ratio=0)
            fed = Federation(topologies["sealed" if tag == "n_sealed" else roots], fed_cfg, numel, owned, held)
            sent = []

            def one_round() -> None:
                model[start:stop] += np.float32(1e-3)  # "training" moved the owned part
                sent.append(fed.synchronise(0, owned, held, 1000, True).bytes_inter)

            if compress == "none":
                row[f"mpifed_R{tag}_s"] = timed(one_round)
                tracemalloc.start()
                base = tracemalloc.get_traced_memory()[0]
                one_round()
                peak = tracemalloc.get_traced_memory()[1] - base
                tracemalloc.stop()
                row[f"peak_extra_mb_R{tag}"] = control.allreduce(comm, [peak], MPI.MAX)[0] / 2 ** 20
            else:
                one_round()
            if tag != "n_sealed":
                row[f"bytes_inter_{compress}"] = int(control.allreduce(comm, [sent[-1]])[0])
            del fed
        flat = np.ones(numel, np.float32)
        row["mpi_allreduce_s"] = timed(lambda: comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM))
        tensor = torch.from_numpy(flat)
        row["gloo_allreduce_s"] = timed(lambda: dist.all_reduce(tensor))
        del flat, tensor, model
        row["ratio_Rn_vs_flat"] = row["mpifed_Rn_s"] / row["mpi_allreduce_s"]
        row["ratio_R1_vs_flat"] = row["mpifed_R1_s"] / row["mpi_allreduce_s"]
        row["sealed_vs_plain"] = row["mpifed_Rn_sealed_s"] / row["mpifed_Rn_s"]
        row["ddp_bytes_H50"] = H * facilities * numel * 4
        row["int8_bytes_ratio"] = row["bytes_inter_int8"] / row["bytes_inter_none"]
        rows.append(row)
    if comm.rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)
    topology.stop_process_group()


def traffic_worker(millions: float) -> None:
    """One int8 exchange, one rank per facility: the most any root received, and its payload."""
    import numpy as np
    from mpi4py import MPI

    sys.path.insert(0, str(ROOT))
    from mpifed import config
    from mpifed.comm import control, topology
    from mpifed.federation.compress import make_codec
    from mpifed.federation.reduce import Federation

    comm = MPI.COMM_WORLD
    numel = int(millions * 1e6)
    topo = topology.build(comm, comm.rank, [f"f{i}" for i in range(comm.size)], 1)
    model = np.random.default_rng(comm.rank).standard_normal(numel).astype(np.float32)
    fed = Federation(topo, config.FederationConfig(compress="int8", max_norm_ratio=0), numel, [(0, model)],
                     [(0, model)])
    model += np.float32(1e-3)
    received = fed.synchronise(0, [(0, model)], [(0, model)], 1000, True).bytes_received
    most = control.allreduce(comm, [received], MPI.MAX)[0]
    if comm.rank == 0:
        print("TRAFFIC " + json.dumps({"facilities": comm.size, "received": int(most),
                                       "payload": make_codec("int8").payload_bytes(numel)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,50", help="model sizes in millions of parameters")
    parser.add_argument("--facilities", default="2,3")
    parser.add_argument("--ranks-per-facility", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--traffic-facilities", default="2,3,4,6")
    parser.add_argument("--traffic-millions", type=float, default=4.0, help="model size of the traffic count")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--traffic-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        worker(sizes, int(args.facilities), args.ranks_per_facility, args.reps)
        return
    if args.traffic_worker:
        traffic_worker(args.traffic_millions)
        return
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    rows = []
    for facilities in [int(f) for f in args.facilities.split(",")]:
        ranks = facilities * args.ranks_per_facility
        print(f"-- {facilities} facilities x {args.ranks_per_facility} ranks: mpiexec -n {ranks}", flush=True)
        out = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, __file__, "--worker", "--sizes", args.sizes,
                              "--facilities", str(facilities), "--ranks-per-facility", str(args.ranks_per_facility),
                              "--reps", str(args.reps)], env=env, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            sys.exit(f"benchmark worker failed ({out.returncode}):\n{out.stderr[-3000:]}")
        rows += json.loads(next(line for line in out.stdout.splitlines() if line.startswith("ROWS "))[5:])
    traffic = []
    for facilities in [int(f) for f in args.traffic_facilities.split(",")]:
        out = subprocess.run([mpiexec, "-n", str(facilities), sys.executable, __file__, "--traffic-worker",
                              "--traffic-millions", str(args.traffic_millions)], env=env, capture_output=True,
                             text=True, timeout=600)
        if out.returncode != 0:
            sys.exit(f"traffic worker failed ({out.returncode}):\n{out.stderr[-3000:]}")
        traffic.append(json.loads(next(line for line in out.stdout.splitlines() if line.startswith("TRAFFIC "))[8:]))
    header = (f"{'params':>7} {'fac':>3} {'ranks':>5} {'R=1 s':>8} {'R=n s':>8} {'MPI s':>8} {'gloo s':>8} "
              f"{'R=n/MPI':>8} {'R=1/MPI':>8} {'sealed':>7} {'inter MB':>9} {'DDP H=50 MB':>12} {'int8/fp32':>9} {'peak R=1':>8} {'R=n MiB':>8}")
    print(header)
    for r in rows:
        print(f"{r['params_m']:>6}M {r['facilities']:>3} {r['ranks']:>5} {r['mpifed_R1_s']:>8.3f} {r['mpifed_Rn_s']:>8.3f} "
              f"{r['mpi_allreduce_s']:>8.3f} {r['gloo_allreduce_s']:>8.3f} {r['ratio_Rn_vs_flat']:>8.2f} "
              f"{r['ratio_R1_vs_flat']:>8.2f} {r['sealed_vs_plain']:>7.2f} {r['bytes_inter_none'] / 1e6:>9.1f} {r['ddp_bytes_H50'] / 1e6:>12.0f} "
              f"{r['int8_bytes_ratio']:>9.3f} {r['peak_extra_mb_R1']:>8.1f} {r['peak_extra_mb_Rn']:>8.1f}")
    print(f"int8 exchange, {args.traffic_millions:g}M parameters, one rank per facility: bytes a root receives / "
          "its payload")
    for t in traffic:
        print(f"  {t['facilities']} facilities: {t['received']:>12,} B  {t['received'] / t['payload']:.3f}x "
              f"(an all-gather of payloads: {t['facilities'] - 1}x)")
    largest = [r for r in rows if r["params_m"] == max(sizes)]
    result = {
        "ratio_vs_flat": max(r["ratio_Rn_vs_flat"] for r in largest),
        "ratio_vs_best_flat": max(r["mpifed_Rn_s"] / min(r["mpi_allreduce_s"], r["gloo_allreduce_s"]) for r in largest),
        "compressed_bytes_growth": round(traffic[-1]["received"] / traffic[0]["received"], 3),
        "compressed_received_vs_payload": {t["facilities"]: round(t["received"] / t["payload"], 3) for t in traffic},
        "ratio_R1_vs_flat": max(r["ratio_R1_vs_flat"] for r in largest),
        "sealed_vs_plain": max(r["sealed_vs_plain"] for r in largest),
        "int8_bytes_ratio": max(r["int8_bytes_ratio"] for r in rows),
        "params_m": max(sizes),
        "facilities": sorted({r["facilities"] for r in rows}),
        "ranks_per_facility": args.ranks_per_facility,
        "inter_bytes_vs_ddp_H50": max(r["bytes_inter_none"] / r["ddp_bytes_H50"] for r in rows),
        "peak_extra_mib_R1": max(r["peak_extra_mb_R1"] for r in largest),
        "peak_extra_mib_Rn": max(r["peak_extra_mb_Rn"] for r in largest),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
