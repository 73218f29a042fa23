"""Does federated training learn as well as centralized training? A parity study at equal tokens and
equal inner steps, over several seeds, every run a real `mpifed simulate` on this machine:

  centralized   one facility of F ranks, gradients averaged every step (the replica engine is DDP)
  federated     F facilities of one rank each: FedAvg at two values of H with int8 and int4 between
                sites, and DiLoCo's Nesterov with an outer warm-up (a tenth of the rounds), fp32 and int4
  alone         one facility of one rank on its own partition (what a site gets without federating)

The corpus is one no run sees twice: the docstrings of the standard library and of every package
installed beside mpifed (transformers, torch, numpy, pandas, sympy, ...), each distinct docstring once,
written as JSON lines and prepared with `mpifed data prepare` (a byte-level BPE trained on it). It is
built on the machine that runs the study, offline, so its content differs with the installed versions:
its digest and size are in the RESULT. The centralized run trains on one partition holding every
training sequence; the federated runs on F disjoint partitions of the same sequences; all of them are
scored on the same validation sequences.

Every run uses the same model, inner AdamW, cosine schedule and number of inner steps. Each is scored
every --eval-steps inner steps, so the gap to centralized is a curve against tokens (points before the
last are taken mid-schedule, at a learning rate still above the final one). The table gives each run's
seed-mean perplexity, its spread over seeds, its ratio to centralized (seed-mean over seed-mean), and
the bytes it moved between sites against what data-parallel training across the sites would move (a
ring all-reduce of the fp32 gradient every step: each site sends 2 (F - 1) / F of it). `mpifed report`
of the first seed's runs is written beside them, with each run's perplexity over centralized's at equal
tokens.

    python benchmarks/parity.py [--quick] [--seeds 0,1,2] [--steps 2400] [--h 10,50] [--out DIR]

A run already finished in OUT is read, not run again; `--runs` picks configurations and `--report-only`
summarises what has finished. Ends with `RESULT {json}`: the best federated run within --bytes-budget
of DDP's bytes and its ppl_ratio (seed means), the same for the best run at any budget, alone's ratio,
each run's ratio, per-seed range and number of seeds, the best run's curve, the corpus digest, and the
wall time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


# ------------------------------------------------------------------------------------------- corpus
def _sources() -> list[tuple[str, Path]]:
    """(name, folder) of the standard library and of every package installed beside transformers."""
    import transformers

    out = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    site = Path(transformers.__file__).resolve().parent.parent
    out += [(p.name, p) for p in sorted(site.iterdir())
            if p.is_dir() and (p / "__init__.py").exists() and not p.name.startswith("_")]
    return out


def build_corpus(folder: Path, facilities: int, vocab: int) -> dict:
    """Write the docstring corpus as JSON lines (one file per source) and prepare it twice with the same
    tokenizer: `all` (one partition) and `split` (one per facility). Reused when already built."""
    from mpifed.data.corpus import tree_docstrings

    info_path = folder / "corpus.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("facilities") == facilities and info.get("vocab") == vocab:
            return info
    t0 = time.perf_counter()
    text_dir = folder / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    digest = hashlib.sha256()
    sizes = {}
    for name, path in _sources():
        # docstrings under 64 characters are mostly "Returns x.": left out
        docs = [d for d in tree_docstrings(path) if len(d) >= 64 and d not in seen]
        seen.update(docs)
        if not docs:
            continue
        lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
        (text_dir / f"{name}.jsonl").write_text(lines, encoding="utf-8")
        digest.update(lines.encode())
        sizes[name] = sum(len(d.encode()) for d in docs)
    for partitions, out, tokenizer in ((1, "all", ["--train-bpe", str(vocab)]),
                                       (facilities, "split", ["--tokenizer", str(folder / "all" / "tokenizer")])):
        cmd = [sys.executable, "-m", "mpifed", "data", "prepare", str(text_dir), *tokenizer, "--seq-len", "128",
               "--partitions", str(partitions), "--out", str(folder / out), "--overwrite"]
        result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            sys.exit(f"parity: preparing the corpus failed:\n{result.stderr[-3000:]}")
    manifest = json.loads((folder / "all" / "manifest.json").read_text())
    info = {"sha256": digest.hexdigest()[:16], "mb": round(sum(sizes.values()) / 1e6, 2), "sources": len(sizes),
            "tokens": manifest["total_tokens"] + manifest["validation"]["tokens"],
            "train_tokens": manifest["total_tokens"], "vocab": vocab, "facilities": facilities,
            "build_s": round(time.perf_counter() - t0, 1)}
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return info


# --------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One configuration of the study: its name, facilities x ranks, H, and the settings it overrides."""

    name: str
    facilities: int
    ranks: int
    h: int
    sets: tuple[str, ...] = ()

    def command(self, args: argparse.Namespace, seed: int, out: Path, data: dict[str, Path]) -> list[str]:
        rounds = args.steps // self.h
        cmd = [sys.executable, "-m", "mpifed", "simulate", "--facilities", str(self.facilities),
               "--ranks-per-facility", str(self.ranks), "--rounds", str(rounds), "--local-steps", str(self.h),
               "--seed", str(seed), "--out", str(out), "--overwrite",
               "--set", f"model.preset={args.preset}", "--set", f"train.micro_batch={args.micro_batch}",
               "--set", f"train.lr={args.lr}", "--set", "train.schedule=cosine",
               "--set", f"train.min_lr={args.lr / 10}", "--set", f"train.warmup_steps={args.warmup}",
               "--set", "eval.facilities=false", "--set", f"eval.every={args.eval_steps // self.h}",
               "--set", f"data.val_sequences={args.val_sequences}",
               "--set", f"checkpoint.every={rounds}", "--set", "checkpoint.keep=1"]
        if data:
            cmd += ["--set", f"data.path={data['all' if self.ranks > 1 else 'split']}"]
        for f in range(self.facilities):
            cmd += ["--set", f"facility.f{f}.engine=replica"]
        for item in self.sets:
            cmd += ["--set", item]
        return cmd


def plan(args: argparse.Namespace) -> list[Run]:
    """Every configuration, centralized first (the others are compared with it), alone last."""
    f, (h_small, h_large) = args.facilities, args.h
    runs = [Run("centralized", 1, f, h_small)]
    for h in (h_small, h_large):
        for compress in ("int8", "int4"):
            runs.append(Run(f"fedavg-{compress}-h{h}", f, 1, h,
                            ("federation.outer=fedavg", f"federation.compress={compress}")))
    warmup = max(1, args.steps // h_small // 10)  # a tenth of the rounds
    for compress in ("none", "int4"):
        runs.append(Run(f"diloco-warm{'' if compress == 'none' else '-' + compress}-h{h_small}", f, 1, h_small,
                        ("federation.outer=diloco", f"federation.outer_warmup={warmup}",
                         f"federation.compress={compress}")))
    for variant in args.variant:  # NAME=KEY=VALUE,KEY=VALUE: more federated runs, at the smaller H
        name, _, sets = variant.partition("=")
        runs.append(Run(f"{name}-h{h_small}", f, 1, h_small, tuple(sets.split(","))))
    runs.append(Run("alone", 1, 1, h_small, ("facility.f0.partition=0",)))  # the first site's own data
    chosen = set(filter(None, args.runs.split(",")))
    return [r for r in runs if not chosen or r.name in chosen or r.name == "centralized"]


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def finished(folder: Path, rounds: int) -> bool:
    """Whether `folder` holds a run that completed all its rounds (one killed midway is run again)."""
    return (folder / "metrics.jsonl").exists() and (folder / "wall_s.txt").exists() \
        and len(read_metrics(folder)) == rounds


def curve(folder: Path, h: int) -> dict[int, float]:
    """Inner step -> validation loss at every evaluated round."""
    return {m["round"] * h: m["val_loss"] for m in read_metrics(folder) if m.get("val_loss") is not None}


def model_bytes(folder: Path) -> int:
    """fp32 bytes of the exchanged model, from a run's newest checkpoint."""
    from mpifed.checkpoint import format as checkpoint

    return 4 * checkpoint.verify(folder / (folder / "latest").read_text().strip(), check_data=False).layout.numel


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


# --------------------------------------------------------------------------------------------- main
def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes: one seed, 300 steps, and the embedded text unless --data is given")
    parser.add_argument("--facilities", type=int, default=4, help="F: sites of the federated runs")
    parser.add_argument("--preset", default="llama-tiny")
    parser.add_argument("--steps", type=int, default=2400, help="inner steps of every run (a multiple of each H)")
    parser.add_argument("--h", default="10,50", help="the two values of H (local steps per round)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; every configuration runs each")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak inner learning rate (cosine to a tenth)")
    parser.add_argument("--warmup", type=int, default=50, help="inner warmup steps")
    parser.add_argument("--eval-steps", type=int, default=100, help="score every this many inner steps")
    parser.add_argument("--val-sequences", type=int, default=256)
    parser.add_argument("--data", default="docs", choices=("docs", "embedded"),
                        help="docs: the docstring corpus (built in OUT/corpus); embedded: mpifed's default text")
    parser.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary of the docstring corpus")
    parser.add_argument("--bytes-budget", type=float, default=0.02,
                        help="the headline's best run moves at most this share of DDP's bytes")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SECTION.KEY=VALUE,...",
                        help="more federated runs (at the smaller H) with these settings (repeatable)")
    parser.add_argument("--out", default="run/parity", help="folder for the runs, the corpus and the report")
    parser.add_argument("--only", default="", help="comma-separated run names to run again; finished runs are read")
    parser.add_argument("--runs", default="", help="comma-separated configurations to run (centralized always)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: summarise the finished runs of --seeds (each row says how many)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.warmup = 300, "0", 20
        args.data = "embedded" if "--data" not in sys.argv else args.data
    args.h = tuple(int(h) for h in args.h.split(","))
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if len(args.h) != 2 or any(args.steps % h or args.eval_steps % h for h in args.h):
        parser.error(f"--h: give two values that divide --steps {args.steps} and --eval-steps {args.eval_steps}")
    return args


def main() -> None:
    args = parse()
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus, data = {"name": "embedded"}, {}
    if args.data == "docs":
        corpus = {"name": "docstrings", **build_corpus(out / "corpus", args.facilities, args.vocab)}
        data = {"all": out / "corpus" / "all", "split": out / "corpus" / "split"}
        print(f"parity: corpus {corpus['mb']} MB of docstrings from {corpus['sources']} sources, "
              f"{corpus['tokens']:,} tokens, sha256 {corpus['sha256']}", flush=True)
    runs = plan(args)
    only = set(filter(None, args.only.split(",")))
    for seed in args.seeds:
        for run in runs:
            folder = out / f"{run.name}-s{seed}"
            if args.report_only and not finished(folder, args.steps // run.h):
                continue
            if run.name in only or not finished(folder, args.steps // run.h):
                t0 = time.perf_counter()
                result = subprocess.run(run.command(args, seed, folder, data), capture_output=True, text=True,
                                        env=ENV, stdin=subprocess.DEVNULL)
                if result.returncode != 0:
                    sys.exit(f"parity: {run.name} seed {seed} failed:\n{result.stderr[-3000:]}")
                (folder / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
            last = read_metrics(folder)[-1]
            print(f"parity: {run.name:<18} seed {seed}  val_loss {last['val_loss']:.4f}  "
                  f"ppl {math.exp(last['val_loss']):8.3f}  tokens {last['tokens_total']:,}  "
                  f"wall {float((folder / 'wall_s.txt').read_text()):6.1f} s", flush=True)

    # data parallelism across the sites: a ring all-reduce of the fp32 gradient every step, in which each
    # of F sites sends 2 (F - 1) / F of it, as the federated runs' roots send their payload twice over
    ddp_bytes = args.steps * 2 * (args.facilities - 1) * model_bytes(out / f"centralized-s{args.seeds[0]}")
    rows, curves = [], {}
    central_seeds = [s for s in args.seeds if finished(out / f"centralized-s{s}", args.steps // args.h[0])]
    for run in runs:
        seeds = [s for s in central_seeds if finished(out / f"{run.name}-s{s}", args.steps // run.h)]
        if not seeds:
            continue
        folders = [out / f"{run.name}-s{seed}" for seed in seeds]
        ppls = [math.exp(read_metrics(f)[-1]["val_loss"]) for f in folders]
        per_seed = [curve(f, run.h) for f in folders]
        steps = sorted(set.intersection(*(set(c) for c in per_seed)))
        curves[run.name] = {s: statistics.mean(math.exp(c[s]) for c in per_seed) for s in steps}
        moved = statistics.mean(sum(m["bytes_inter"] for m in read_metrics(f)) for f in folders)
        rows.append({"run": run.name, "facilities": run.facilities, "ranks": run.ranks, "h": run.h, "seeds": seeds,
                     "ppl_mean": statistics.mean(ppls), "ppl_sd": spread(ppls), "ppls": ppls,
                     "bytes_ratio_vs_ddp": moved / ddp_bytes if run.facilities > 1 else None,
                     "wall_s": statistics.mean(float((f / "wall_s.txt").read_text()) for f in folders)})
    central = rows[0]
    for row in rows:
        # seed-mean over seed-mean, both over the seeds this row ran (centralized ran every one of them)
        base_ppls = [p for s, p in zip(central["seeds"], central["ppls"]) if s in row["seeds"]]
        row["ppl_ratio"] = row["ppl_mean"] / statistics.mean(base_ppls)
        seed_ratios = [p / c for p, c in zip(row["ppls"], base_ppls)]
        row["ratio_min"], row["ratio_max"] = min(seed_ratios), max(seed_ratios)
        base = curves["centralized"]
        row["curve"] = {s: v / base[s] for s, v in curves[row["run"]].items() if s in base}

    federated = [r for r in rows if r["facilities"] > 1]
    within = [r for r in federated if r["bytes_ratio_vs_ddp"] <= args.bytes_budget] or federated
    best, best_any = min(within, key=lambda r: r["ppl_mean"]), min(federated, key=lambda r: r["ppl_mean"])
    print(f"\n{'run':<18} {'H':>3} {'seeds':>5} {'ppl (mean ± sd)':>17} {'/ central':>9} {'per seed':>13} "
          f"{'bytes/DDP':>9} {'wall s':>7}")
    for r in rows:
        ratio = f"{r['bytes_ratio_vs_ddp']:.4f}" if r["bytes_ratio_vs_ddp"] is not None else "-"
        print(f"{r['run']:<18} {r['h']:>3} {len(r['seeds']):>5} {r['ppl_mean']:>9.3f} ± {r['ppl_sd']:<5.3f} "
              f"{r['ppl_ratio']:>9.3f} "
              f"{r['ratio_min']:>6.3f}–{r['ratio_max']:<6.3f} {ratio:>9} {r['wall_s']:>7.1f}")
    points = sorted(best["curve"])
    alone = next((r for r in rows if r["run"] == "alone"), None)
    print(f"\nparity: {best['run']} over centralized at " +
          ", ".join(f"{s} steps {best['curve'][s]:.3f}" for s in points[:: max(1, len(points) // 8)]))
    first = [str(out / f"{r['run']}-s{r['seeds'][0]}") for r in rows]
    report = subprocess.run([sys.executable, "-m", "mpifed", "report", *first, "--out", str(out / "report.html"),
                             "--png", str(out / "report.png")], capture_output=True, text=True, env=ENV)
    said = f"written to {out / 'report.html'}" if report.returncode == 0 else f"failed: {report.stderr.strip()}"
    print(f"parity: report {said}")
    (out / "parity.json").write_text(json.dumps({"rows": rows, "corpus": corpus}, indent=1) + "\n")
    print("RESULT " + json.dumps({
        "ppl_ratio_best_federated_vs_centralized": round(best["ppl_ratio"], 4), "best_federated": best["run"],
        "bytes_ratio_vs_ddp": round(best["bytes_ratio_vs_ddp"], 4), "bytes_budget": args.bytes_budget,
        "best_any_budget": best_any["run"], "ppl_ratio_best_any_budget": round(best_any["ppl_ratio"], 4),
        "ppl_ratio_alone_vs_centralized": round(alone["ppl_ratio"], 4) if alone else None,
        "ratios": {r["run"]: [round(r["ppl_ratio"], 4), round(r["ratio_min"], 4), round(r["ratio_max"], 4),
                              len(r["seeds"])] for r in rows},
        "best_curve": {s: round(best["curve"][s], 4) for s in points},
        "corpus": corpus, "preset": args.preset, "facilities": args.facilities, "steps": args.steps,
        "h": list(args.h), "seeds": args.seeds, "tokens_per_run": read_metrics(Path(first[0]))[-1]["tokens_total"],
        "wall_s": round(time.perf_counter() - started)}))


if __name__ == "__main__":
    main()
