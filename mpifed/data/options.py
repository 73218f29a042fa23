"""What `mpifed data prepare` can be asked: its options as one checked dataclass, whose defaults the
command line shows. Light on purpose (no numpy, no datasets), so `mpifed --help` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpifed.config import SplitKind, choices

BPE_SPECIALS = ("<|endoftext|>", "<|pad|>")
MIN_BPE_VOCAB = 256 + len(BPE_SPECIALS)


class PrepareError(ValueError):
    """Input that cannot be prepared; the message names the file, folder, field or option."""


@dataclass(frozen=True)
class PrepareOptions:
    """What `mpifed data prepare` was asked to do, one field per option; checked when made."""

    inputs: tuple[Path, ...]
    out: Path
    seq_len: int = 512
    partitions: int = 2
    split: SplitKind = "iid"
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
    skip_bad: bool = False
    """Skip an input that cannot be read (a file, a line, a record) and list it, instead of stopping."""

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
        if self.split not in choices(SplitKind):
            problems.append(f"--split: unknown split {self.split!r}; choose {' or '.join(choices(SplitKind))}")
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
