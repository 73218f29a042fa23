"""`mpifed data prepare`: tokenize and partition a corpus into a prepared folder (what data.path names).
The options' defaults are `PrepareOptions`'s."""
from __future__ import annotations

import os
from pathlib import Path

import click

from mpifed.cli.common import UserError, check_writable, default_of
from mpifed.config import SplitKind, choices
from mpifed.data.options import PrepareError, PrepareOptions


def _default(key: str):
    return default_of(PrepareOptions, key)


@click.group()
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
@click.option("--seq-len", type=int, default=_default("seq_len"), show_default=True, help="Tokens per sequence.")
@click.option("--partitions", type=int, default=_default("partitions"), show_default=True,
              help="One partition per facility.")
@click.option("--split", type=click.Choice(choices(SplitKind)), default=_default("split"), show_default=True,
              help="iid: shuffled sequences; by-source: whole sources per partition (non-IID): a top folder "
                   "of an input folder, a file, or --source-field.")
@click.option("--weights", callback=_weights, default="", metavar="W0,W1,...",
              help="Relative partition sizes (default: equal).")
@click.option("--val-fraction", type=float, default=_default("val_fraction"), show_default=True,
              help="Share of sequences held out for validation (with by-source, of every partition).")
@click.option("--sft", is_flag=True,
              help="Instruction data: '### Human: ... ### Assistant: ...' text, or JSON lines with prompt and "
                   "response fields; one padded sequence per example, loss on the response only.")
@click.option("--text-field", default=_default("text_field"), show_default=True,
              help="JSON-lines/dataset field holding the text.")
@click.option("--source-field", default=_default("source_field"),
              help="JSON-lines/dataset field naming each record's source (by-source).")
@click.option("--prompt-field", default=_default("prompt_field"), show_default=True,
              help="SFT: field holding the prompt.")
@click.option("--response-field", default=_default("response_field"), show_default=True,
              help="SFT: field holding the response.")
@click.option("--num-proc", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default="all cores",
              help="Tokenizer processes.")
@click.option("--seed", type=click.IntRange(min=0), default=_default("seed"), show_default=True,
              help="Seed of the shuffles.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier prepared folder at --out.")
@click.option("--skip-bad", is_flag=True,
              help="Leave out what cannot be read (a file that is not UTF-8, a line that is not a JSON object, a "
                   "record without the field) and list each, instead of stopping at the first.")
def prepare(inputs: tuple[Path, ...], out: Path, tokenizer: Path | None, train_bpe: int | None, seq_len: int,
            partitions: int, split: str, weights: tuple[float, ...], val_fraction: float, sft: bool,
            text_field: str, source_field: str, prompt_field: str, response_field: str, num_proc: int,
            seed: int, overwrite: bool, skip_bad: bool) -> int:
    """Tokenize INPUT... (text files or folders, JSON lines, saved `datasets`) into a prepared folder.

    \b
    mpifed data prepare corpus/ --train-bpe 8000 --seq-len 512 --partitions 3 --out data/c3
    mpifed data prepare guanaco.jsonl --sft --tokenizer /models/llama --seq-len 1024 --out data/sft
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tokenizers come from local folders only
    check_writable(out, "--out", is_dir=True)
    from mpifed.data.corpus import MANIFEST
    from mpifed.data.prepare import prepare as run_prepare

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
                              response_field=response_field, num_proc=num_proc, seed=seed, skip_bad=skip_bad)
        run_prepare(opts, say=lambda line: click.echo(f"mpifed data: {line}", err=True))
    except PrepareError as exc:
        raise UserError(str(exc)) from None
    return 0
