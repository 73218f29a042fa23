"""Peak memory per rank: mpifed against the same engine in a bare training loop, and against `mpifed plan`.

    python benchmarks/memory.py [--hidden 1024] [--layers 8] [--vocab 32000] [--ranks 4] [--roots 4]
                                [--engines fsdp,zero3,replica] [--pairs 3]

A LLaMA of about 0.17B parameters (a config folder, `model.reinit = true`), one facility of `--ranks`
ranks per engine, each rank the root of a 1/ranks segment of the global model (`--roots`, as a large
model is run). mpifed runs 2 rounds with a checkpoint each, then a second launch resumes to round 3;
every rank records its peak resident memory per phase from the OS (VmHWM, reset per phase:
MPIFED_MEMORY_LOG, mpifed/run/memory.py). The bare loop is what a user would write without mpifed:
the model built with `from_config` on every rank, then DDP (for replica), FSDP2's `fully_shard` on
every layer and the root, or `deepspeed.initialize` with ZeRO-3, AdamW, the same micro-batches, the
same number of steps; its peak is the whole run's VmHWM. Both run under mpiexec on the same cores.

A rank's peak moves with the allocator's residue from run to run (about 0.1 GiB at this size), so each
engine is measured in `--pairs` pairs, mpifed then the bare loop, and the ratio reported is the median of
the per-pair ratios.

Ends with `RESULT {json}`: peak_ratio_vs_bare_ENGINE (mpifed's largest rank peak over start, rounds,
checkpoint and resume, over the bare loop's largest; median of pairs) and plan_error (the largest relative
difference between `mpifed plan`'s per-rank peak and the median measured one).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6  # inner steps of each run: 2 rounds of 2 in mpifed, then 1 round of 2 after the resume
MICRO_BATCH, SEQ_LEN = 2, 128


def _high_water() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def bare(engine: str, folder: str, out: str) -> None:
    """One rank of the bare loop (under mpiexec)."""
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    rank, size = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    if engine == "replica":
        model = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step = lambda batch: (model(input_ids=batch, labels=batch).loss.backward(), optimizer.step(),  # noqa: E731
                              optimizer.zero_grad())
    elif engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step = lambda batch: (model(input_ids=batch, labels=batch).loss.backward(), optimizer.step(),  # noqa: E731
                              optimizer.zero_grad())
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4,
                                                                                                "torch_adam": True}}}
        engine_, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())

        def step(batch):
            loss = engine_(input_ids=batch, labels=batch).loss
            engine_.backward(loss)
            engine_.step()
    generator = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        step(torch.randint(0, model.config.vocab_size if engine != "replica" else model.module.config.vocab_size,
                           (MICRO_BATCH, SEQ_LEN), generator=generator))
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"peak": _high_water()}))
    dist.destroy_process_group()


def _ranks_peaks(folder: Path) -> list[dict[str, int]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank-*.json"))]


def measure(engine: str, folder: Path, ranks: int, roots: int, work: Path) -> dict:
    """One pair: mpifed's peak per phase (largest rank), then the bare loop's largest rank peak."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TRANSFORMERS_VERBOSITY": "error"}
    sets = ["--set", f"model.path={folder}", "--set", "model.reinit=true", "--set", f"train.micro_batch={MICRO_BATCH}",
            "--set", f"data.seq_len={SEQ_LEN}", "--set", "eval.facilities=false", "--set", "data.val_sequences=8",
            "--set", "train.threads=1", "--set", f"federation.roots={roots}"]
    if engine == "zero3":
        sets += ["--set", "facility.f0.engine=deepspeed", "--set", "facility.f0.deepspeed.zero_stage=3"]
    else:
        sets += ["--set", f"facility.f0.engine={engine}"]
    simulate = [sys.executable, "-m", "mpifed", "simulate", "--facilities", "1", "--ranks-per-facility", str(ranks),
                "--local-steps", "2", "--out", str(work / "run"), *sets]
    first, second = work / "first", work / "second"
    for log, extra in ((first, ["--rounds", "2", "--overwrite"]), (second, ["--rounds", "3", "--resume", "auto"])):
        done = subprocess.run(simulate + extra, env={**env, "MPIFED_MEMORY_LOG": str(log)}, capture_output=True,
                              text=True)
        if done.returncode != 0:
            sys.exit(f"mpifed {engine} failed:\n{done.stderr[-3000:]}")
    phases: dict[str, int] = {}
    for peaks in _ranks_peaks(first) + _ranks_peaks(second):
        for phase, value in peaks.items():
            phases[phase] = max(phases.get(phase, 0), value)
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    (work / "bare").mkdir()
    done = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, __file__, "--bare", engine,
                           "--folder", str(folder),
                           "--out", str(work / "bare")], env={**env, "MASTER_PORT": str(29500 + os.getpid() % 1000)},
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bare {engine} failed:\n{done.stderr[-3000:]}")
    bare_peak = max(p["peak"] for p in _ranks_peaks(work / "bare"))
    return {"mpifed_phases": phases, "mpifed_peak": max(phases.values()), "bare_peak": bare_peak}


def planned(engine: str, folder: Path, ranks: int, roots: int) -> float:
    """`mpifed plan`'s per-rank peak for the benchmark's configuration."""
    sys.path.insert(0, str(ROOT))
    from mpifed import configfile, plan
    from mpifed.data.corpus import shape
    from mpifed.model import planned_model

    facility = {"name": "f0", "ranks": ranks, "engine": "deepspeed" if engine == "zero3" else engine}
    if engine == "zero3":
        facility["deepspeed"] = {"zero_stage": 3}
    cfg = configfile.from_dict({"model": {"path": str(folder), "reinit": True},
                                "train": {"micro_batch": MICRO_BATCH}, "data": {"seq_len": SEQ_LEN},
                                "federation": {"roots": roots},
                                "facility": [facility]})
    seq_len, vocab = shape(cfg.data)
    model, layout = planned_model(cfg, seq_len, vocab)
    dims = (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size, seq_len)
    return plan.plan_facility(cfg, 0, layout, dims, 0).rank.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--engines", default="fsdp,zero3,replica")
    parser.add_argument("--pairs", type=int, default=3, help="mpifed/bare pairs per engine (the median is reported)")
    parser.add_argument("--roots", type=int, default=0, help="federation.roots (default: one per rank, as for "
                        "a large model: each root holds a 1/ranks segment of the global model)")
    parser.add_argument("--bare", default="", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare(args.bare, args.folder, args.out)
        return
    from transformers import LlamaConfig

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75) // 64 * 64,
                             num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8,
                             vocab_size=args.vocab, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False)
        config.save_pretrained(folder)
        for engine in args.engines.split(","):
            work = Path(tmp) / engine
            work.mkdir()
            pairs = []
            for index in range(args.pairs):
                pair_dir = work / f"pair-{index}"
                pair_dir.mkdir()
                pair = measure(engine, folder, args.ranks, args.roots or args.ranks, pair_dir)
                pairs.append(pair)
                phases = "  ".join(f"{k} {v / 2 ** 30:.2f}" for k, v in pair["mpifed_phases"].items())
                print(f"{engine:<8} pair {index}: mpifed peak {pair['mpifed_peak'] / 2 ** 30:6.2f} GiB ({phases})"
                      f"  bare {pair['bare_peak'] / 2 ** 30:6.2f} GiB"
                      f"  ratio {pair['mpifed_peak'] / pair['bare_peak']:.3f}", flush=True)
            row = {"ratio": statistics.median(p["mpifed_peak"] / p["bare_peak"] for p in pairs),
                   "mpifed_peak": statistics.median(p["mpifed_peak"] for p in pairs),
                   "bare_peak": statistics.median(p["bare_peak"] for p in pairs),
                   "mpifed_phases": {k: statistics.median(p["mpifed_phases"][k] for p in pairs)
                                     for k in pairs[0]["mpifed_phases"]},
                   "plan_peak": planned(engine, folder, args.ranks, args.roots or args.ranks)}
            rows[engine] = row
            print(f"{engine:<8} median ratio {row['ratio']:.3f}  plan {row['plan_peak'] / 2 ** 30:6.2f} GiB"
                  f" ({row['plan_peak'] / row['mpifed_peak'] - 1:+.1%} against the median peak)", flush=True)
    result = {f"peak_ratio_vs_bare_{engine}": round(row["ratio"], 3) for engine, row in rows.items()}
    result["plan_error"] = round(max(abs(row["plan_peak"] / row["mpifed_peak"] - 1) for row in rows.values()), 3)
    result.update(pairs=args.pairs, ranks=args.ranks, roots=args.roots or args.ranks, hidden=args.hidden, layers=args.layers,
                  vocab=args.vocab,
                  peaks_gib={engine: {k: round(v / 2 ** 30, 3) for k, v in row["mpifed_phases"].items()}
                             for engine, row in rows.items()},
                  bare_gib={engine: round(row["bare_peak"] / 2 ** 30, 3) for engine, row in rows.items()},
                  plan_gib={engine: round(row["plan_peak"] / 2 ** 30, 3) for engine, row in rows.items()})
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
