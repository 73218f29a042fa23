"""Does federated training learn as well as centralized training? A parity study at equal tokens and
equal inner steps, every run a real `mpifed simulate` on this machine:

  centralized   one facility of F ranks, gradients averaged every step (the replica engine is DDP)
  federated     F facilities of one rank each: fedavg and diloco, fp32 and int8, at two values of H
  alone         one facility of one rank (what a site gets without federating: 1/F of the tokens)

Every run uses the same model, seed, inner AdamW, cosine schedule and number of inner steps, and is
scored on the same validation split. The table gives each run's final validation loss and perplexity,
its perplexity over the centralized run's, the bytes it moved between sites against what data-parallel
training across the sites would move (one fp32 gradient per site per step), and its wall time. The
report of all runs (`mpifed report`) is written beside the runs.

    python benchmarks/parity.py [--facilities 4] [--steps 120] [--h 10,40] [--data DIR] [--out DIR]
                                [--variant NAME=SECTION.KEY=VALUE,...]

Ends with `RESULT {json}`: ppl_ratio_best_federated_vs_centralized, bytes_ratio_vs_ddp (of that run),
ppl_ratio_alone_vs_centralized, ppl_ratio_default_diloco_vs_centralized (the shipped defaults).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """One training run of the study: its name, facilities x ranks, and the settings it overrides."""

    name: str
    facilities: int
    ranks: int
    h: int
    sets: tuple[str, ...] = ()

    def command(self, args: argparse.Namespace, out: Path) -> list[str]:
        rounds = args.steps // self.h
        base = [sys.executable, "-m", "mpifed", "simulate", "--facilities", str(self.facilities),
                "--ranks-per-facility", str(self.ranks), "--rounds", str(rounds), "--local-steps", str(self.h),
                "--seed", str(args.seed), "--out", str(out / self.name), "--overwrite",
                "--set", f"model.preset={args.preset}", "--set", f"train.micro_batch={args.micro_batch}",
                "--set", f"train.lr={args.lr}", "--set", "train.schedule=cosine",
                "--set", f"train.min_lr={args.lr / 10}", "--set", f"train.warmup_steps={args.warmup}",
                "--set", "eval.facilities=false", "--set", f"data.val_sequences={args.val_sequences}"]
        if args.data:
            base += ["--set", f"data.path={args.data}"]
        for f in range(self.facilities):
            base += ["--set", f"facility.f{f}.engine=replica"]
        for item in self.sets:
            base += ["--set", item]
        return base


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run of the study, centralized first (the others are compared with it), alone last."""
    f, (h_small, h_large) = args.facilities, args.h
    runs = [Run("centralized", 1, f, h_small)]
    for h in (h_small, h_large):
        for outer in ("fedavg", "diloco"):
            for compress in ("none", "int8"):
                runs.append(Run(f"{outer}-{compress}-h{h}", f, 1, h,
                                (f"federation.outer={outer}", f"federation.compress={compress}")))
    for variant in args.variant:  # NAME=KEY=VALUE,KEY=VALUE: more federated runs, at both values of H
        name, _, sets = variant.partition("=")
        for h in (h_small, h_large):
            runs.append(Run(f"{name}-h{h}", f, 1, h, tuple(sets.split(","))))
    runs.append(Run("alone", 1, 1, h_small))
    return runs


def finished(folder: Path, rounds: int) -> bool:
    """Whether `folder` holds a run that completed all its rounds (one killed midway is run again)."""
    metrics = folder / "metrics.jsonl"
    return metrics.exists() and len([line for line in metrics.read_text().splitlines() if line.strip()]) == rounds


def last_metrics(folder: Path) -> tuple[dict, int]:
    """A finished run's last metrics line, and the bytes it moved between sites in all."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return lines[-1], sum(line["bytes_inter"] for line in lines)


def model_bytes(folder: Path) -> int:
    """fp32 bytes of the exchanged model, from a run's newest checkpoint."""
    sys.path.insert(0, str(ROOT))
    from mpifed.checkpoint import format as checkpoint

    return 4 * checkpoint.verify(folder / (folder / "latest").read_text().strip(), check_data=False).layout.numel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facilities", type=int, default=4, help="F: sites of the federated runs")
    parser.add_argument("--preset", default="llama-small")
    parser.add_argument("--steps", type=int, default=120, help="inner steps of every run (a multiple of each H)")
    parser.add_argument("--h", default="10,40", help="the two values of H (local steps per round)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak inner learning rate (cosine to a tenth)")
    parser.add_argument("--warmup", type=int, default=10, help="inner warmup steps")
    parser.add_argument("--val-sequences", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="", help="a folder from `mpifed data prepare` (default: the embedded text)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SECTION.KEY=VALUE,...",
                        help="more federated runs (at both H) with these settings, e.g. "
                             "warm=federation.outer=diloco,federation.outer_warmup=4 (repeatable)")
    parser.add_argument("--out", default="run/parity", help="folder for the runs and the report")
    parser.add_argument("--only", default="", help="comma-separated run names to run again; finished runs are read")
    args = parser.parse_args()
    args.h = tuple(int(h) for h in args.h.split(","))
    if len(args.h) != 2 or any(args.steps % h for h in args.h):
        parser.error(f"--h: give two values that divide --steps {args.steps}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    runs = plan(args)
    only = set(filter(None, args.only.split(",")))
    rows = []
    for run in runs:
        folder = out / run.name
        if run.name in only or not finished(folder, args.steps // run.h):
            t0 = time.perf_counter()
            result = subprocess.run(run.command(args, out), capture_output=True, text=True, env=env,
                                    stdin=subprocess.DEVNULL)
            if result.returncode != 0:
                sys.exit(f"parity: {run.name} failed:\n{result.stderr[-3000:]}")
            (folder / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
        last, moved = last_metrics(folder)
        wall = float((folder / "wall_s.txt").read_text()) if (folder / "wall_s.txt").exists() else float("nan")
        rows.append({"run": run.name, "facilities": run.facilities, "ranks": run.ranks, "h": run.h,
                     "val_loss": last["val_loss"], "val_ppl": math.exp(last["val_loss"]),
                     "tokens": last["tokens_total"], "bytes_inter": moved, "wall_s": wall})
        print(f"parity: {run.name:<22} val_loss {last['val_loss']:.4f}  ppl {math.exp(last['val_loss']):8.2f}  "
              f"tokens {last['tokens_total']:,}  between sites {moved / 1e6:9.1f} MB  wall {wall:6.1f} s", flush=True)
    central = next(r for r in rows if r["run"] == "centralized")
    ddp_bytes = args.facilities * args.steps * model_bytes(out / "centralized")
    for row in rows:
        row["ppl_ratio"] = row["val_ppl"] / central["val_ppl"]
        row["bytes_ratio_vs_ddp"] = row["bytes_inter"] / ddp_bytes if row["facilities"] > 1 else None
    federated = [r for r in rows if r["facilities"] > 1]
    best = min(federated, key=lambda r: r["val_ppl"])
    default_diloco = next(r for r in rows if r["run"] == f"diloco-none-h{args.h[0]}")
    print(f"\n{'run':<22} {'H':>4} {'val loss':>9} {'ppl':>8} {'ppl/central':>12} {'bytes/DDP':>10} {'wall s':>7}")
    for r in rows:
        ratio = f"{r['bytes_ratio_vs_ddp']:.4f}" if r["bytes_ratio_vs_ddp"] is not None else "-"
        print(f"{r['run']:<22} {r['h']:>4} {r['val_loss']:>9.4f} {r['val_ppl']:>8.2f} {r['ppl_ratio']:>12.3f} "
              f"{ratio:>10} {r['wall_s']:>7.1f}")
    report = subprocess.run([sys.executable, "-m", "mpifed", "report", *[str(out / r["run"]) for r in rows],
                             "--out", str(out / "report.html"), "--png", str(out / "report.png")],
                            capture_output=True, text=True, env=env)
    print(f"parity: report {'written to ' + str(out / 'report.html') if report.returncode == 0 else 'failed: ' + report.stderr.strip()}")
    (out / "parity.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("RESULT " + json.dumps({
        "ppl_ratio_best_federated_vs_centralized": best["ppl_ratio"], "best_federated": best["run"],
        "bytes_ratio_vs_ddp": best["bytes_ratio_vs_ddp"],
        "ppl_ratio_alone_vs_centralized": next(r for r in rows if r["run"] == "alone")["ppl_ratio"],
        "ppl_ratio_default_diloco_vs_centralized": default_diloco["ppl_ratio"],
        "facilities": args.facilities, "preset": args.preset, "steps": args.steps, "h": list(args.h),
        "tokens_per_run": central["tokens"]}))


if __name__ == "__main__":
    main()
