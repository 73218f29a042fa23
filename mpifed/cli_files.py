"""The `mpifed` subcommands that work on files rather than run training:

  data prepare   tokenize and partition a corpus into a prepared folder (data.path)
  ckpt           inspect, verify and export checkpoints
  sites          list and show the site profiles in sitecfg/
  config new     write a project: mpifed.toml, one batch script per facility, a README

They register themselves on the `cli` group of mpifed.cli and share its error types.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from mpifed.cli import UserError, _check_writable, _JobFailed, cli


@cli.group()
def data() -> None:
    """Prepare training data: tokenize, pack, hold out validation, cut one partition per facility."""


def _weights(ctx, param, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in value.split(",")) if value else ()
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


@data.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (then train with --set data.path=OUT).")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="A local Hugging Face tokenizer or model folder (never the hub).")
@click.option("--train-bpe", type=int, metavar="VOCAB",
              help="Instead of --tokenizer: train a byte-level BPE of VOCAB tokens on the inputs, saved in OUT/tokenizer.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per sequence.")
@click.option("--partitions", type=int, default=2, show_default=True, help="One partition per facility.")
@click.option("--split", type=click.Choice(["iid", "by-source"]), default="iid", show_default=True,
              help="iid: shuffled sequences; by-source: whole sources per partition (non-IID): a top folder "
                   "of an input folder, a file, or --source-field.")
@click.option("--weights", callback=_weights, default="", metavar="W0,W1,...",
              help="Relative partition sizes (default: equal).")
@click.option("--val-fraction", type=float, default=0.05, show_default=True,
              help="Share of sequences held out for validation (with by-source, of every partition).")
@click.option("--sft", is_flag=True,
              help="Instruction data: '### Human: ... ### Assistant: ...' text, or JSON lines with prompt and "
                   "response fields; one padded sequence per example, loss on the response only.")
@click.option("--text-field", default="text", show_default=True, help="JSON-lines/dataset field holding the text.")
@click.option("--source-field", default="", help="JSON-lines/dataset field naming each record's source (by-source).")
@click.option("--prompt-field", default="prompt", show_default=True, help="SFT: field holding the prompt.")
@click.option("--response-field", default="response", show_default=True, help="SFT: field holding the response.")
@click.option("--num-proc", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default="all cores",
              help="Tokenizer processes.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the shuffles.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier prepared folder at --out.")
def prepare(inputs: tuple[Path, ...], out: Path, tokenizer: Path | None, train_bpe: int | None, seq_len: int,
            partitions: int, split: str, weights: tuple[float, ...], val_fraction: float, sft: bool,
            text_field: str, source_field: str, prompt_field: str, response_field: str, num_proc: int,
            seed: int, overwrite: bool, **_) -> int:
    """Tokenize INPUT... (text files or folders, JSON lines, saved `datasets`) into a prepared folder.

    \b
    mpifed data prepare corpus/ --train-bpe 8000 --seq-len 512 --partitions 3 --out data/c3
    mpifed data prepare guanaco.jsonl --sft --tokenizer /models/llama --seq-len 1024 --out data/sft
    """
    from mpifed.prepare import MANIFEST, PrepareError, PrepareOptions
    from mpifed.prepare import prepare as run_prepare

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tokenizers come from local folders only
    _check_writable(out, "--out", is_dir=True)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out: {out} is not empty; choose another folder or pass --overwrite")
        if not (out / MANIFEST).exists():
            raise UserError(f"--out: {out} is not a prepared dataset folder (no {MANIFEST}); --overwrite only "
                            "replaces those")
    try:
        opts = PrepareOptions(inputs=inputs, out=out, seq_len=seq_len, partitions=partitions, split=split,
                              weights=weights, val_fraction=val_fraction, tokenizer=tokenizer, train_bpe=train_bpe,
                              sft=sft, text_field=text_field, source_field=source_field, prompt_field=prompt_field,
                              response_field=response_field, num_proc=num_proc, seed=seed)
        run_prepare(opts, say=lambda line: click.echo(f"mpifed data: {line}", err=True))
    except PrepareError as exc:
        raise UserError(str(exc)) from None
    return 0


@cli.group()
def ckpt() -> None:
    """Inspect, verify and export HDF5 checkpoints (a file, or a folder: its latest)."""


def _checkpoint_path(path: Path) -> Path:
    from mpifed import checkpoint

    if path.is_dir():
        pointer = path / checkpoint.LATEST
        if pointer.exists():
            return path / pointer.read_text().strip()
        mains = checkpoint.main_files(path)
        if not mains:
            raise UserError(f"{path}: no checkpoint in this folder")
        return mains[-1]
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint file or folder")
    return path


def _verified(path: Path):
    from mpifed.checkpoint import CheckpointError, verify

    try:
        return verify(_checkpoint_path(path))
    except CheckpointError as exc:
        raise _JobFailed(str(exc)) from None


@ckpt.command()
@click.argument("path", type=click.Path(path_type=Path))
def inspect(path: Path) -> int:
    """Round, tokens, parameters, size, facilities and outer state of a checkpoint."""
    import json

    s = _verified(path)
    model = json.loads(s.model_config)
    click.echo(f"checkpoint   {s.path}")
    click.echo(f"round        {s.round}")
    click.echo(f"tokens       {s.tokens:,}")
    click.echo(f"model        {model.get('model_type', '?')}: {s.layout.numel:,} parameters in {len(s.layout.slots)} "
               f"tensors, hidden {model.get('hidden_size')}, layers {model.get('num_hidden_layers')}")
    click.echo("facilities   " + ", ".join(f"{f['name']} ({f['ranks']} x {f['engine']})" for f in s.facilities))
    click.echo(f"outer state  {', '.join(s.outer_state) or 'none'}; {s.roots} root(s) per facility")
    click.echo(f"size         {s.bytes / 2 ** 20:.1f} MiB verified")
    return 0


@ckpt.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
def verify_command(path: Path) -> int:
    """Reread every array of a checkpoint and its parts; exit 1 naming the first bad dataset."""
    s = _verified(path)
    click.echo(f"{s.path}: ok (round {s.round}, {s.bytes / 2 ** 20:.1f} MiB checked)")
    return 0


@ckpt.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--merge-lora", is_flag=True,
              help="For a LoRA run: merge the adapters into the base and write the full model (needs the base "
                   "model at its model.path). Without it a LoRA checkpoint exports the adapters (peft format).")
def export(path: Path, out: Path, merge_lora: bool) -> int:
    """Write the model as a Hugging Face folder (config.json, model.safetensors) for from_pretrained."""
    from mpifed import checkpoint

    s = _verified(path)
    _check_writable(out, "OUT", is_dir=True)
    if merge_lora and not s.base_digest:
        raise UserError(f"--merge-lora: {s.path} is not from a LoRA run (lora.rank = 0); export it without the flag")
    if s.base_digest:
        from mpifed.model import ModelError, export_lora

        try:
            what = export_lora(s, out, merge_lora)
        except ModelError as exc:
            raise UserError(str(exc)) from None
        _copy_tokenizer(s, out)
        click.echo(f"{out}: exported {what} of round {s.round}")
        return 0
    checkpoint.export(s, out)
    _copy_tokenizer(s, out)
    click.echo(f"{out}: exported round {s.round} ({s.layout.numel:,} parameters); load it with "
               f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _copy_tokenizer(summary, out: Path) -> None:
    """The prepared data's tokenizer goes beside an exported model, so the folder is complete."""
    import tomllib

    data_path = tomllib.loads(summary.config).get("data", {}).get("path", "")
    tokenizer = Path(data_path) / "tokenizer"
    if data_path and tokenizer.is_dir():
        for file in tokenizer.iterdir():
            shutil.copy2(file, out / file.name)


@cli.group()
def sites() -> None:
    """Site profiles (sitecfg/*.toml): scheduler, accelerator, MPI, modules, environment, container."""


def _site(name: str):
    from mpifed.sites import SiteError, get

    try:
        return get(name)
    except SiteError as exc:
        raise UserError(str(exc)) from None


@sites.command("list")
def sites_list() -> int:
    """Every profile, one line each (a malformed one is an error naming its file and key)."""
    from mpifed.sites import available

    for name in available():
        site = _site(name)
        click.echo(f"{name:<14} {site.accelerator:<5} {site.mpi.launcher:<7} {site.description}")
    return 0


@sites.command("show")
@click.argument("name")
def sites_show(name: str) -> int:
    """One profile in full, with the reason for every environment variable."""
    site = _site(name)
    s, m, c = site.scheduler, site.mpi, site.container
    click.echo(f"{site.name}: {site.description}\n  file         {site.path}")
    click.echo(f"  accelerator  {site.accelerator} (torch backend {site.torch_backend})")
    click.echo(f"  scheduler    partition {s.partition or '(default)'}, account {s.account or '-'}"
               f"{', qos ' + s.qos if s.qos else ''}, {s.gpus_per_node} GPUs and {s.cpus_per_node} CPUs per node, "
               f"{s.ranks_per_node} ranks per node, time {s.time}{' ' + ' '.join(s.extra) if s.extra else ''}")
    click.echo(f"  mpi          {m.launcher} (srun --mpi={m.srun_mpi}), "
               f"{'MPI4PY_LIBMPI=' + m.libmpi if m.libmpi else 'the embedded MPICH'}")
    click.echo(f"  modules      {' '.join(site.modules) or '-'}")
    click.echo(f"  container    {c.runtime}{' ' + c.image if c.image else ''}"
               f"{' (binds ' + ','.join(c.binds) + ')' if c.binds else ''}")
    for var, spec in site.env.items():
        click.echo(f"  env {var}={spec.value}\n      {spec.why}")
    return 0


@cli.group("config")
def config_group() -> None:
    """Create run configurations and projects."""


def _facilities(value: str) -> list[tuple[str, str, int, str]]:
    """--facilities NAME:SITE:RANKS[:ENGINE],... parsed (a callback would see prompted answers twice)."""
    out = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or not parts[2].isdigit():
            raise UserError(f"--facilities: {item!r}: expected NAME:SITE:RANKS or NAME:SITE:RANKS:ENGINE")
        out.append((parts[0], parts[1], int(parts[2]), parts[3] if len(parts) == 4 else "replica"))
    if not out:
        raise UserError("--facilities: name at least one facility")
    return out


@config_group.command("new")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--facilities", prompt="Facilities (NAME:SITE:RANKS[:ENGINE], comma-separated; "
              "the first is the hub)", default="leonardo:leonardo:4:fsdp,lumi:lumi:8:deepspeed",
              help="NAME:SITE:RANKS[:ENGINE],... (engine: replica, fsdp or deepspeed; the first facility is the hub).")
@click.option("--model", prompt="Model (a preset or a local model folder)", default="llama-small",
              help="A preset (llama-tiny, llama-small, mixtral-tiny, llama3-8b, mixtral-8x7b) or a model folder.")
@click.option("--data", "data_path", prompt="Prepared data folder (empty: the embedded text)", default="",
              help="A folder from `mpifed data prepare` (data.path); empty: the embedded text.")
@click.option("--rounds", type=click.IntRange(min=1), prompt="Rounds", default=10, help="federation.rounds")
@click.option("--local-steps", type=click.IntRange(min=1), prompt="Local steps per round (H)", default=50,
              help="train.local_steps")
@click.option("--outer", type=click.Choice(["fedavg", "fedavgm", "diloco", "fedadam", "fedyogi"]),
              prompt="Outer optimizer", default="diloco", help="federation.outer")
@click.option("--compress", type=click.Choice(["none", "bf16", "int8"]), prompt="Compression between facilities",
              default="bf16", help="federation.compress")
@click.option("--rendezvous", prompt="Rendezvous file every site sees (empty: pass the hub's port by hand)",
              default="hub-port.txt", help="federation.rendezvous")
@click.option("--token-file", prompt="Token file (empty: MPIFED_TOKEN from the environment)", default="",
              help="federation.token_file (mode 0600)")
@click.option("--checkpoint-dir", prompt="Checkpoint folder", default="checkpoints", help="checkpoint.dir")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Any other key (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace the files of an existing project in OUT.")
def config_new(out: Path, facilities: str, model: str, data_path: str, rounds: int, local_steps: int, outer: str,
               compress: str, rendezvous: str, token_file: str, checkpoint_dir: str, sets: tuple[str, ...],
               overwrite: bool) -> int:
    """Write a project to OUT: mpifed.toml, one SLURM script per facility (srun + the container-wrapped
    `mpifed run --facility`), the launch/ wrappers and a README of the steps.

    Every prompt has a flag, so it also runs without a terminal:

    \b
    mpifed config new proj --facilities a:local:1,b:local:1 --model llama-tiny --data '' --rounds 2 \\
        --local-steps 5 --outer diloco --compress none --rendezvous hub-port.txt --token-file '' \\
        --checkpoint-dir checkpoints
    """
    from mpifed import config, configfile, project
    from mpifed.sites import SiteError, get

    listed = _facilities(facilities)
    if (out / "mpifed.toml").exists() and not overwrite:
        raise UserError(f"OUT: {out} already holds a project (mpifed.toml); choose another folder or pass --overwrite")
    _check_writable(out, "OUT", is_dir=True)
    try:
        profiles = {name: get(site) for name, site, _, _ in listed}
    except SiteError as exc:
        raise UserError(f"--facilities: {exc}") from None
    is_folder = "/" in model or Path(model).is_dir()
    data = {
        "model": {"path": model} if is_folder else {"preset": model},
        "data": {"path": data_path} if data_path else {},
        "train": {"local_steps": local_steps},
        "federation": {"rounds": rounds, "outer": outer, "compress": compress, "rendezvous": rendezvous,
                       "token_file": token_file},
        "checkpoint": {"dir": checkpoint_dir},
        "facility": [{"name": n, "site": s, "ranks": r, "engine": e} for n, s, r, e in listed],
    }
    try:
        cfg = configfile.from_dict(configfile.apply_sets(data, list(sets)))
    except config.ConfigError as exc:
        raise UserError(str(exc)) from None
    written = project.write(out, project.Project(cfg, profiles))
    click.echo(f"wrote {len(written)} files to {out}: mpifed.toml, "
               f"{', '.join(f.name + '.sbatch' for f in cfg.facility)}, launch/, README.md; next: {out}/README.md")
    return 0
