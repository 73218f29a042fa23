"""Benchmark of mpifed's inner loop against a bare PyTorch loop: same model, same data, same threads,
measured side by side in one process per engine (the machine is shared and noisy: only the ratios mean
something).

    python benchmarks/engine_overhead.py [--preset llama-small] [--steps 8] [--blocks 4]
                                         [--engines replica,fsdp,zero1,zero2,zero3] [--deepspeed-config F]

For each engine it starts `mpiexec -n 1` (a one-rank facility, as a CPU node trains it) and alternates
blocks of `--steps` optimizer steps: the bare loop (the model's forward, backward and torch AdamW,
nothing else) and the engine's `train_step`. tokens/s ratio = median of engine blocks / median of
bare blocks. The last line is `RESULT {json}` with each engine's ratio and min_ratio_vs_bare.
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


def worker(engine_key: str, preset: str, steps: int, blocks: int, micro_batch: int, seq_len: int,
           ds_config: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import numpy as np
    import torch
    from mpi4py import MPI

    sys.path.insert(0, str(ROOT))
    from mpifed.config import DeepSpeedConfig
    from mpifed.engines import EngineSettings, make_engine
    from mpifed.model import build_model
    from mpifed.topology import start_process_group

    start_process_group(MPI.COMM_WORLD)
    name, stage = ENGINES[engine_key]
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.integers(0, 256, (micro_batch, seq_len))) for _ in range(steps)]
    bare_model = build_model(preset, seq_len, seed=0)
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-4)
    settings = EngineSettings(deepspeed=DeepSpeedConfig(zero_stage=stage or 2, config=ds_config))
    engine = make_engine(name, build_model(preset, seq_len, seed=0), settings, micro_batch)

    def bare() -> None:
        bare_model.train()
        for batch in batches:
            bare_model(input_ids=batch, labels=batch).loss.backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)

    def mpifed() -> None:
        for batch in batches:
            engine.train_step([batch], 1e-4)

    def timed(loop) -> float:
        start = time.perf_counter()
        loop()
        return steps * micro_batch * seq_len / (time.perf_counter() - start)

    bare(), mpifed()  # warm-up: allocations, lazy initialisation, JIT
    rates = {"bare": [], "engine": []}
    for _ in range(blocks):
        rates["bare"].append(timed(bare))
        rates["engine"].append(timed(mpifed))
    print("WORKER " + json.dumps({k: statistics.median(v) for k, v in rates.items()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--deepspeed-config", default="", help="a DeepSpeed JSON merged over mpifed's defaults")
    parser.add_argument("--worker", default="")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.preset, args.steps, args.blocks, args.micro_batch, args.seq_len, args.deepspeed_config)
        return
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    threads = os.cpu_count()
    ratios, rates = {}, {}
    print(f"engine overhead: {args.preset}, micro-batch {args.micro_batch} x {args.seq_len} tokens, "
          f"{args.blocks} blocks of {args.steps} steps, {threads} threads, one rank")
    for key in args.engines.split(","):
        command = [mpiexec, "-n", "1", sys.executable, __file__, "--worker", key, "--preset", args.preset,
                   "--steps", str(args.steps), "--blocks", str(args.blocks), "--micro-batch", str(args.micro_batch),
                   "--seq-len", str(args.seq_len), "--deepspeed-config", args.deepspeed_config]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        line = next((l for l in result.stdout.splitlines() if l.startswith("WORKER ")), None)
        if result.returncode != 0 or line is None:
            sys.exit(f"{key} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        measured = json.loads(line.removeprefix("WORKER "))
        ratios[key] = measured["engine"] / measured["bare"]
        rates[key] = measured
        print(f"  {key:8s} bare {measured['bare']:9,.0f} tok/s   mpifed {measured['engine']:9,.0f} tok/s   "
              f"ratio {ratios[key]:.3f}", flush=True)
    print("RESULT " + json.dumps({"preset": args.preset, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
                                  "threads": threads, "ratios": {k: round(v, 3) for k, v in ratios.items()},
                                  "min_ratio_vs_bare": round(min(ratios.values()), 3)}))


if __name__ == "__main__":
    main()
