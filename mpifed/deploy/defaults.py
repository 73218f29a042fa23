"""The settings `mpifed config new` proposes for the size of the model a project trains, each with the
reason the project's README gives for it. The defaults of `mpifed.config` suit the small models of a
first run on one machine; an 8B model across two sites needs others (bf16, a lower learning rate,
longer sequences, more roots, fewer checkpoints kept). A value the user gives, as a flag or --set,
always wins over a proposal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BILLION = 1e9


@dataclass(frozen=True)
class Proposal:
    """One proposed setting: the key as --set names it, its value, and why."""

    key: str
    value: Any
    why: str


def proposals(params: int, rounds: int, on_gpus: bool, roots: int, embedded: bool) -> list[Proposal]:
    """What to set for a model of `params` parameters trained over `rounds` rounds: `on_gpus` when every
    facility's site has GPUs, `roots` the most roots every facility can have (its ranks, at most a
    node's), `embedded` when the data is the embedded text (whose sequence length the config sets)."""
    out = []
    if params >= BILLION and on_gpus:
        out.append(Proposal("model.dtype", "bf16", "a model of a billion parameters or more: bf16 halves its "
                            "weights on the GPUs (A100, H100 and MI250X compute in it natively)"))
    if params >= BILLION:
        out.append(Proposal("train.lr", 3e-4, "the peak AdamW rate of published LLaMA-class runs of this size "
                            "(the default, 1e-3, suits the small test models)"))
    elif params >= 100e6:
        out.append(Proposal("train.lr", 6e-4, "the peak AdamW rate of published runs of 100M to 1B parameters"))
    if params >= BILLION:
        out.append(Proposal("train.warmup_steps", 100, "a warm-up keeps the first steps of a large model from "
                            "diverging"))
    if params >= BILLION and embedded:
        out.append(Proposal("data.seq_len", 2048, "the context such models train with (the 128 of the default "
                            "suits the small test models)"))
    if params >= BILLION and roots > 1:
        out.append(Proposal("federation.roots", roots, f"each of {roots} roots holds 1/{roots} of the global "
                            "model and of the outer optimizer's state, so no one rank holds all of it (`mpifed "
                            "plan` shows a root's share)"))
    if params >= 100e6:
        out.append(Proposal("checkpoint.keep", 2, "each checkpoint takes several times the model's size at each "
                            "site (`mpifed plan` gives the figure); the newest two are kept"))
        if rounds >= 20:
            every = rounds // 10
            out.append(Proposal("checkpoint.every", every, f"about ten checkpoints over the run (one every {every} "
                                "rounds); a job stopped ahead of its walltime checkpoints its round anyway"))
    return out
