"""What a valid run configuration needs from this machine, checked before anything starts: the site
profiles it names, the optional packages it asks for, the folders and files it points at, and a
prepared dataset that matches its facilities. `mpifed.config` checks values alone; this module looks
around. Every problem is collected into one ConfigError, as the configuration's own are.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from mpifed.config import ConfigError, RunConfig
from mpifed.configfile import expanded, setting
from mpifed.data.corpus import DataError, read_manifest, shape
from mpifed.deploy.sites import SiteError, available, get

# what a setting needs installed: (problem when missing, package)
_PACKAGES = {
    "lora.rank": ("LoRA needs the peft package; pip install 'mpifed[lora]' or set lora.rank = 0", "peft"),
    "metrics.tensorboard": ("the tensorboard package is not installed; pip install tensorboard or leave "
                            "metrics.tensorboard empty", "tensorboard"),
    "metrics.wandb": ("the wandb package is not installed; pip install wandb or leave metrics.wandb empty", "wandb"),
}


RUNTIME_GB = 0.5
"""Resident memory of a rank before any model: Python, torch, transformers, MPI (measured on this
project's CPU machine; a GPU rank adds the CUDA context on the device instead)."""


def this_machine() -> float:
    """This machine's memory in bytes (0: unknown)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 0.0


def least_per_rank(cfg: RunConfig) -> float:
    """Bytes a rank needs whatever its model: the runtime, and one micro-batch's logits with their
    gradient (micro_batch x seq_len x vocabulary, fp32, twice). `mpifed plan` knows the rest."""
    seq_len, vocab = shape(cfg.data)
    return RUNTIME_GB * 1e9 + 8.0 * cfg.train.micro_batch * seq_len * vocab


def one_machine_problems(cfg: RunConfig) -> list[str]:
    """`mpifed simulate` starts every rank on this machine: what cannot fit in its memory at all, said
    before mpiexec is asked for a million processes."""
    memory = this_machine()
    if not memory:
        return []
    ranks, need = sum(f.ranks for f in cfg.facility), least_per_rank(cfg)
    if ranks * need <= memory:
        return []
    gb = 1e9
    return [f"{ranks:,} ranks need at least {ranks * need / gb:,.1f} GB here ({need / gb:,.2f} GB each: the "
            f"runtime and one micro-batch of {cfg.train.micro_batch:,} sequences' logits), and this machine has "
            f"{memory / gb:,.1f} GB; use fewer ranks (--facilities, --ranks-per-facility) or a smaller "
            "train.micro_batch"]


def site_problems(cfg: RunConfig, here: bool = True) -> list[str]:
    """What no node of a facility's site can hold at all, one line per facility: the ranks a node runs
    (`scheduler.ranks_per_node`) times `least_per_rank`, against the node's memory (the profile's
    `memory_gb`, else, `here`, this machine's). `mpifed plan` works out the rest (weights, optimizer
    state, buffers)."""
    try:
        need, gb, out = least_per_rank(cfg), 1e9, []
    except DataError:  # named by `_data_problems`
        return []
    for fac in cfg.facility:
        try:
            sched = get(fac.site).scheduler
        except SiteError:  # named by `problems`
            continue
        memory = sched.memory_gb * gb or (this_machine() if here else 0.0)
        per_node = min(fac.ranks, sched.ranks_per_node)
        if memory and per_node * need > memory:
            out.append(f"facility.{fac.name}: {per_node:,} ranks on a node of {fac.site} need at least "
                       f"{per_node * need / gb:,.1f} GB ({need / gb:,.2f} GB each: the runtime and one micro-batch "
                       f"of {cfg.train.micro_batch:,} sequences' logits), and the node has {memory / gb:,.1f} GB; "
                       "use a smaller train.micro_batch or data.seq_len")
    return out


def _positions_problem(cfg: RunConfig) -> list[str]:
    """A model folder learned positions up to its `max_position_embeddings`: a longer data.seq_len would
    index past them (GPT-2's learned positions) or run where the model was never trained."""
    try:
        hf = json.loads((Path(cfg.model.path) / "config.json").read_text())
        seq_len, _ = shape(cfg.data)
    except (OSError, ValueError, DataError):  # no model folder, or named by the other checks
        return []
    key = next((k for k in ("max_position_embeddings", "n_positions") if isinstance(hf, dict) and k in hf), "")
    limit = hf[key] if key else None
    if isinstance(limit, int) and seq_len > limit:
        return [f"data.seq_len: {seq_len:,} tokens, more than the {limit:,} positions of model.path {cfg.model.path} "
                f"({key} in its config.json); use at most that many (data.seq_len, or `mpifed data prepare "
                "--seq-len`)"]
    return []


def problems(cfg: RunConfig, here: bool = True) -> list[str]:
    """Everything about `cfg` that this machine cannot honour (empty: nothing). With here=False (a
    project written for other machines, `mpifed config new`), only what holds anywhere: the site
    profiles and what their nodes can hold; the paths and packages are checked at each site."""
    out = []
    profiles = available()
    out += [f"facility.{fac.name}.site: no site profile {fac.site!r}; choose one of {', '.join(profiles)} "
            "(mpifed sites list)" for fac in cfg.facility if fac.site not in profiles]
    if not here:
        return out + site_problems(cfg, here)
    for key, (message, package) in _PACKAGES.items():
        if setting(cfg, key) and importlib.util.find_spec(package) is None:
            out.append(f"{key}: {message}")
    if cfg.model.path and not (Path(cfg.model.path) / "config.json").is_file():
        out.append(f"model.path: {cfg.model.path} is not a model folder (no config.json there); give a local "
                   "Hugging Face model folder, or leave model.path empty to build model.preset")
    for fac in cfg.facility:
        where = f"facility.{fac.name}"
        if fac.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            out.append(f"{where}.engine: deepspeed is not installed here; pip install 'mpifed[deepspeed]' "
                       "or choose the fsdp or replica engine")
        if fac.deepspeed.config and not Path(fac.deepspeed.config).is_file():
            out.append(f"{where}.deepspeed.config: file {fac.deepspeed.config} does not exist")
    return out + _data_problems(cfg) + (_positions_problem(cfg) if cfg.model.path else []) + site_problems(cfg)


def _data_problems(cfg: RunConfig) -> list[str]:
    """A prepared folder must exist and hold one partition per facility (or the ones they name)."""
    if not cfg.data.path:
        return []
    try:
        manifest = read_manifest(Path(cfg.data.path))
    except DataError as exc:
        return [str(exc)]
    held = len(manifest["partitions"])
    if not any(f.partition >= 0 for f in cfg.facility):
        if held != len(cfg.facility):
            return [f"data.path: {cfg.data.path} holds {held} partitions for {len(cfg.facility)} facilities; "
                    f"prepare it again with --partitions {len(cfg.facility)}"]
        return []
    chosen = [cfg.partition_of(i) for i in range(len(cfg.facility))]
    if max(chosen) >= held or len(set(chosen)) < len(chosen):
        return [f"facility.partition: each facility needs its own partition of the {held} in {cfg.data.path} "
                f"(got {chosen})"]
    return []


def checked(cfg: RunConfig, here: bool = True) -> RunConfig:
    """`cfg` once this machine can run it, its paths' `$VARS` expanded here (configfile.expanded); else
    ConfigError listing every problem. here=False: a project for other machines (see `problems`),
    returned as written."""
    if here:
        cfg, unset = expanded(cfg)
        if unset:  # a path that is not the one meant: the checks of paths would only repeat it
            raise ConfigError("; ".join(unset))
    found = problems(cfg, here)
    if found:
        raise ConfigError("; ".join(found))
    return cfg
