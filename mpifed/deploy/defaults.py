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


LONG_RUN_ROUNDS = 100
"""From this many rounds `config new` proposes diloco (benchmarks/parity.py: with an outer warm-up of a
tenth of the rounds it reached centralized training's perplexity at 240 rounds, where fedavg stayed
10% above; at 12 and 30 rounds it was far worse than fedavg)."""


def outer_for(rounds: int) -> str:
    """The outer optimizer `config new` proposes for a run of `rounds` rounds."""
    return "diloco" if rounds >= LONG_RUN_ROUNDS else "fedavg"


def outer_proposals(rounds: int, outer: str) -> list[Proposal]:
    """What DiLoCo's outer step needs whatever the model's size: a warm-up of a tenth of the rounds."""
    if outer != "diloco" or rounds < 20:
        return []
    warmup = rounds // 10
    return [Proposal("federation.outer_warmup", warmup, f"DiLoCo's Nesterov step grows to full strength over the "
                     f"first {warmup} rounds (a tenth): in benchmarks/parity.py, 240 rounds with such a warm-up "
                     "reached centralized training's perplexity")]


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
