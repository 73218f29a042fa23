"""Benchmark of mpifed's inner loop against a bare PyTorch loop: same model, same data, same threads,
measured side by side in one process per engine (the machine is shared and noisy: only the ratios mean
something).

    python benchmarks/engine_overhead.py [--preset llama-small] [--micro-batch 4] [--seq-len 2048]
                                         [--pairs 12] [--threads N] [--deepspeed-config F]
                                         [--engines replica,fsdp,zero1,zero2,zero3]

For each engine it starts `mpiexec -n 1` (a one-rank facility, as a CPU node trains it), sets both
loops to `--threads` torch threads and times pairs of optimizer steps on the same batch: one of the bare
loop (the model's forward, backward and torch AdamW, nothing else) and one of the engine's
`train_step`, in alternating order. An engine's ratio is the median over the pairs of bare step time /
engine step time, so a slow spell of the machine falls on both halves of a pair. The last line is
`RESULT {json}` with each engine's ratio and min_ratio_vs_bare.

The default workload is 4 sequences of 2,048 tokens per step, a modest step for LLM training.
What an engine adds to a step is nearly fixed (FSDP's buffer copies, ZeRO's gradient buckets, master
copies and gather hooks), while the model's work grows with the tokens: at a toy workload such as
`--micro-batch 8 --seq-len 128` the engines' share is far larger (see the README).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = {"replica": ("replica", 0), "fsdp": ("fsdp", 0), "zero1": ("deepspeed", 1),
           "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}


def worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import numpy as np
    import torch
    from mpi4py import MPI

    # As the trainer does: under mpiexec torch would otherwise pick its own count (1 here, from
    # MPI_LOCALNRANKS), not the one this benchmark reports.
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from mpifed.comm.topology import start_process_group
    from mpifed.config import DeepSpeedConfig
    from mpifed.data.corpus import VOCAB_SIZE
    from mpifed.engines import EngineSettings, make_engine
    from mpifed.model import build_model

    group, _ = start_process_group(MPI.COMM_WORLD)
    name, stage = ENGINES[args.worker]
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.integers(0, 256, (args.micro_batch, args.seq_len))) for _ in range(4)]
    bare_model = build_model(args.preset, args.seq_len, seed=0, vocab_size=VOCAB_SIZE).train()
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-4)
    settings = EngineSettings(group=group, deepspeed=DeepSpeedConfig(zero_stage=stage or 2, config=args.deepspeed_config))
    engine = make_engine(name, build_model(args.preset, args.seq_len, seed=0, vocab_size=VOCAB_SIZE), settings, args.micro_batch)

    def bare(batch: torch.Tensor) -> None:
        bare_model(input_ids=batch, labels=batch).loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    def mpifed(batch: torch.Tensor) -> None:
        engine.train_step([batch], 1e-4)

    def seconds(step, batch: torch.Tensor) -> float:
        start = time.perf_counter()
        step(batch)
        return time.perf_counter() - start

    for batch in batches[:2]:  # warm-up: allocations, lazy initialisation, JIT
        bare(batch)
        mpifed(batch)
    times = {"bare": [], "engine": []}
    loops = (("bare", bare), ("engine", mpifed))
    for i in range(args.pairs):
        batch = batches[i % len(batches)]
        for key, step in loops if i % 2 == 0 else loops[::-1]:
            times[key].append(seconds(step, batch))
    tokens = args.micro_batch * args.seq_len
    print("WORKER " + json.dumps({
        "threads": torch.get_num_threads(),
        "ratio": statistics.median(b / e for b, e in zip(times["bare"], times["engine"])),
        **{key: tokens / statistics.median(values) for key, values in times.items()}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-small")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=12, help="timed pairs of steps (bare, engine) per engine")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of both loops")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--deepspeed-config", default="", help="a DeepSpeed JSON merged over mpifed's defaults")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    ratios = {}
    print(f"engine overhead: {args.preset}, micro-batch {args.micro_batch} x {args.seq_len} tokens, "
          f"{args.pairs} pairs of steps, {args.threads} threads, one rank", flush=True)
    for key in args.engines.split(","):
        command = [mpiexec, "-n", "1", sys.executable, __file__, *sys.argv[1:], "--worker", key]  # same options
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
        line = next((l for l in result.stdout.splitlines() if l.startswith("WORKER ")), None)
        if result.returncode != 0 or line is None:
            sys.exit(f"{key} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        measured = json.loads(line.removeprefix("WORKER "))
        if measured["threads"] != args.threads:
            sys.exit(f"{key}: torch ran {measured['threads']} threads, not {args.threads}")
        ratios[key] = measured["ratio"]
        print(f"  {key:8s} bare {measured['bare']:9,.0f} tok/s   mpifed {measured['engine']:9,.0f} tok/s   "
              f"ratio {ratios[key]:.3f}", flush=True)
    print("RESULT " + json.dumps({"preset": args.preset, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
                                  "tokens_per_step": args.micro_batch * args.seq_len, "threads": args.threads,
                                  "ratios": {k: round(v, 3) for k, v in ratios.items()},
                                  "min_ratio_vs_bare": round(min(ratios.values()), 3)}))


if __name__ == "__main__":
    main()
