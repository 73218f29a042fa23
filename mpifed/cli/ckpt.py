"""`mpifed ckpt`: inspect, verify and export checkpoints. A folder means its newest checkpoint (the one
`latest` names). Inspect and verify read HDF5 alone: no torch, no MPI."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import click

from mpifed.checkpoint import format as checkpoint
from mpifed.checkpoint import isolated
from mpifed.checkpoint.format import CheckpointError, VerifiedCheckpoint
from mpifed.cli.common import JobFailed, UserError, check_writable


@click.group()
def ckpt() -> None:
    """Inspect, verify and export HDF5 checkpoints (a file, or a folder: its latest)."""


def _checkpoint_path(path: Path) -> Path:
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


def _verified(path: Path) -> VerifiedCheckpoint:
    """The checkpoint at `path`, verified with the facility parts found beside it (sites that share no
    filesystem keep theirs at home: each checks its own when a run resumes)."""
    try:
        return isolated.verify(_checkpoint_path(path), facilities="here")
    except CheckpointError as exc:
        raise JobFailed(str(exc)) from None


@ckpt.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--config", "as_config", is_flag=True,
              help="Print the run configuration it was trained with, as TOML (to resume it, or start its like).")
def inspect(path: Path, as_config: bool) -> int:
    """Round, tokens, parameters, size, facilities and outer state of a checkpoint."""
    s = _verified(path)
    if as_config:
        click.echo(s.config, nl=not s.config.endswith("\n"))
        return 0
    model = json.loads(s.model_config)
    click.echo(f"checkpoint   {s.path}")
    click.echo(f"round        {s.round}")
    click.echo(f"tokens       {s.tokens:,}")
    shape = f"hidden {model.get('hidden_size')}, layers {model.get('num_hidden_layers')}"
    if s.base_digest:  # the layout holds the adapters alone: the base is not in the checkpoint
        run = tomllib.loads(s.config)
        lora, base = run.get("lora", {}), run.get("model", {})
        click.echo(f"model        {model.get('model_type', '?')} with LoRA adapters: {s.layout.numel:,} adapter "
                   f"parameters in {len(s.layout.slots)} tensors (rank {lora.get('rank')}, alpha {lora.get('alpha')}, "
                   f"on {lora.get('target_modules')}); the frozen base, {base.get('path') or base.get('preset')} "
                   f"({shape}), is not in the checkpoint")
    else:
        click.echo(f"model        {model.get('model_type', '?')}: {s.layout.numel:,} parameters in "
                   f"{len(s.layout.slots)} tensors, {shape}")
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
    if s.elsewhere:
        click.echo(f"not in this folder, kept at their sites: the parts of {', '.join(s.elsewhere)} (each site's "
                   "run checks its own part against the digest recorded here when it resumes)")
    return 0


@ckpt.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--merge-lora", is_flag=True,
              help="For a LoRA run: merge the adapters into the base and write the full model (needs the base "
                   "model at its model.path). Without it a LoRA checkpoint exports the adapters (peft format).")
def export(path: Path, out: Path, merge_lora: bool) -> int:
    """Write the model as a Hugging Face folder (config.json, model.safetensors) for from_pretrained."""
    from mpifed.checkpoint.export import ExportError
    from mpifed.checkpoint.export import export as write_export

    verified = _verified(path)
    check_writable(out, "OUT", is_dir=True)
    try:
        what = write_export(verified, out, merge_lora)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"{out}: exported {what}")
    return 0
