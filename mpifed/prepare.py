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

if TYPE_CHECKING:
    import datasets

MANIFEST = "manifest.json"
FORMAT = 1
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
BPE_SPECIALS = ("<|endoftext|>", "<|pad|>")
MIN_BPE_VOCAB = 256 + len(BPE_SPECIALS)
HUMAN, ASSISTANT = "### Human:", "### Assistant:"
IGNORE = -100  # the label transformers' loss skips


class PrepareError(ValueError):
    """Input that cannot be prepared; the message names the file, folder, field or option."""


@dataclass(frozen=True)
class PrepareOptions:
    inputs: tuple[Path, ...]
    out: Path
    seq_len: int = 512
    partitions: int = 2
    split: str = "iid"
    weights: tuple[float, ...] = ()
    val_fraction: float = 0.05
    tokenizer: Path | None = None
    train_bpe: int | None = None
    sft: bool = False
    text_field: str = "text"
    source_field: str = ""
    prompt_field: str = "prompt"
    response_field: str = "response"
    num_proc: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if (self.tokenizer is None) == (self.train_bpe is None):
            problems.append("give exactly one of --tokenizer PATH and --train-bpe VOCAB")
        if self.train_bpe is not None and self.train_bpe < MIN_BPE_VOCAB:
            problems.append(f"--train-bpe: a vocabulary of {self.train_bpe} is too small; a byte-level BPE needs at "
                            f"least {MIN_BPE_VOCAB} tokens (256 bytes and {len(BPE_SPECIALS)} special tokens)")
        if not 8 <= self.seq_len <= 1 << 20:
            problems.append(f"--seq-len: must be between 8 and 1048576 (got {self.seq_len})")
        if self.partitions < 1:
            problems.append(f"--partitions: must be >= 1 (got {self.partitions})")
        if self.split not in ("iid", "by-source"):
            problems.append(f"--split: unknown split {self.split!r}; choose iid or by-source")
        if self.weights and (len(self.weights) != self.partitions or min(self.weights) <= 0):
            problems.append(f"--weights: give {self.partitions} positive numbers, one per partition "
                            f"(got {','.join(map(str, self.weights))})")
        if not 0.0 < self.val_fraction < 0.5:
            problems.append(f"--val-fraction: must be > 0 and < 0.5 (got {self.val_fraction})")
        problems += [f"{path}: no such file or folder" for path in self.inputs if not path.exists()]
        if self.tokenizer is not None and not (self.tokenizer.is_dir() and any(self.tokenizer.glob("tokenizer*"))):
            problems.append(f"--tokenizer {self.tokenizer}: not a tokenizer folder (no tokenizer.json or "
                            "tokenizer_config.json there); give a local Hugging Face tokenizer or model folder")
        if problems:
            raise PrepareError("; ".join(problems))


@dataclass
class Records:
    """The documents read from the inputs: the text (or prompt and response) of each and its source."""

    columns: dict[str, list[str]]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.sources)


# ---------------------------------------------------------------------------------------------- reading
def _split_marked(text: str, where: str) -> tuple[str, str]:
    """'### Human: … ### Assistant: …' → (prompt through the last Assistant marker, response)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0 or HUMAN not in text[:cut]:
        raise PrepareError(f"{where}: an SFT example needs '{HUMAN} … {ASSISTANT} …' "
                           "(or JSON lines with --prompt-field/--response-field)")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def _marked_examples(text: str) -> list[str]:
    """A text file of SFT examples: each starts at a '### Human:' line that follows an answer."""
    out, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith(HUMAN) and any(ASSISTANT in seen for seen in current):
            out.append("".join(current).strip())
            current = []
        current.append(line)
    if "".join(current).strip():
        out.append("".join(current).strip())
    return out


class _Reader:
    def __init__(self, opts: PrepareOptions) -> None:
        self.opts = opts
        keys = ("prompt", "response") if opts.sft else ("text",)
        self.records = Records({key: [] for key in keys}, [])

    def add_text(self, text: str, source: str, where: str) -> None:
        if not text.strip():
            return
        if not self.opts.sft:
            self._add({"text": text}, source)
            return
        for i, example in enumerate(_marked_examples(text)):
            prompt, response = _split_marked(example, f"{where} (example {i + 1})")
            self._add({"prompt": prompt, "response": response}, source)

    def add_record(self, record: dict, source: str, where: str) -> None:
        opts = self.opts
        if opts.source_field:
            if opts.source_field not in record:
                raise PrepareError(f"{where}: no field {opts.source_field!r} for --source-field "
                                   f"(fields: {', '.join(record)})")
            source = str(record[opts.source_field])
        if opts.sft and opts.prompt_field in record and opts.response_field in record:
            self._add({"prompt": str(record[opts.prompt_field]), "response": str(record[opts.response_field])}, source)
        elif opts.text_field in record:
            self.add_text(str(record[opts.text_field]), source, where)
        else:
            wanted = (f"{opts.prompt_field!r} and {opts.response_field!r} (or {opts.text_field!r})" if opts.sft
                      else f"{opts.text_field!r} (--text-field)")
            raise PrepareError(f"{where}: no field {wanted} (fields: {', '.join(record) or 'none'})")

    def _add(self, values: dict[str, str], source: str) -> None:
        for key, value in values.items():
            self.records.columns[key].append(value)
        self.records.sources.append(source)

    def read(self, path: Path) -> None:
        if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
            self._read_dataset(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | JSON_SUFFIXES)
            if not files:
                raise PrepareError(f"{path}: no input in this folder (looked for "
                                   f"{', '.join(sorted(TEXT_SUFFIXES | JSON_SUFFIXES))} files and saved datasets)")
            for file in files:
                top = file.relative_to(path).parts
                self._read_file(file, top[0] if len(top) > 1 else file.name)
        else:
            self._read_file(path, path.name)

    def _read_file(self, path: Path, source: str) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PrepareError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
        if path.suffix.lower() not in JSON_SUFFIXES:
            self.add_text(text, source, str(path))
            return
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise PrepareError(f"{path} line {number}: not a JSON object ({exc})") from None
            if not isinstance(record, dict):
                raise PrepareError(f"{path} line {number}: not a JSON object")
            self.add_record(record, source, f"{path} line {number}")

    def _read_dataset(self, path: Path) -> None:
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded and len(loaded) != 1:
                raise PrepareError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(loaded)}); "
                                   "save the split to prepare on its own")
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        for i, record in enumerate(loaded):
            self.add_record(record, path.name, f"{path} row {i}")


def read_inputs(opts: PrepareOptions) -> Records:
    reader = _Reader(opts)
    for path in opts.inputs:
        reader.read(path)
    if not reader.records:
        raise PrepareError(f"{', '.join(map(str, opts.inputs))}: no text found in the inputs")
    return reader.records


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
    if eos is not None:
        stream = np.insert(values, offsets[1:], eos)  # after every document
    else:
        stream = values
    n = len(stream) // seq_len
    ids = stream[:n * seq_len].astype(np.int32).reshape(n, seq_len)
    return Block(ids, None, np.full(n, seq_len, np.int64), len(stream) - n * seq_len)


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


def _cut(n: int, weights: list[float]) -> list[tuple[int, int]]:
    edges = np.round(np.cumsum([0.0, *weights]) / sum(weights) * n).astype(int)
    return list(zip(edges[:-1], edges[1:]))


def _val_count(n: int, fraction: float) -> int:
    return min(n - 1, max(1, int(round(n * fraction)))) if n > 1 else 0


def _split(blocks: list[Block], opts: PrepareOptions, weights: list[float]) -> tuple[list[Block], Block]:
    """(partitions, validation): iid shuffles one block and cuts it by weight; by-source keeps each
    group's block as a partition and holds out the same fraction of each."""
    rng = np.random.default_rng(opts.seed)
    if opts.split == "iid":
        whole = concat(blocks)
        order = rng.permutation(len(whole.ids))
        n_val = _val_count(len(order), opts.val_fraction)
        train = order[n_val:]
        parts = [whole.take(np.sort(train[a:b])) for a, b in _cut(len(train), weights)]
        return parts, whole.take(np.sort(order[:n_val]))
    parts, vals = [], []
    for block in blocks:
        order = rng.permutation(len(block.ids))
        n_val = _val_count(len(order), opts.val_fraction)
        parts.append(block.take(np.sort(order[n_val:])))
        vals.append(block.take(np.sort(order[:n_val])))
    return parts, concat(vals)


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

    records = read_inputs(opts)
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
