"""`mpifed data prepare`: text in, a prepared dataset folder out.

Reads text files and folders, JSON lines and `datasets` folders saved with `save_to_disk`; tokenizes
them in parallel with a local Hugging Face tokenizer or a byte-level BPE trained on the input; then
either packs the token stream into fixed-length sequences (pre-training) or turns each instruction
example into one padded sequence whose labels are -100 on the prompt and the padding (SFT). The
sequences are cut into a shared validation split and one partition per facility, IID or by source.

The folder it writes is what `data.path` names:
  DIR/manifest.json        kind, seq_len, vocab_size, token and sequence counts, sources per partition
  DIR/dataset_dict.json    a DatasetDict (save_to_disk): splits partition_0 ... partition_{F-1}, validation
  DIR/tokenizer/           the tokenizer (trained or copied), loadable with AutoTokenizer
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from mpifed.data.corpus import MANIFEST
from mpifed.data.options import BPE_SPECIALS, PrepareError, PrepareOptions
from mpifed.data.reading import Records, read_inputs
from mpifed.data.sequences import pack, split_rows

if TYPE_CHECKING:
    import datasets

FORMAT = 1
IGNORE = -100  # the label transformers' loss skips

__all__ = ["MANIFEST", "PrepareError", "PrepareOptions", "prepare"]


# ---------------------------------------------------------------------------------------- tokenizing
def train_bpe(texts: list[str], vocab_size: int, out: Path):
    """A byte-level BPE of `vocab_size` tokens trained on `texts`, saved in `out` for AutoTokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=list(BPE_SPECIALS),
                            show_progress=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=BPE_SPECIALS[0],
                                        bos_token=BPE_SPECIALS[0], pad_token=BPE_SPECIALS[1],
                                        clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def load_tokenizer(path: Path):
    """A local tokenizer folder (never the hub)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PrepareError(f"--tokenizer {path}: cannot load it ({exc})") from None


def _encode(batch: dict, tokenizer, keys: tuple[str, ...]) -> dict:
    return {f"{key}_ids": tokenizer(batch[key], add_special_tokens=False)["input_ids"] for key in keys}


def tokenize(records: Records, tokenizer, num_proc: int) -> datasets.Dataset:
    """Token ids of every document (columns text_ids, or prompt_ids and response_ids), in parallel."""
    import datasets

    ds = datasets.Dataset.from_dict({**records.columns, "source": records.sources})
    keys = tuple(records.columns)
    return ds.map(partial(_encode, tokenizer=tokenizer, keys=keys), batched=True, batch_size=256,
                  num_proc=num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None,
                  remove_columns=list(keys), desc="tokenizing")


# ----------------------------------------------------------------------------------- sequences
@dataclass
class Block:
    """Sequences made from one group of documents: ids [n, L] (and labels for SFT), real tokens per row."""

    ids: np.ndarray
    labels: np.ndarray | None
    tokens: np.ndarray
    dropped: int

    def take(self, rows: np.ndarray) -> "Block":
        return Block(self.ids[rows], None if self.labels is None else self.labels[rows], self.tokens[rows], 0)


def _stream(ds, column: str) -> tuple[np.ndarray, np.ndarray]:
    """All ids of a list column as one array, and where each document starts (from Arrow, no Python loop)."""
    if ds._indices is not None:  # a filtered dataset: its table still holds every row
        ds = ds.flatten_indices()
    chunked = ds.data.column(column).combine_chunks()
    return chunked.flatten().to_numpy(zero_copy_only=False), chunked.offsets.to_numpy()


def pack_block(ds, seq_len: int, eos: int | None) -> Block:
    """Documents joined (an end-of-text token after each, where the tokenizer has one) and cut into
    sequences of seq_len; the ragged tail is dropped and counted."""
    values, offsets = _stream(ds, "text_ids")
    stream = np.insert(values, offsets[1:], eos) if eos is not None else values  # eos after every document
    ids = pack(stream, seq_len, np.int32) if len(stream) >= seq_len else np.empty((0, seq_len), np.int32)
    return Block(ids, None, np.full(len(ids), seq_len, np.int64), len(stream) - ids.size)


def sft_block(ds, seq_len: int, eos: int | None, pad: int) -> Block:
    """One sequence per example: prompt, response, end-of-text; labels -100 on the prompt and padding.
    Examples whose prompt alone fills seq_len are dropped (counted); long responses are truncated."""
    prompts, p_off = _stream(ds, "prompt_ids")
    responses, r_off = _stream(ds, "response_ids")
    ids, labels, tokens, dropped = [], [], [], 0
    for i in range(len(ds)):
        prompt = prompts[p_off[i]:p_off[i + 1]]
        response = responses[r_off[i]:r_off[i + 1]]
        if eos is not None:
            response = np.append(response, eos)
        if len(prompt) >= seq_len:
            dropped += len(prompt) + len(response)
            continue
        full = np.concatenate([prompt, response])[:seq_len]
        row = np.full(seq_len, pad, np.int32)
        row[:len(full)] = full
        label = np.full(seq_len, IGNORE, np.int32)
        label[len(prompt):len(full)] = full[len(prompt):]
        dropped += len(prompt) + len(response) - len(full)
        ids.append(row), labels.append(label), tokens.append(len(full))
    if not ids:
        return Block(np.empty((0, seq_len), np.int32), np.empty((0, seq_len), np.int32), np.empty(0, np.int64), dropped)
    return Block(np.stack(ids), np.stack(labels), np.array(tokens, np.int64), dropped)


def concat(blocks: list[Block]) -> Block:
    labels = None if blocks[0].labels is None else np.concatenate([b.labels for b in blocks])
    return Block(np.concatenate([b.ids for b in blocks]), labels, np.concatenate([b.tokens for b in blocks]),
                 sum(b.dropped for b in blocks))


# ---------------------------------------------------------------------------------------- partitions
def assign_sources(tokens_by_source: dict[str, int], weights: list[float]) -> list[list[str]]:
    """Sources to partitions, largest first, each to the partition furthest below its weighted share."""
    if len(tokens_by_source) < len(weights):
        raise PrepareError(f"--split by-source: {len(tokens_by_source)} sources ({', '.join(sorted(tokens_by_source))}) "
                           f"cannot fill {len(weights)} partitions; use fewer partitions or --split iid")
    parts: list[list[str]] = [[] for _ in weights]
    load = [0.0] * len(weights)
    for source in sorted(tokens_by_source, key=lambda s: (-tokens_by_source[s], s)):
        i = min(range(len(weights)), key=lambda j: (0 if not parts[j] else 1, load[j] / weights[j], j))
        parts[i].append(source)
        load[i] += tokens_by_source[source]
    return parts


def _split(blocks: list[Block], opts: PrepareOptions, weights: list[float]) -> tuple[list[Block], Block]:
    """(partitions, validation): iid shuffles one block and cuts it by weight; by-source keeps each
    group's block as a partition and holds out the same fraction of each."""
    rng = np.random.default_rng(opts.seed)
    if opts.split == "iid":
        whole = concat(blocks)
        parts, val = split_rows(len(whole.ids), opts.val_fraction, weights, rng)
        return [whole.take(rows) for rows in parts], whole.take(val)
    kept = [split_rows(len(block.ids), opts.val_fraction, [1.0], rng) for block in blocks]
    return ([block.take(parts[0]) for block, (parts, _) in zip(blocks, kept)],
            concat([block.take(val) for block, (_, val) in zip(blocks, kept)]))


def _to_dataset(block: Block):
    import datasets

    columns = {"input_ids": block.ids}
    if block.labels is not None:
        columns["labels"] = block.labels
    return datasets.Dataset.from_dict(columns)


# ------------------------------------------------------------------------------------------- driver
def prepare(opts: PrepareOptions, say: Callable[[str], None] = print) -> dict:
    """Build the prepared folder `opts.out` and return its manifest. Writes into a temporary folder
    beside it and renames it at the end, so a failed run leaves nothing half-written."""
    import shutil

    import datasets

    records, skipped = read_inputs(opts)
    if skipped:
        say(f"skipped {len(skipped):,} bad input(s) (--skip-bad):")
        for line in skipped:
            say(f"  skipped {line}")
    megabytes = sum(len(t.encode()) for column in records.columns.values() for t in column) / 1e6
    say(f"read {len(records):,} {'examples' if opts.sft else 'documents'} ({megabytes:.1f} MB) from "
        f"{len(set(records.sources))} sources")
    tmp = opts.out.with_name(f".{opts.out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if opts.train_bpe is not None:
            say(f"training a byte-level BPE tokenizer of {opts.train_bpe:,} tokens")
            tokenizer = train_bpe([t for column in records.columns.values() for t in column], opts.train_bpe,
                                  tmp / "tokenizer")
        else:
            tokenizer = load_tokenizer(opts.tokenizer)
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        ds = tokenize(records, tokenizer, opts.num_proc)  # the long step: datasets shows its progress bar
        datasets.disable_progress_bars()  # the rest takes seconds; its bars would only be noise
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        make = partial(sft_block, seq_len=opts.seq_len, eos=eos, pad=pad) if opts.sft \
            else partial(pack_block, seq_len=opts.seq_len, eos=eos)
        weights = list(opts.weights) or [1.0] * opts.partitions
        if opts.split == "by-source":
            tokens_by_source: dict[str, int] = {}
            lengths = sum(np.diff(_stream(ds, f"{key}_ids")[1]) for key in records.columns)
            for source, n in zip(records.sources, lengths):
                tokens_by_source[source] = tokens_by_source.get(source, 0) + int(n)
            groups = assign_sources(tokens_by_source, weights)
            blocks = [make(ds.filter(lambda s, keep=set(g): s in keep, input_columns="source")) for g in groups]
        else:
            groups = [[] for _ in range(opts.partitions)]  # iid: every partition draws from every source
            blocks = [make(ds)]
        parts, validation = _split(blocks, opts, weights)
        if any(len(p.ids) == 0 for p in [*parts, validation]):
            raise PrepareError(f"the inputs make {sum(len(p.ids) for p in parts) + len(validation.ids)} sequences of "
                               f"{opts.seq_len} tokens: too few for {opts.partitions} partitions and a validation split; "
                               "give more text or a smaller --seq-len")
        say(f"{'formatted' if opts.sft else 'packed'} {sum(len(p.ids) for p in parts) + len(validation.ids):,} "
            f"sequences of {opts.seq_len} tokens; writing {opts.partitions} partitions and validation")
        splits = {f"partition_{i}": _to_dataset(p) for i, p in enumerate(parts)}
        datasets.DatasetDict({**splits, "validation": _to_dataset(validation)}).save_to_disk(str(tmp))
        manifest = {
            "format": FORMAT, "kind": "sft" if opts.sft else "pretrain", "seq_len": opts.seq_len,
            "vocab_size": len(tokenizer), "tokenizer": "tokenizer", "split": opts.split, "weights": weights,
            "seed": opts.seed, "inputs": [str(p) for p in opts.inputs],
            "total_tokens": int(sum(p.tokens.sum() for p in parts)),
            "partitions": [{"name": f"partition_{i}", "sequences": len(p.ids), "tokens": int(p.tokens.sum()),
                            "sources": groups[i]} for i, p in enumerate(parts)],
            "validation": {"sequences": len(validation.ids), "tokens": int(validation.tokens.sum())},
            "dropped_tokens": int(sum(b.dropped for b in blocks)),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if opts.out.exists():
            shutil.rmtree(opts.out)
        os.replace(tmp, opts.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        datasets.enable_progress_bars()
    sizes = ", ".join(f"{p['tokens']:,}" for p in manifest["partitions"])
    say(f"wrote {opts.out}: {manifest['total_tokens']:,} training tokens in {opts.partitions} partitions ({sizes}), "
        f"{manifest['validation']['tokens']:,} validation tokens; train on it with --set data.path={opts.out}")
    return manifest
